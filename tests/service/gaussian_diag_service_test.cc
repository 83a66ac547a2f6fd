// The gaussian_diag kind through a real in-process server: steps equal the
// core block called in-process bit for bit (float32 state, float32 wire),
// and a single copy may be sent as [dim].
#include "gmock/gmock.h"
#include "server/blocks/gaussian_diag/math/gaussian_diag_block.h"
#include "tests/service/server_fixture.h"

namespace natgrad::testing {
namespace {

constexpr int64_t kCopies = 2, kDim = 1000;

std::vector<float> Positive(std::mt19937& rng, size_t n) {
  std::uniform_real_distribution<float> u(0.5f, 2.0f);
  std::vector<float> v(n);
  for (auto& x : v) x = u(rng);
  return v;
}
std::vector<float> Normal(std::mt19937& rng, size_t n, float scale) {
  std::normal_distribution<float> d(0, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

Eigen::MatrixXd AsMatrix(const std::vector<float>& v, int64_t rows, int64_t cols) {
  Eigen::MatrixXd m(rows, cols);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) m(r, c) = v[r * cols + c];
  return m;
}

TEST(GaussianDiagService, StepsEqualCoreInProcess) {
  auto server = StartServer();
  client::Client client(ClientFor(*server));
  natgrad::v1::SessionConfig c;
  c.set_state_dtype(natgrad::v1::FLOAT32);
  auto* q = c.add_blocks();
  q->set_name("q");
  auto* g = q->mutable_gaussian_diag();
  g->set_dim(kDim);
  g->set_copies(kCopies);
  g->set_parametrization(natgrad::v1::DIAG_MEAN_LOG_STD);
  *g->mutable_gamma() = Constant(0.3);
  g->set_return_direction(true);
  auto session = client.CreateSession(c);
  ASSERT_TRUE(session.ok()) << session.status();
  auto stream = client.OpenStream(session->name());

  core::GaussianDiagOptions o;
  o.dim = kDim;
  o.copies = kCopies;
  o.parametrization = core::GaussianDiagParametrization::kMeanLogStd;
  o.gamma = core::ConstantSchedule(0.3);
  o.return_direction = true;
  auto ref = *core::NewGaussianDiagBlock("q", o, core::Precision::kFloat32);

  std::mt19937 rng(1);
  std::vector<float> m = Normal(rng, kCopies * kDim, 1), rho = Normal(rng, kCopies * kDim, 0.2);
  for (int t = 1; t <= 4; ++t) {
    const auto g1 = Normal(rng, kCopies * kDim, 0.1), g2 = Normal(rng, kCopies * kDim, 0.1);
    natgrad::v1::BlockStep b;
    b.set_name("q");
    auto* in = b.mutable_gaussian();
    *in->mutable_param1() = client::MakeTensor(m, {kCopies, kDim});
    *in->mutable_param2() = client::MakeTensor(rho, {kCopies, kDim});
    *in->mutable_grad1() = client::MakeTensor(g1, {kCopies, kDim});
    *in->mutable_grad2() = client::MakeTensor(g2, {kCopies, kDim});
    in->set_gradient_space(natgrad::v1::PARAMETRIZATION_GRADIENT);
    auto r = (*stream)->Step({b});
    ASSERT_TRUE(r.ok()) << r.status();
    const auto& u = r->updates(0).gaussian();
    EXPECT_EQ(u.param1().dtype(), natgrad::v1::FLOAT32);

    core::GaussianDiagStepInput ci;
    ci.param1 = AsMatrix(m, kCopies, kDim);
    ci.param2 = AsMatrix(rho, kCopies, kDim);
    ci.grad1 = AsMatrix(g1, kCopies, kDim);
    ci.grad2 = AsMatrix(g2, kCopies, kDim);
    ci.gradient_space = core::GaussianStepInput::GradientSpace::kParametrization;
    core::StepContext ctx;
    ctx.step = t;
    auto pending = ref->Propose(ci, ctx);
    ASSERT_TRUE(pending.ok()) << pending.status();
    const auto want = std::get<core::GaussianDiagStepOutput>((*pending)->Commit(1).kind_output);
    auto values = [](const core::DenseTensor& d) {
      const Eigen::MatrixXf f = d.ToMatrix<float>();
      std::vector<double> v;
      for (int64_t r = 0; r < f.rows(); ++r)
        for (int64_t c = 0; c < f.cols(); ++c) v.push_back(f(r, c));
      return v;
    };
    ASSERT_EQ(client::TensorValues(u.param1()), values(want.param1)) << t;
    ASSERT_EQ(client::TensorValues(u.param2()), values(want.param2)) << t;
    ASSERT_EQ(client::TensorValues(u.direction2()), values(want.direction2)) << t;
    const auto nm = client::TensorValues(u.param1()), nr = client::TensorValues(u.param2());
    m.assign(nm.begin(), nm.end());
    rho.assign(nr.begin(), nr.end());
  }
}

TEST(GaussianDiagService, WrongShapesAreRefusedNamingTheField) {
  auto server = StartServer();
  client::Client client(ClientFor(*server));
  natgrad::v1::SessionConfig c;
  auto* q = c.add_blocks();
  q->set_name("q");
  q->mutable_gaussian_diag()->set_dim(3);
  auto session = client.CreateSession(c);
  ASSERT_TRUE(session.ok()) << session.status();
  auto stream = client.OpenStream(session->name());
  natgrad::v1::BlockStep b;
  b.set_name("q");
  auto* in = b.mutable_gaussian();
  std::vector<double> ok = {1, 2, 3}, bad = {1, 2};
  *in->mutable_param1() = client::MakeTensor(ok, {3});  // one copy as [dim]
  *in->mutable_param2() = client::MakeTensor(bad, {2});
  *in->mutable_grad1() = client::MakeTensor(ok, {3});
  *in->mutable_grad2() = client::MakeTensor(ok, {3});
  auto r = (*stream)->Step({b});
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.status().message(),
              ::testing::HasSubstr("block \"q\": gaussian.param2 has shape [2], want [1, 3]"));
}

}  // namespace
}  // namespace natgrad::testing
