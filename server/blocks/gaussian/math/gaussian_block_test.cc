// GaussianBlock behaviour: factory validation, step outputs, the γ-halving
// safeguard, bad input (INVALID_ARGUMENT, state unchanged) and state I/O.
// The numerics are covered by the parametrisation/gradient/direction tests
// and the SVGP oracle.
#include "server/blocks/gaussian/math/gaussian_block.h"

#include <cmath>
#include <functional>
#include <limits>
#include <random>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/blocks/gaussian/math/gaussian_test_util.h"
#include "server/core/schedule.h"
#include "server/linalg/compute_pool.h"

namespace natgrad::core {
namespace {

using ::natgrad::core::testing::GaussianOf;
using ::natgrad::core::testing::AllParametrizations;
using ::natgrad::core::testing::MaxAbsDiff;
using ::natgrad::core::testing::MeanCov;
using ::natgrad::core::testing::OracleMeanCov;
using ::natgrad::core::testing::OracleParams;
using ::natgrad::core::testing::RandomMatrix;
using ::natgrad::core::testing::RandomSpd;
using ::natgrad::core::testing::RandomSymmetric;
using ::natgrad::core::testing::RandomVector;
using ::testing::HasSubstr;
using Eigen::MatrixXd;
using Eigen::VectorXd;
using Space = GaussianStepInput::GradientSpace;
using P = GaussianParametrization;

constexpr int kDim = 4;

std::unique_ptr<ParameterBlock> MakeBlock(GaussianOptions o,
                                          Precision precision = Precision::kFloat64) {
  auto block = NewGaussianBlock("q_u", o, precision);
  EXPECT_TRUE(block.ok()) << block.status();
  return *std::move(block);
}

GaussianOptions Options(P p, int copies = 2, double gamma = 0.5) {
  GaussianOptions o;
  o.dim = kDim;
  o.copies = copies;
  o.parametrization = p;
  o.gamma = ConstantSchedule(gamma);
  return o;
}

// Random current parameters in p and a random ∂L/∂η, one per copy.
GaussianStepInput RandomInput(P p, int copies, std::mt19937* rng,
                           Space space = Space::kExpectation) {
  GaussianStepInput in;
  in.gradient_space = space;
  for (int c = 0; c < copies; ++c) {
    auto [p1, p2] = OracleParams(p, {RandomVector(kDim, rng), RandomSpd(kDim, rng)});
    in.param1.push_back(p1);
    in.param2.push_back(p2);
    in.grad1.push_back(0.1 * RandomVector(kDim, rng));
    in.grad2.push_back(0.1 * RandomSymmetric(kDim, rng));
  }
  return in;
}

StepContext Ctx(int64_t step) {
  StepContext ctx;
  ctx.step = step;
  return ctx;
}

TEST(GaussianBlockFactoryTest, ValidatesOptions) {
  GaussianOptions o = Options(P::kMeanCovariance);
  o.dim = 0;
  EXPECT_EQ(NewGaussianBlock("b", o).status().code(),
            absl::StatusCode::kInvalidArgument);
  o = Options(P::kMeanCovariance);
  o.copies = -1;
  EXPECT_EQ(NewGaussianBlock("b", o).status().code(),
            absl::StatusCode::kInvalidArgument);
  o = Options(P::kMeanCovariance);
  o.max_halvings = -2;
  EXPECT_EQ(NewGaussianBlock("b", o).status().code(),
            absl::StatusCode::kInvalidArgument);
  o.max_halvings = kMaxMaxHalvings + 1;
  EXPECT_EQ(NewGaussianBlock("b", o).status().code(),
            absl::StatusCode::kInvalidArgument);
  o.max_halvings = -1;  // the default
  EXPECT_TRUE(NewGaussianBlock("b", o).ok());
  o = Options(P::kMeanCovariance);
  o.copies = 0;  // read as 1
  o.gamma = nullptr;  // constant 1
  auto block = NewGaussianBlock("b", o);
  ASSERT_TRUE(block.ok());
  EXPECT_EQ((*block)->kind(), "gaussian");
  EXPECT_EQ((*block)->name(), "b");
  std::mt19937 rng(1);
  auto pending = (*block)->Propose(RandomInput(P::kMeanCovariance, 1, &rng), Ctx(1));
  ASSERT_TRUE(pending.ok()) << pending.status();
  EXPECT_EQ((*pending)->Commit(1).hyperparameters.at("gamma"), 1.0);
}

TEST(GaussianBlockTest, StepOutputsAndHyperparameters) {
  std::mt19937 rng(2);
  auto sched = LinearWarmupSchedule(0.1, 0.5, 4);
  ASSERT_TRUE(sched.ok());
  for (P p : AllParametrizations()) {
    GaussianOptions o = Options(p);
    o.gamma = *sched;
    auto block = MakeBlock(o);
    const GaussianStepInput in = RandomInput(p, 2, &rng);
    auto pending = block->Propose(in, Ctx(2));
    ASSERT_TRUE(pending.ok()) << pending.status();
    // Propose changes nothing; Commit counts the step.
    EXPECT_EQ(block->ExportState().scalars.at("steps"), 0);
    const BlockStepOutput out = (*pending)->Commit(1);
    EXPECT_EQ(block->ExportState().scalars.at("steps"), 1);
    const double gamma = (*sched)->Value(2);  // 0.3 up to rounding
    EXPECT_DOUBLE_EQ(gamma, 0.3);
    EXPECT_EQ(out.hyperparameters.at("gamma"), gamma);
    EXPECT_EQ(out.hyperparameters.at("gamma_used"), gamma);
    ASSERT_TRUE(std::holds_alternative<GaussianStepOutput>(out.kind_output));
    const GaussianStepOutput& g = GaussianOf(out);
    EXPECT_EQ(g.halvings, 0);
    ASSERT_EQ(g.param1.size(), 2u);
    ASSERT_EQ(g.param2.size(), 2u);
    EXPECT_TRUE(g.direction1.empty());
    EXPECT_TRUE(g.direction2.empty());
    for (int c = 0; c < 2; ++c) {
      EXPECT_EQ(g.delta1[c], g.param1[c] - in.param1[c]);
      EXPECT_EQ(g.delta2[c], g.param2[c] - in.param2[c]);
      // The new point is θ − γ ∂L/∂η, by the textbook conversions.
      const MeanCov old_q = OracleMeanCov(p, in.param1[c],
                                          in.param2[c]);
      const auto [t1, t2] = OracleParams(P::kNatural, old_q);
      const MeanCov want = OracleMeanCov(
          P::kNatural, t1 - gamma * in.grad1[c],
          t2 - gamma * in.grad2[c]);
      const auto [w1, w2] = OracleParams(p, want);
      EXPECT_LT(MaxAbsDiff(g.param1[c], w1), 1e-9);
      EXPECT_LT(MaxAbsDiff(g.param2[c], w2), 1e-9);
    }
  }
}

// delta = −γ·direction + O(γ²): the direction is the step's tangent.
TEST(GaussianBlockTest, DirectionIsTangentOfTheStep) {
  std::mt19937 rng(3);
  const double gamma = 1e-6;
  for (P p : AllParametrizations()) {
    for (Space space : {Space::kExpectation, Space::kParametrization}) {
      GaussianOptions o = Options(p, 1, gamma);
      o.return_direction = true;
      auto block = MakeBlock(o);
      auto pending = block->Propose(RandomInput(p, 1, &rng, space), Ctx(1));
      ASSERT_TRUE(pending.ok()) << pending.status();
      const GaussianStepOutput g = GaussianOf((*pending)->Commit(1));
      ASSERT_EQ(g.direction1.size(), 1u);
      ASSERT_EQ(g.direction2.size(), 1u);
      const double scale = 1 + g.direction1[0].cwiseAbs().maxCoeff() +
                           g.direction2[0].cwiseAbs().maxCoeff();
      EXPECT_LT(MaxAbsDiff(g.delta1[0] / -gamma, g.direction1[0]), 1e-4 * scale)
          << GaussianParametrizationName(p);
      EXPECT_LT(MaxAbsDiff(g.delta2[0] / -gamma, g.direction2[0]), 1e-4 * scale)
          << GaussianParametrizationName(p);
    }
  }
}

TEST(GaussianBlockTest, Float32MatchesFloat64) {
  std::mt19937 rng(4);
  for (P p : AllParametrizations()) {
    const GaussianStepInput in = RandomInput(p, 2, &rng, Space::kParametrization);
    auto b64 = MakeBlock(Options(p));
    auto b32 = MakeBlock(Options(p), Precision::kFloat32);
    auto p64 = b64->Propose(in, Ctx(1));
    auto p32 = b32->Propose(in, Ctx(1));
    ASSERT_TRUE(p64.ok() && p32.ok());
    const auto g64 = GaussianOf((*p64)->Commit(1));
    const auto g32 = GaussianOf((*p32)->Commit(1));
    for (int c = 0; c < 2; ++c) {
      const double scale = 1 + g64.param2[c].cwiseAbs().maxCoeff();
      EXPECT_LT(MaxAbsDiff(g32.param1[c], g64.param1[c]), 1e-3 * scale);
      EXPECT_LT(MaxAbsDiff(g32.param2[c], g64.param2[c]), 1e-3 * scale);
    }
  }
}

// q = N(0, I) (P = I) and ∂L/∂η = (0, −c I): P' = (1 − 2γc) I.
GaussianStepInput ConeLeavingInput(P p, double c) {
  GaussianStepInput in;
  const auto [p1, p2] =
      OracleParams(p, {VectorXd::Zero(kDim), MatrixXd::Identity(kDim, kDim)});
  in.param1 = {p1};
  in.param2 = {p2};
  in.grad1 = {VectorXd::Zero(kDim)};
  in.grad2 = {-c * MatrixXd::Identity(kDim, kDim)};
  return in;
}

TEST(GaussianSafeguardTest, HalvesGammaUntilPositiveDefinite) {
  for (P p : AllParametrizations()) {
    auto block = MakeBlock(Options(p, 1, 1.0));
    // γ = 1: P' = −2I; 0.5: −0.5I; 0.25: 0.25I, so S' = 4I.
    auto pending = block->Propose(ConeLeavingInput(p, 1.5), Ctx(1));
    ASSERT_TRUE(pending.ok()) << pending.status();
    const BlockStepOutput out = (*pending)->Commit(1);
    EXPECT_EQ(GaussianOf(out).halvings, 2);
    EXPECT_EQ(GaussianOf(out).gamma_used, 0.25);
    EXPECT_EQ(out.hyperparameters.at("gamma"), 1.0);
    EXPECT_EQ(out.hyperparameters.at("gamma_used"), 0.25);
    const MeanCov q =
        OracleMeanCov(p, GaussianOf(out).param1[0], GaussianOf(out).param2[0]);
    EXPECT_LT(MaxAbsDiff(q.s, 4 * MatrixXd::Identity(kDim, kDim)), 1e-12);
    EXPECT_LT(q.m.norm(), 1e-12);
    EXPECT_EQ(block->ExportState().scalars.at("halvings"), 2);
    EXPECT_EQ(block->ExportState().scalars.at("gamma_used"), 0.25);
  }
}

TEST(GaussianSafeguardTest, RejectsWhenAllHalvingsFail) {
  for (P p : AllParametrizations()) {
    GaussianOptions o = Options(p, 1, 1.0);
    o.max_halvings = 1;
    auto block = MakeBlock(o);
    const BlockState before = block->ExportState();
    auto pending = block->Propose(ConeLeavingInput(p, 1.5), Ctx(1));
    ASSERT_FALSE(pending.ok());
    EXPECT_EQ(pending.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(pending.status().message(), HasSubstr("block \"q_u\""));
    EXPECT_THAT(pending.status().message(),
                HasSubstr("left the positive-definite cone"));
    EXPECT_EQ(block->ExportState().scalars, before.scalars);
    // With retries disabled even one halving is not tried.
    o.max_halvings = 0;
    auto strict = MakeBlock(o);
    EXPECT_EQ(strict->Propose(ConeLeavingInput(p, 0.8), Ctx(1)).status().code(),
              absl::StatusCode::kInvalidArgument);
    EXPECT_TRUE(block->Propose(ConeLeavingInput(p, 0.8), Ctx(1)).ok());
  }
}

struct BadInputCase {
  std::string label;
  P p;
  std::function<void(GaussianStepInput*)> corrupt;
  std::string message;  // expected substring after `block "q_u": `
};

std::vector<BadInputCase> BadInputCases() {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();
  std::vector<BadInputCase> cases = {
      {"param1_copies", P::kMeanCovariance,
       [](auto* in) { in->param1.pop_back(); },
       "gaussian.param1 has 1 copies, expected 2"},
      {"param2_copies", P::kMeanCovariance,
       [](auto* in) { in->param2.push_back(in->param2[0]); },
       "gaussian.param2 has 3 copies, expected 2"},
      {"grad1_copies", P::kMeanCovariance, [](auto* in) { in->grad1.clear(); },
       "gaussian.grad1 has 0 copies, expected 2"},
      {"grad2_copies", P::kMeanCovariance, [](auto* in) { in->grad2.pop_back(); },
       "gaussian.grad2 has 1 copies, expected 2"},
      {"param1_dim", P::kMeanCovariance,
       [](auto* in) { in->param1[1] = VectorXd::Zero(kDim + 1); },
       "gaussian.param1[1] has 5 entries, expected 4"},
      {"grad1_dim", P::kMeanCovariance,
       [](auto* in) { in->grad1[0] = VectorXd::Zero(kDim - 1); },
       "gaussian.grad1[0] has 3 entries, expected 4"},
      {"param2_dim", P::kMeanCovariance,
       [](auto* in) { in->param2[0] = MatrixXd::Identity(kDim, kDim + 1); },
       "gaussian.param2[0] is 4x5, expected 4x4"},
      {"grad2_dim", P::kMeanCovariance,
       [](auto* in) { in->grad2[1] = MatrixXd::Zero(3, kDim); },
       "gaussian.grad2[1] is 3x4, expected 4x4"},
      {"param1_nan", P::kMeanCovariance,
       [nan](auto* in) { in->param1[1](2) = nan; },
       "gaussian.param1[1] has a non-finite entry"},
      {"param2_inf", P::kMeanCholesky, [inf](auto* in) { in->param2[0](3, 1) = inf; },
       "gaussian.param2[0] has a non-finite entry"},
      {"grad1_nan", P::kNatural, [nan](auto* in) { in->grad1[0](0) = nan; },
       "gaussian.grad1[0] has a non-finite entry"},
      {"grad2_nan", P::kExpectation, [nan](auto* in) { in->grad2[1](1, 2) = nan; },
       "gaussian.grad2[1] has a non-finite entry"},
      {"cov_not_pd", P::kMeanCovariance,
       [](auto* in) { in->param2[1] = -MatrixXd::Identity(kDim, kDim); },
       "gaussian.param2[1] is not positive definite"},
      {"cov_not_symmetric", P::kMeanCovariance,
       [](auto* in) { in->param2[1](0, 1) += 0.5; },
       "gaussian.param2[1] is not symmetric"},
      {"natural_not_pd", P::kNatural,
       [](auto* in) { in->param2[0] = MatrixXd::Identity(kDim, kDim); },
       "gaussian.param2[0] is not a natural parameter: -2 theta2 is not "
       "positive definite"},
      {"natural_not_symmetric", P::kNatural,
       [](auto* in) { in->param2[0](3, 0) += 0.5; },
       "gaussian.param2[0] is not symmetric"},
      {"expectation_not_pd", P::kExpectation,
       [](auto* in) {
         in->param2[1] = in->param1[1] * in->param1[1].transpose();
       },
       "gaussian.param2[1] is not positive definite"},
      {"expectation_not_symmetric", P::kExpectation,
       [](auto* in) { in->param2[1](2, 1) -= 0.5; },
       "gaussian.param2[1] is not symmetric"},
      {"cholesky_upper", P::kMeanCholesky,
       [](auto* in) { in->param2[1](0, 3) = 1e-3; },
       "gaussian.param2[1] has nonzero entries above the diagonal"},
      {"cholesky_not_pd", P::kMeanCholesky,
       [](auto* in) { in->param2[0](2, 2) = -in->param2[0](2, 2); },
       "gaussian.param2[0] is not positive definite"},
      {"no_gaussian_input", P::kMeanCovariance, nullptr,
       "needs the gaussian step input"},
  };
  return cases;
}

class BadInputTest : public ::testing::TestWithParam<BadInputCase> {};

TEST_P(BadInputTest, InvalidArgumentNamingFieldAndStateUnchanged) {
  const BadInputCase& c = GetParam();
  for (Precision precision : {Precision::kFloat64, Precision::kFloat32}) {
    auto block = MakeBlock(Options(c.p), precision);
    std::mt19937 rng(5);
    // Commit one good step first so the state is not trivially zero.
    auto good = block->Propose(RandomInput(c.p, 2, &rng), Ctx(1));
    ASSERT_TRUE(good.ok()) << good.status();
    (*good)->Commit(1);
    const BlockState before = block->ExportState();

    GaussianStepInput in = RandomInput(c.p, 2, &rng);
    BlockStepInput step_input = DenseStepInput{};  // not a gaussian input
    if (c.corrupt) {
      c.corrupt(&in);
      step_input = in;
    }
    auto pending = block->Propose(step_input, Ctx(2));
    ASSERT_FALSE(pending.ok());
    EXPECT_EQ(pending.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(pending.status().message()),
                HasSubstr("block \"q_u\": " + c.message));
    EXPECT_EQ(block->ExportState().scalars, before.scalars);
    EXPECT_TRUE(block->ExportState().tensors.empty());
  }
}

INSTANTIATE_TEST_SUITE_P(All, BadInputTest, ::testing::ValuesIn(BadInputCases()),
                         [](const auto& info) { return info.param.label; });

TEST(GaussianBlockTest, GradientSpacesAgree) {
  // The same step from ∂L/∂ξ and from the equivalent ∂L/∂η (the textbook
  // chain rule for mean+covariance: ∂L/∂η1 = ∂L/∂m − 2Gm, ∂L/∂η2 = G).
  std::mt19937 rng(6);
  auto block = MakeBlock(Options(P::kMeanCovariance, 1));
  GaussianStepInput xi = RandomInput(P::kMeanCovariance, 1, &rng, Space::kParametrization);
  GaussianStepInput eta = xi;
  const MatrixXd g = 0.5 * (xi.grad2[0] + xi.grad2[0].transpose());
  eta.gradient_space = Space::kExpectation;
  eta.grad1[0] = xi.grad1[0] - 2 * g * xi.param1[0];
  auto a = block->Propose(xi, Ctx(1));
  auto b = block->Propose(eta, Ctx(1));
  ASSERT_TRUE(a.ok() && b.ok());
  const auto ga = GaussianOf((*a)->Commit(1));
  const auto gb = GaussianOf((*b)->Commit(1));
  EXPECT_LT(MaxAbsDiff(ga.param1[0], gb.param1[0]), 1e-12);
  EXPECT_LT(MaxAbsDiff(ga.param2[0], gb.param2[0]), 1e-12);
}

TEST(GaussianBlockStateTest, ExportImportRoundTrip) {
  std::mt19937 rng(7);
  auto block = MakeBlock(Options(P::kMeanCholesky));
  for (int t = 1; t <= 3; ++t) {
    auto pending = block->Propose(RandomInput(P::kMeanCholesky, 2, &rng), Ctx(t));
    ASSERT_TRUE(pending.ok()) << pending.status();
    (*pending)->Commit(1);
  }
  const BlockState state = block->ExportState();
  EXPECT_EQ(state.scalars.at("steps"), 3);
  EXPECT_EQ(state.scalars.at("gamma_used"), 0.5);
  EXPECT_GT(block->StateBytes(), 0);
  auto other = MakeBlock(Options(P::kMeanCholesky));
  ASSERT_TRUE(other->ImportState(state).ok());
  EXPECT_EQ(other->ExportState().scalars, state.scalars);
}

TEST(GaussianBlockStateTest, ImportRejectsNonsenseAndKeepsState) {
  auto block = MakeBlock(Options(P::kMeanCovariance));
  BlockState good;
  good.scalars = {{"steps", 5}, {"gamma_used", 0.25}, {"halvings", 2}};
  ASSERT_TRUE(block->ImportState(good).ok());
  std::vector<BlockState> bad(5);
  bad[0].scalars = {{"steps", -1}};
  bad[1].scalars = {{"steps", 1.5}};
  bad[2].scalars = {{"gamma_used", std::numeric_limits<double>::quiet_NaN()}};
  bad[3].scalars = {{"momentum", 0.9}};
  bad[4].tensors["theta"] = MatrixXd::Zero(2, 2);
  for (const BlockState& s : bad) {
    const absl::Status status = block->ImportState(s);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(status.message()), HasSubstr("block \"q_u\""));
    EXPECT_EQ(block->ExportState().scalars, good.scalars);
  }
}

}  // namespace
}  // namespace natgrad::core

namespace natgrad::core {
namespace {

using ::natgrad::core::testing::GaussianOf;

// Copies run side by side on a compute pool: each copy's arithmetic is the
// same as on one thread, so the step is bit-for-bit the sequential one.
TEST(GaussianBlockPoolTest, PoolGivesTheSequentialStepExactly) {
  linalg::ComputePool pool(3);
  constexpr int kCopies = 9;
  for (P p : AllParametrizations()) {
    for (Precision precision : {Precision::kFloat64, Precision::kFloat32}) {
      std::mt19937 rng(11);
      const GaussianStepInput in = RandomInput(p, kCopies, &rng);
      auto alone = MakeBlock(Options(p, kCopies), precision);
      auto pooled = MakeBlock(Options(p, kCopies), precision);
      StepContext ctx = Ctx(1);
      auto want = alone->Propose(in, ctx);
      ctx.compute_pool = &pool;
      auto got = pooled->Propose(in, ctx);
      ASSERT_TRUE(want.ok()) << want.status();
      ASSERT_TRUE(got.ok()) << got.status();
      const BlockStepOutput w = (*want)->Commit(1), g = (*got)->Commit(1);
      for (int c = 0; c < kCopies; ++c) {
        EXPECT_EQ(GaussianOf(g).param1[c], GaussianOf(w).param1[c]) << c;
        EXPECT_EQ(GaussianOf(g).param2[c], GaussianOf(w).param2[c]) << c;
      }
      EXPECT_EQ(g.hyperparameters, w.hyperparameters);
    }
  }
}

// With several bad copies the error names the first, pool or not.
TEST(GaussianBlockPoolTest, ReportsTheFirstBadCopyOnAPool) {
  linalg::ComputePool pool(3);
  constexpr int kCopies = 9;
  for (int trial = 0; trial < 20; ++trial) {
    std::mt19937 rng(12 + trial);
    GaussianStepInput in = RandomInput(P::kMeanCovariance, kCopies, &rng);
    in.param2[3] = -MatrixXd::Identity(kDim, kDim);
    in.param2[7] = -MatrixXd::Identity(kDim, kDim);
    auto block = MakeBlock(Options(P::kMeanCovariance, kCopies));
    StepContext ctx = Ctx(1);
    ctx.compute_pool = &pool;
    auto pending = block->Propose(in, ctx);
    ASSERT_FALSE(pending.ok());
    EXPECT_THAT(std::string(pending.status().message()),
                HasSubstr("gaussian.param2[3] is not positive definite"));
  }
}

}  // namespace
}  // namespace natgrad::core
