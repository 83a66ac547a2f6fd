// Issue 3 through the service: an MLP's layers streamed from the C++ client
// give the updates of the core blocks called in-process, with the session's
// KL clipping and Levenberg-Marquardt damping applied the same way.
#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "server/blocks/kfac_dense/math/kfac_dense_block.h"
#include "server/core/curvature/kl_clipping.h"
#include "server/core/curvature/levenberg_marquardt_damping.h"
#include "server/engine/engine_factory.h"
#include "tests/service/row_major.h"
#include "tests/service/server_fixture.h"

namespace natgrad::testing {
namespace {

const std::vector<int64_t> kWidths = {6, 5, 4, 3};
constexpr int64_t kBatch = 16;

natgrad::v1::SessionConfig MlpConfig(bool adaptive) {
  natgrad::v1::SessionConfig c;
  c.set_state_dtype(natgrad::v1::FLOAT64);
  c.mutable_kl_clip()->set_enabled(true);
  c.mutable_kl_clip()->set_kappa(1e-2);
  if (adaptive) {
    c.mutable_adaptive_damping()->set_enabled(true);
    c.mutable_adaptive_damping()->set_interval(2);
  }
  for (size_t l = 0; l + 1 < kWidths.size(); ++l) {
    auto* b = c.add_blocks();
    b->set_name("fc" + std::to_string(l));
    auto* k = b->mutable_kfac_dense();
    k->set_d_in(kWidths[l]);
    k->set_d_out(kWidths[l + 1]);
    k->set_has_bias(true);
    *k->mutable_learning_rate() = Constant(0.5);
    *k->mutable_damping() = Constant(1e-2);
    *k->mutable_momentum() = Constant(0.9);
    k->set_inverse_period(3);
    k->set_damping_mode(l == 1 ? natgrad::v1::EIGEN_EXACT : natgrad::v1::FACTORED_TIKHONOV);
  }
  return c;
}

void RunAgainstCore(bool adaptive) {
  auto server = StartServer();
  client::Client client(ClientFor(*server));
  auto session = client.CreateSession(MlpConfig(adaptive));
  ASSERT_TRUE(session.ok()) << session.status();
  auto stream = client.OpenStream(session->name());

  // The reference: the same core blocks on an engine of our own.
  engine::EngineOptions eo;
  eo.backend = "cpu";
  auto engine = engine::CreateInversionEngine(eo);
  ASSERT_TRUE(engine.ok());
  std::vector<std::unique_ptr<core::ParameterBlock>> ref;
  for (size_t l = 0; l + 1 < kWidths.size(); ++l) {
    core::KfacDenseOptions o;
    o.d_in = kWidths[l];
    o.d_out = kWidths[l + 1];
    o.has_bias = true;
    o.learning_rate = core::ConstantSchedule(0.5);
    o.damping = core::ConstantSchedule(1e-2);
    o.momentum = core::ConstantSchedule(0.9);
    o.inverse_period = 3;
    o.damping_mode = l == 1 ? core::KfacDampingMode::kEigenExact
                            : core::KfacDampingMode::kFactoredTikhonov;
    ref.push_back(*core::NewKfacDenseBlock("fc" + std::to_string(l), o, core::Precision::kFloat64));
  }
  core::LevenbergMarquardtOptions lo;
  lo.initial_damping = 1e-2;
  lo.interval = 2;
  auto lm = *core::LevenbergMarquardtDamping::Create(lo);

  std::mt19937 rng(21);
  double loss = 2.0;
  for (int t = 1; t <= 12; ++t) {
    std::vector<natgrad::v1::BlockStep> steps;
    std::vector<core::BlockStepInput> inputs;
    for (size_t l = 0; l + 1 < kWidths.size(); ++l) {
      const int64_t din = kWidths[l], dout = kWidths[l + 1];
      auto g = RandomVector(rng, dout * (din + 1), 0.1);
      auto a = RandomVector(rng, kBatch * din);
      auto og = RandomVector(rng, kBatch * dout);
      natgrad::v1::BlockStep s;
      s.set_name("fc" + std::to_string(l));
      *s.mutable_gradient() = client::MakeTensor(g, {dout, din + 1});
      *s.mutable_kfac()->mutable_raw()->mutable_activations() = client::MakeTensor(a, {kBatch, din});
      *s.mutable_kfac()->mutable_raw()->mutable_output_gradients() =
          client::MakeTensor(og, {kBatch, dout});
      steps.push_back(s);
      core::KfacStepInput in;
      in.gradient = RowMajorMatrix(g, dout, din + 1);
      core::KfacStatisticsInput k;
      k.activations = RowMajorMatrix(a, kBatch, din);
      k.output_gradients = RowMajorMatrix(og, kBatch, dout);
      k.num_examples = kBatch;
      in.kfac = k;
      inputs.push_back(in);
    }
    loss *= (t % 4 == 0) ? 1.05 : 0.9;  // mostly improving, sometimes not
    auto r = (*stream)->Step(steps, adaptive ? std::optional<double>(loss) : std::nullopt);
    ASSERT_TRUE(r.ok()) << r.status();

    core::StepContext ctx;
    ctx.step = t;
    ctx.engine = engine->engine.get();
    if (adaptive) {
      ctx.loss = loss;
      ctx.damping_override = lm.BeginStep(t, loss);
    }
    std::vector<std::unique_ptr<core::PendingBlockUpdate>> pending;
    for (size_t l = 0; l < ref.size(); ++l) pending.push_back(*ref[l]->Propose(inputs[l], ctx));
    const double nu = core::KlClipScale(core::KlClipSum(pending), 1e-2);
    EXPECT_NEAR(r->kl_clip_scale(), nu, 1e-12 * nu) << "step " << t;
    if (adaptive) {
      double predicted = 0;
      for (auto& p : pending) predicted += p->curvature()->PredictedReduction(nu);
      lm.EndStep(t, predicted);
      EXPECT_DOUBLE_EQ(r->damping(), *ctx.damping_override) << "step " << t;
    }
    for (size_t l = 0; l < ref.size(); ++l) {
      const Eigen::MatrixXd want = pending[l]->Commit(nu).delta.ToMatrix<double>();
      const std::vector<double> got = client::TensorValues(r->updates(l).delta());
      ASSERT_EQ(got.size(), size_t(want.size()));
      const double scale = want.cwiseAbs().maxCoeff();
      for (int64_t i = 0; i < want.rows(); ++i)
        for (int64_t j = 0; j < want.cols(); ++j)
          ASSERT_NEAR(got[i * want.cols() + j], want(i, j), 1e-10 * scale)
              << "step " << t << " layer " << l;
    }
  }
  if (adaptive) {
    // The damping actually moved (the loss went both ways).
    EXPECT_NE(client.GetSession(session->name())->damping(), 1e-2);
    EXPECT_NEAR(client.GetSession(session->name())->damping(), lm.damping(), 1e-15);
  }
}

TEST(KfacService, MlpLayersEqualCoreInProcess) { RunAgainstCore(false); }
TEST(KfacService, AdaptiveDampingEqualsCoreInProcess) { RunAgainstCore(true); }

TEST(KfacService, BadStatisticsAreRejectedNamingBlockAndField) {
  auto server = StartServer();
  client::Client client(ClientFor(*server));
  auto session = client.CreateSession(MlpConfig(false));
  auto stream = client.OpenStream(session->name());
  const int64_t bytes_before = client.GetSession(session->name())->state_bytes();
  std::mt19937 rng(2);
  std::vector<natgrad::v1::BlockStep> steps;
  for (size_t l = 0; l + 1 < kWidths.size(); ++l) {
    const int64_t din = kWidths[l], dout = kWidths[l + 1];
    natgrad::v1::BlockStep s;
    s.set_name("fc" + std::to_string(l));
    *s.mutable_gradient() = client::MakeTensor(RandomVector(rng, dout * (din + 1)), {dout, din + 1});
    // Layer 1 gets activations one column too wide.
    const int64_t width = l == 1 ? din + 1 : din;
    *s.mutable_kfac()->mutable_raw()->mutable_activations() =
        client::MakeTensor(RandomVector(rng, kBatch * width), {kBatch, width});
    *s.mutable_kfac()->mutable_raw()->mutable_output_gradients() =
        client::MakeTensor(RandomVector(rng, kBatch * dout), {kBatch, dout});
    steps.push_back(s);
  }
  auto r = (*stream)->Step(steps);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(r.status().message(), ::testing::HasSubstr("fc1"));
  EXPECT_THAT(r.status().message(), ::testing::HasSubstr("activations"));
  EXPECT_EQ(client.GetSession(session->name())->last_step(), 0);
  EXPECT_EQ(client.GetSession(session->name())->state_bytes(), bytes_before);
}

// Raw statistics are not scanned on arrival (the Gram finds a non-finite
// value on its own pass): a NaN or an Inf anywhere, in either dtype and
// state precision, is still refused with its place, and nothing moves.
TEST(KfacService, NonFiniteRawStatisticsAreRefusedWithTheirPlace) {
  auto server = StartServer();
  client::Client client(ClientFor(*server));
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();
  struct Case {
    natgrad::v1::DType state, wire;
    size_t layer;
    bool activations;
    int64_t row, col;
    double value;
    std::string want;
  };
  using natgrad::v1::FLOAT32;
  using natgrad::v1::FLOAT64;
  const std::vector<Case> cases = {
      {FLOAT64, FLOAT64, 1, true, 3, 2, nan,
       "block \"fc1\": kfac.raw.activations has a non-finite value (nan) at [3, 2]"},
      {FLOAT32, FLOAT32, 2, false, kBatch - 1, 2, -inf,
       "block \"fc2\": kfac.raw.output_gradients has a non-finite value (-inf) at [15, 2]"},
      {FLOAT32, FLOAT32, 0, true, 0, 0, inf,
       "block \"fc0\": kfac.raw.activations has a non-finite value (inf) at [0, 0]"},
      {FLOAT32, FLOAT64, 1, false, 7, 1, nan,
       "block \"fc1\": kfac.raw.output_gradients has a non-finite value (nan) at [7, 1]"},
      {FLOAT64, FLOAT32, 2, true, 9, 3, inf,
       "block \"fc2\": kfac.raw.activations has a non-finite value (inf) at [9, 3]"},
  };
  for (const Case& c : cases) {
    natgrad::v1::SessionConfig config = MlpConfig(false);
    config.set_state_dtype(c.state);
    auto session = client.CreateSession(config);
    ASSERT_TRUE(session.ok()) << session.status();
    auto stream = client.OpenStream(session->name());
    const int64_t bytes_before = client.GetSession(session->name())->state_bytes();
    std::mt19937 rng(5);
    auto tensor = [&](std::vector<double> v, int64_t rows, int64_t cols) {
      if (c.wire == FLOAT64) return client::MakeTensor(v, {rows, cols});
      return client::MakeTensor(std::vector<float>(v.begin(), v.end()), {rows, cols});
    };
    auto steps = [&](bool bad) {
      std::vector<natgrad::v1::BlockStep> out;
      for (size_t l = 0; l + 1 < kWidths.size(); ++l) {
        const int64_t din = kWidths[l], dout = kWidths[l + 1];
        std::vector<double> a = RandomVector(rng, kBatch * din);
        std::vector<double> g = RandomVector(rng, kBatch * dout);
        if (bad && l == c.layer) {
          (c.activations ? a[c.row * din + c.col] : g[c.row * dout + c.col]) = c.value;
        }
        natgrad::v1::BlockStep s;
        s.set_name("fc" + std::to_string(l));
        *s.mutable_gradient() = tensor(RandomVector(rng, dout * (din + 1)), dout, din + 1);
        *s.mutable_kfac()->mutable_raw()->mutable_activations() = tensor(a, kBatch, din);
        *s.mutable_kfac()->mutable_raw()->mutable_output_gradients() = tensor(g, kBatch, dout);
        out.push_back(s);
      }
      return out;
    };
    auto r = (*stream)->Step(steps(true));
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << c.want;
    EXPECT_THAT(std::string(r.status().message()), ::testing::HasSubstr(c.want));
    EXPECT_EQ(client.GetSession(session->name())->last_step(), 0);
    EXPECT_EQ(client.GetSession(session->name())->state_bytes(), bytes_before);
    // A finite step goes through as step 1 (the refused one left no trace).
    auto ok = (*stream)->Step(steps(false));
    ASSERT_TRUE(ok.ok()) << ok.status();
    EXPECT_EQ(ok->step(), 1);
    (*stream)->Close().IgnoreError();
  }
}

TEST(KfacService, AdaptiveDampingNeedsAKfacBlock) {
  auto server = StartServer();
  client::Client client(ClientFor(*server));
  natgrad::v1::SessionConfig c;
  c.mutable_adaptive_damping()->set_enabled(true);
  auto* b = c.add_blocks();
  b->set_name("w");
  b->add_shape(3);
  b->mutable_sgd();
  EXPECT_EQ(client.CreateSession(c).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace natgrad::testing
