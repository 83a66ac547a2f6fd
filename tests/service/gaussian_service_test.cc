// Issue 4 through the service: a session mixing a Gaussian block (natural
// gradients for q(u)) with Adam for hyperparameters, streamed from the C++
// client, gives the core's results in-process.
#include "gmock/gmock.h"
#include "server/blocks/gaussian/math/gaussian_block.h"
#include "tests/service/server_fixture.h"

namespace natgrad::testing {
namespace {

constexpr int kDim = 4, kCopies = 2;

// Row-major [copies, dim] and [copies, dim, dim] buffers and their core form.
struct GaussianBuffers {
  std::vector<double> p1, p2, g1, g2;
  core::GaussianStepInput core;
};

GaussianBuffers RandomMeanCholesky(std::mt19937& rng) {
  GaussianBuffers b;
  std::normal_distribution<double> n;
  b.core.gradient_space = core::GaussianStepInput::GradientSpace::kParametrization;
  for (int c = 0; c < kCopies; ++c) {
    Eigen::VectorXd m(kDim), gm(kDim);
    Eigen::MatrixXd L = Eigen::MatrixXd::Zero(kDim, kDim), gl(kDim, kDim);
    for (int i = 0; i < kDim; ++i) {
      m(i) = n(rng);
      gm(i) = n(rng);
      for (int j = 0; j <= i; ++j) L(i, j) = i == j ? 1.0 + 0.3 * std::abs(n(rng)) : 0.2 * n(rng);
      for (int j = 0; j < kDim; ++j) gl(i, j) = j <= i ? 0.1 * n(rng) : 0.0;
    }
    for (int i = 0; i < kDim; ++i) {
      b.p1.push_back(m(i));
      b.g1.push_back(gm(i));
      for (int j = 0; j < kDim; ++j) {
        b.p2.push_back(L(i, j));
        b.g2.push_back(gl(i, j));
      }
    }
    b.core.param1.push_back(m);
    b.core.param2.push_back(L);
    b.core.grad1.push_back(gm);
    b.core.grad2.push_back(gl);
  }
  return b;
}

natgrad::v1::SessionConfig Config() {
  natgrad::v1::SessionConfig c;
  auto* q = c.add_blocks();
  q->set_name("q_u");
  auto* g = q->mutable_gaussian();
  g->set_dim(kDim);
  g->set_copies(kCopies);
  g->set_parametrization(natgrad::v1::MEAN_CHOLESKY);
  auto* warm = g->mutable_gamma()->mutable_log_linear_warmup();
  warm->set_start(1e-2);
  warm->set_end(0.5);
  warm->set_steps(5);
  g->set_return_direction(true);
  auto* k = c.add_blocks();
  k->set_name("kernel");
  k->add_shape(2);
  *k->mutable_adam()->mutable_learning_rate() = Constant(0.01);
  return c;
}

natgrad::v1::BlockStep GaussianStep(const GaussianBuffers& b) {
  natgrad::v1::BlockStep s;
  s.set_name("q_u");
  auto* g = s.mutable_gaussian();
  *g->mutable_param1() = client::MakeTensor(b.p1, {kCopies, kDim});
  *g->mutable_param2() = client::MakeTensor(b.p2, {kCopies, kDim, kDim});
  *g->mutable_grad1() = client::MakeTensor(b.g1, {kCopies, kDim});
  *g->mutable_grad2() = client::MakeTensor(b.g2, {kCopies, kDim, kDim});
  g->set_gradient_space(natgrad::v1::PARAMETRIZATION_GRADIENT);
  return s;
}

natgrad::v1::BlockStep KernelStep(std::mt19937& rng) {
  natgrad::v1::BlockStep s;
  s.set_name("kernel");
  *s.mutable_gradient() = client::MakeTensor(RandomVector(rng, 2), {2});
  return s;
}

std::vector<double> Flat(const std::vector<Eigen::VectorXd>& v) {
  std::vector<double> out;
  for (const auto& x : v) out.insert(out.end(), x.data(), x.data() + x.size());
  return out;
}
std::vector<double> Flat(const std::vector<Eigen::MatrixXd>& v) {
  std::vector<double> out;
  for (const auto& m : v)
    for (int i = 0; i < m.rows(); ++i)
      for (int j = 0; j < m.cols(); ++j) out.push_back(m(i, j));
  return out;
}

TEST(GaussianService, StepsEqualCoreInProcess) {
  auto server = StartServer();
  client::Client client(ClientFor(*server));
  auto session = client.CreateSession(Config());
  ASSERT_TRUE(session.ok()) << session.status();
  auto stream = client.OpenStream(session->name());

  core::GaussianOptions o;
  o.dim = kDim;
  o.copies = kCopies;
  o.parametrization = core::GaussianParametrization::kMeanCholesky;
  o.gamma = *core::LogLinearWarmupSchedule(1e-2, 0.5, 5);
  o.return_direction = true;
  auto ref = *core::NewGaussianBlock("q_u", o, core::Precision::kFloat64);

  std::mt19937 rng(11);
  for (int t = 1; t <= 8; ++t) {
    GaussianBuffers b = RandomMeanCholesky(rng);
    auto r = (*stream)->Step({GaussianStep(b), KernelStep(rng)});
    ASSERT_TRUE(r.ok()) << r.status();
    core::StepContext ctx;
    ctx.step = t;
    core::BlockStepInput in = b.core;
    auto pending = ref->Propose(in, ctx);
    ASSERT_TRUE(pending.ok()) << pending.status();
    const core::GaussianStepOutput want = std::get<core::GaussianStepOutput>((*pending)->Commit(1.0).kind_output);
    const auto& got = r->updates(0).gaussian();
    EXPECT_EQ(client::TensorValues(got.param1()), Flat(want.param1));
    EXPECT_EQ(client::TensorValues(got.param2()), Flat(want.param2));
    EXPECT_EQ(client::TensorValues(got.delta1()), Flat(want.delta1));
    EXPECT_EQ(client::TensorValues(got.delta2()), Flat(want.delta2));
    EXPECT_EQ(client::TensorValues(got.direction2()), Flat(want.direction2));
    EXPECT_EQ(got.gamma_used(), want.gamma_used);
    EXPECT_EQ(got.param2().shape_size(), 3);
    EXPECT_DOUBLE_EQ(r->updates(0).hyperparameters().at("gamma"),
                     std::pow(10.0, ((5.0 - std::min(t, 5)) * -2 + std::min(t, 5) * std::log10(0.5)) / 5));
    EXPECT_EQ(r->updates(1).delta().shape(0), 2);
  }
}

TEST(GaussianService, NonPositiveDefiniteCovarianceIsRejected) {
  auto server = StartServer();
  client::Client client(ClientFor(*server));
  natgrad::v1::SessionConfig c = Config();
  c.mutable_blocks(0)->mutable_gaussian()->set_parametrization(natgrad::v1::MEAN_COVARIANCE);
  auto session = client.CreateSession(c);
  ASSERT_TRUE(session.ok());
  auto stream = client.OpenStream(session->name());
  std::mt19937 rng(12);
  GaussianBuffers b = RandomMeanCholesky(rng);
  // A covariance with a negative eigenvalue in copy 1.
  for (int i = 0; i < kDim * kDim; ++i) b.p2[i] = (i % (kDim + 1) == 0) ? 1.0 : 0.0;
  for (int i = 0; i < kDim * kDim; ++i) b.p2[kDim * kDim + i] = (i % (kDim + 1) == 0) ? -1.0 : 0.0;
  for (auto& g : b.g2) g = 0.0;
  auto r = (*stream)->Step({GaussianStep(b), KernelStep(rng)});
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(r.status().message(), ::testing::HasSubstr("q_u"));
  EXPECT_THAT(r.status().message(), ::testing::HasSubstr("param2[1]"));
  EXPECT_EQ(client.GetSession(session->name())->last_step(), 0);
  // Shapes are checked at the edge with the field named.
  b = RandomMeanCholesky(rng);
  natgrad::v1::BlockStep bad = GaussianStep(b);
  *bad.mutable_gaussian()->mutable_param1() = client::MakeTensor(b.p1, {kDim, kCopies});
  auto r2 = (*stream)->Step({bad, KernelStep(rng)});
  EXPECT_EQ(r2.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(r2.status().message(), ::testing::HasSubstr("block \"q_u\": gaussian.param1 has shape [4, 2], want [2, 4]"));
}

}  // namespace
}  // namespace natgrad::testing
