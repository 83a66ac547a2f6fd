// Tests of the K-FAC dense block against independent oracles: explicit
// Kronecker products, least squares, hand-written EMA recurrences.
#include "server/blocks/kfac_dense/math/kfac_dense_block.h"

#include <cmath>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "Eigen/Cholesky"
#include "Eigen/Eigenvalues"
#include "Eigen/QR"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/engine/testing/eigen_inversion_engine.h"

namespace natgrad::core {
namespace {

using ::testing::HasSubstr;
using Eigen::MatrixXd;
using Eigen::VectorXd;
using testing::EigenInversionEngine;

SchedulePtr C(double v) { return ConstantSchedule(v); }

// --- Oracles -----------------------------------------------------------

MatrixXd RandomMatrix(int rows, int cols, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> normal;
  MatrixXd m(rows, cols);
  for (int j = 0; j < cols; ++j)
    for (int i = 0; i < rows; ++i) m(i, j) = normal(rng);
  return m;
}

// sum_i xbar_i xbar_i^T / divisor, one outer product at a time.
MatrixXd OracleGram(const MatrixXd& x, bool bias, double divisor) {
  const int d = x.cols() + (bias ? 1 : 0);
  MatrixXd sum = MatrixXd::Zero(d, d);
  for (int i = 0; i < x.rows(); ++i) {
    VectorXd row(d);
    row.head(x.cols()) = x.row(i).transpose();
    if (bias) row(d - 1) = 1;
    sum += row * row.transpose();
  }
  return sum / divisor;
}

MatrixXd Kron(const MatrixXd& a, const MatrixXd& b) {
  MatrixXd k(a.rows() * b.rows(), a.cols() * b.cols());
  for (int i = 0; i < a.rows(); ++i)
    for (int j = 0; j < a.cols(); ++j)
      k.block(i * b.rows(), j * b.cols(), b.rows(), b.cols()) = a(i, j) * b;
  return k;
}

VectorXd Vec(const MatrixXd& x) {  // column-major
  return Eigen::Map<const VectorXd>(x.data(), x.size());
}
MatrixXd Unvec(const VectorXd& v, int rows, int cols) {
  return Eigen::Map<const MatrixXd>(v.data(), rows, cols);
}

// vec(G X A) = (A (x) G) vec(X): (A (x) G + lambda I)^-1 vec(grad).
MatrixXd ExactOracle(const MatrixXd& a, const MatrixXd& g, const MatrixXd& grad,
                     double lambda) {
  MatrixXd f = Kron(a, g);
  f.diagonal().array() += lambda;
  return Unvec(f.ldlt().solve(Vec(grad)), grad.rows(), grad.cols());
}

// ((A + pi sqrt(l) I) (x) (G + sqrt(l)/pi I))^-1 vec(grad).
MatrixXd FactoredOracle(const MatrixXd& a, const MatrixXd& g,
                        const MatrixXd& grad, double lambda) {
  const double pi =
      std::sqrt((a.trace() / a.rows()) / (g.trace() / g.rows()));
  MatrixXd ad = a, gd = g;
  ad.diagonal().array() += pi * std::sqrt(lambda);
  gd.diagonal().array() += std::sqrt(lambda) / pi;
  return Unvec(Kron(ad, gd).ldlt().solve(Vec(grad)), grad.rows(), grad.cols());
}

MatrixXd Oracle(KfacDampingMode mode, const MatrixXd& a, const MatrixXd& g,
                const MatrixXd& grad, double lambda) {
  return mode == KfacDampingMode::kEigenExact
             ? ExactOracle(a, g, grad, lambda)
             : FactoredOracle(a, g, grad, lambda);
}

double RelErr(const MatrixXd& x, const MatrixXd& y) {
  return (x - y).norm() / std::max(1e-300, y.norm());
}

// --- Harness -----------------------------------------------------------

constexpr int kDin = 3, kDout = 2, kRows = 7;

struct StepData {
  MatrixXd a, g, grad;
};

StepData MakeStep(uint32_t seed, int d_in = kDin, int d_out = kDout,
                  int rows = kRows, bool bias = true) {
  StepData s;
  s.a = RandomMatrix(rows, d_in, seed);
  s.g = RandomMatrix(rows, d_out, seed + 1000);
  s.grad = RandomMatrix(d_out, d_in + (bias ? 1 : 0), seed + 2000);
  return s;
}

KfacStepInput RawInput(const StepData& s) {
  KfacStepInput in;
  in.gradient = s.grad;
  KfacStatisticsInput k;
  k.form = KfacStatisticsInput::Form::kRaw;
  k.activations = s.a;
  k.output_gradients = s.g;
  in.kfac = k;
  return in;
}

KfacStepInput ReducedInput(const MatrixXd& a_factor, const MatrixXd& g_factor,
                            const MatrixXd& grad, int64_t n) {
  KfacStepInput in;
  in.gradient = grad;
  KfacStatisticsInput k;
  k.form = KfacStatisticsInput::Form::kReduced;
  k.a_factor = a_factor;
  k.g_factor = g_factor;
  k.num_examples = n;
  in.kfac = k;
  return in;
}

KfacDenseOptions Options(KfacDampingMode mode, double lambda) {
  KfacDenseOptions o;
  o.d_in = kDin;
  o.d_out = kDout;
  o.has_bias = true;
  o.learning_rate = C(1.0);
  o.damping = C(lambda);
  o.damping_mode = mode;
  o.inverse_period = 1;
  return o;
}

struct Harness {
  explicit Harness(const KfacDenseOptions& o,
                   Precision p = Precision::kFloat64, bool lazy = false,
                   std::string name = "fc1")
      : engine(lazy) {
    auto b = NewKfacDenseBlock(std::move(name), o, p);
    EXPECT_TRUE(b.ok()) << b.status();
    block = *std::move(b);
  }
  absl::StatusOr<std::unique_ptr<PendingBlockUpdate>> Propose(
      int64_t t, const KfacStepInput& in,
      std::optional<double> damping_override = std::nullopt) {
    StepContext ctx;
    ctx.step = t;
    ctx.engine = &engine;
    ctx.damping_override = damping_override;
    return block->Propose(in, ctx);
  }
  BlockStepOutput Step(int64_t t, const KfacStepInput& in, double nu = 1.0,
                       std::optional<double> damping_override = std::nullopt) {
    auto p = Propose(t, in, damping_override);
    EXPECT_TRUE(p.ok()) << p.status();
    if (!p.ok()) return {};
    return (*p)->Commit(nu);
  }
  EigenInversionEngine engine;
  std::unique_ptr<ParameterBlock> block;
};

const KfacDampingMode kModes[] = {KfacDampingMode::kEigenExact,
                                  KfacDampingMode::kFactoredTikhonov};

void ExpectSameState(const BlockState& x, const BlockState& y) {
  ASSERT_EQ(x.scalars, y.scalars);
  ASSERT_EQ(x.tensors.size(), y.tensors.size());
  for (const auto& [k, v] : x.tensors) {
    ASSERT_TRUE(y.tensors.contains(k)) << k;
    EXPECT_TRUE(v == y.tensors.at(k)) << k;
  }
}

// --- Tests -------------------------------------------------------------

TEST(KfacDenseBlock, OneStepMatchesKroneckerOracle) {
  for (KfacDampingMode mode : kModes) {
    SCOPED_TRACE(static_cast<int>(mode));
    const double lambda = 0.1;
    Harness h(Options(mode, lambda));
    StepData s = MakeStep(1);
    BlockStepOutput out = h.Step(1, RawInput(s));
    const MatrixXd a = OracleGram(s.a, true, kRows);
    const MatrixXd g = OracleGram(s.g, false, kRows);
    EXPECT_LT(RelErr(-out.delta.ToMatrix<double>(), Oracle(mode, a, g, s.grad, lambda)), 1e-10);
  }
}

TEST(KfacDenseBlock, NewtonStepSolvesLeastSquares) {
  // y = W xbar with loss mean 1/2 |W xbar - y|^2: the Hessian is A (x) I and
  // a Gaussian output's Fisher has G = I, so K-FAC is exact and one step
  // with lr 1 lands on the least-squares solution.
  const int n = 40;
  const MatrixXd x = RandomMatrix(n, kDin, 11);
  const MatrixXd y = RandomMatrix(n, kDout, 12);
  MatrixXd xbar(n, kDin + 1);
  xbar << x, VectorXd::Ones(n);
  const MatrixXd w0 = RandomMatrix(kDout, kDin + 1, 13);
  const MatrixXd residual = xbar * w0.transpose() - y;  // per-example dL/dy
  const MatrixXd grad = residual.transpose() * xbar / n;
  const MatrixXd w_star =
      xbar.colPivHouseholderQr().solve(y).transpose();  // independent oracle
  for (KfacDampingMode mode : kModes) {
    SCOPED_TRACE(static_cast<int>(mode));
    // Factored damping perturbs both factors by ~sqrt(lambda).
    Harness h(Options(mode, mode == KfacDampingMode::kEigenExact ? 1e-12 : 1e-18));
    BlockStepOutput out = h.Step(
        1, ReducedInput(xbar.transpose() * xbar / n,
                        MatrixXd::Identity(kDout, kDout), grad, n));
    EXPECT_LT(RelErr(w0 + out.delta.ToMatrix<double>(), w_star), 1e-7);
  }
}

TEST(KfacDenseBlock, RawAndReducedStatisticsGiveIdenticalUpdates) {
  for (KfacDampingMode mode : kModes) {
    KfacDenseOptions o = Options(mode, 0.05);
    o.momentum = C(0.9);
    o.inverse_period = 2;
    Harness raw(o), reduced(o);
    for (int t = 1; t <= 4; ++t) {
      StepData s = MakeStep(100 + t);
      BlockStepOutput r = raw.Step(t, RawInput(s));
      BlockStepOutput q = reduced.Step(
          t, ReducedInput(OracleGram(s.a, true, kRows),
                          OracleGram(s.g, false, kRows), s.grad, kRows));
      EXPECT_LT(RelErr(r.delta.ToMatrix<double>(), q.delta.ToMatrix<double>()), 1e-12) << "step " << t;
    }
  }
}

TEST(KfacDenseBlock, Float32CloseToFloat64) {
  for (KfacDampingMode mode : kModes) {
    KfacDenseOptions o = Options(mode, 0.05);
    o.momentum = C(0.5);
    o.inverse_period = 2;
    Harness f32(o, Precision::kFloat32), f64(o, Precision::kFloat64);
    for (int t = 1; t <= 4; ++t) {
      StepData s = MakeStep(200 + t);
      BlockStepOutput x = f32.Step(t, RawInput(s));
      BlockStepOutput y = f64.Step(t, RawInput(s));
      EXPECT_LT(RelErr(x.delta.ToMatrix<double>(), y.delta.ToMatrix<double>()), 1e-4) << "step " << t;
    }
  }
}

TEST(KfacDenseBlock, EmaStartsAtZeroWithBiasCorrection) {
  KfacDenseOptions o = Options(KfacDampingMode::kEigenExact, 0.1);
  o.ema_decay = 0.8;
  Harness h(o);
  StepData s1 = MakeStep(1), s2 = MakeStep(2);
  const MatrixXd a1 = OracleGram(s1.a, true, kRows);
  const MatrixXd a2 = OracleGram(s2.a, true, kRows);
  const MatrixXd g1 = OracleGram(s1.g, false, kRows);
  const MatrixXd g2 = OracleGram(s2.g, false, kRows);

  h.Step(1, RawInput(s1));
  BlockState st = h.block->ExportState();
  EXPECT_NEAR(st.scalars["ema_weight"], 0.2, 1e-15);
  // Step 1's factor is exactly its batch factor, not 0.2 of it.
  EXPECT_LT(RelErr(st.tensors["a_ema"] / st.scalars["ema_weight"], a1), 1e-12);

  h.Step(2, RawInput(s2));
  st = h.block->ExportState();
  EXPECT_NEAR(st.scalars["ema_weight"], 1 - 0.8 * 0.8, 1e-15);
  EXPECT_EQ(st.scalars["stats_updates"], 2);
  EXPECT_LT(RelErr(st.tensors["a_ema"] / st.scalars["ema_weight"],
                   (0.8 * a1 + a2) / 1.8),
            1e-12);
  EXPECT_LT(RelErr(st.tensors["g_ema"] / st.scalars["ema_weight"],
                   (0.8 * g1 + g2) / 1.8),
            1e-12);
}

TEST(KfacDenseBlock, StatisticsOnlyEveryStatsPeriod) {
  KfacDenseOptions o = Options(KfacDampingMode::kEigenExact, 0.1);
  o.stats_period = 2;
  Harness h(o);
  StepData s1 = MakeStep(1), s2 = MakeStep(2), s3 = MakeStep(3);
  h.Step(1, RawInput(s1));
  const BlockState after1 = h.block->ExportState();
  h.Step(2, RawInput(s2));  // sent but not folded
  BlockState after2 = h.block->ExportState();
  EXPECT_TRUE(after2.tensors["a_ema"] == after1.tensors.at("a_ema"));
  EXPECT_EQ(after2.scalars["stats_updates"], 1);
  KfacStepInput no_stats;
  no_stats.gradient = s3.grad;
  auto p = h.Propose(3, no_stats);
  ASSERT_FALSE(p.ok());
  EXPECT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(p.status().message(), HasSubstr("kfac statistics are missing"));
  // Step 4 needs none.
  h.Step(3, RawInput(s3));
  no_stats.gradient = MakeStep(4).grad;
  EXPECT_TRUE(h.Propose(4, no_stats).ok());
}

// Oracle running factor after folding the batch factors in `batches`.
std::pair<MatrixXd, MatrixXd> OracleEma(const std::vector<StepData>& steps,
                                        double rho, int upto) {
  MatrixXd a = MatrixXd::Zero(kDin + 1, kDin + 1), g = MatrixXd::Zero(kDout, kDout);
  double w = 0;
  for (int k = 0; k < upto; ++k) {
    a = rho * a + (1 - rho) * OracleGram(steps[k].a, true, kRows);
    g = rho * g + (1 - rho) * OracleGram(steps[k].g, false, kRows);
    w = rho * w + (1 - rho);
  }
  return {a / w, g / w};
}

TEST(KfacDenseBlock, InversePeriodReusesStaleDecomposition) {
  for (KfacDampingMode mode : kModes) {
    SCOPED_TRACE(static_cast<int>(mode));
    KfacDenseOptions o = Options(mode, 0.1);
    o.inverse_period = 3;
    Harness h(o);
    std::vector<StepData> steps;
    for (int t = 1; t <= 4; ++t) steps.push_back(MakeStep(300 + t));
    // Step 2 changes lambda: eigen mode uses it at once, the factored
    // inverses keep the lambda of their refresh (step 1).
    const double lambdas[] = {0.1, 0.4, 0.1, 0.2};
    for (int t = 1; t <= 4; ++t) {
      // Synchronous refreshes: the engine is used (and waited for) exactly
      // when the block says it may be.
      const bool may = h.block->MayWaitForEngine(t);
      const int submitted_before = h.engine.submitted();
      BlockStepOutput out =
          h.Step(t, RawInput(steps[t - 1]), 1.0, lambdas[t - 1]);
      EXPECT_EQ(may, h.engine.submitted() > submitted_before) << "step " << t;
      const int decomposed = t < 4 ? 1 : 4;
      auto [a, g] = OracleEma(steps, 0.95, decomposed);
      const double lambda = mode == KfacDampingMode::kEigenExact
                                ? lambdas[t - 1]
                                : lambdas[decomposed - 1];
      EXPECT_LT(RelErr(-out.delta.ToMatrix<double>(),
                       Oracle(mode, a, g, steps[t - 1].grad, lambda)),
                1e-10)
          << "step " << t;
      EXPECT_EQ(h.engine.submitted(), t < 4 ? 2 : 4);
      EXPECT_EQ(h.block->ExportState().scalars["decomposition_step"],
                decomposed);
    }
  }
}

TEST(KfacDenseBlock, ConvolutionScalingFollowsKfacJax) {
  // n = 4 examples, T = 3 locations: A = sum abar abar^T / n (bias entry T),
  // G = sum g g^T / (n T).
  const int n = 4, T = 3;
  KfacDenseOptions o = Options(KfacDampingMode::kEigenExact, 0.1);
  o.locations = T;
  Harness h(o);
  StepData s = MakeStep(7, kDin, kDout, n * T);
  BlockStepOutput out = h.Step(1, RawInput(s));
  const MatrixXd a = OracleGram(s.a, true, n);
  const MatrixXd g = OracleGram(s.g, false, n * T);
  EXPECT_LT(RelErr(-out.delta.ToMatrix<double>(), ExactOracle(a, g, s.grad, 0.1)), 1e-10);
  BlockState st = h.block->ExportState();
  EXPECT_NEAR(st.tensors["a_ema"](kDin, kDin) / st.scalars["ema_weight"], T,
              1e-12);

  // Rows must come in whole examples.
  StepData bad = MakeStep(8, kDin, kDout, n * T - 1);
  auto p = h.Propose(2, RawInput(bad));
  ASSERT_FALSE(p.ok());
  EXPECT_THAT(p.status().message(), HasSubstr("multiple of locations (3)"));
}

TEST(KfacDenseBlock, KlTermCommitScaleAndHyperparameters) {
  for (KfacDampingMode mode : kModes) {
    KfacDenseOptions o = Options(mode, 0.1);
    o.learning_rate = C(0.3);
    o.momentum = C(0.25);
    o.weight_decay = C(0.0);
    Harness h(o);
    StepData s = MakeStep(21);
    const MatrixXd v = Oracle(mode, OracleGram(s.a, true, kRows),
                              OracleGram(s.g, false, kRows), s.grad, 0.1);
    auto p = h.Propose(1, RawInput(s));
    ASSERT_TRUE(p.ok()) << p.status();
    ASSERT_NE((*p)->curvature(), nullptr);
    EXPECT_NEAR((*p)->curvature()->KlTerm(), 0.09 * (v.array() * s.grad.array()).sum(),
                1e-12);
    BlockStepOutput out = (*p)->Commit(0.4);
    EXPECT_LT(RelErr(out.delta.ToMatrix<double>(), -0.3 * 0.4 * v), 1e-10);
    EXPECT_EQ(out.hyperparameters.at("learning_rate"), 0.3);
    EXPECT_EQ(out.hyperparameters.at("damping"), 0.1);
    EXPECT_EQ(out.hyperparameters.at("momentum"), 0.25);
    EXPECT_EQ(out.hyperparameters.at("weight_decay"), 0.0);
    EXPECT_EQ(out.hyperparameters.at("kl_scale"), 0.4);
  }
}

TEST(KfacDenseBlock, MomentumAndWeightDecay) {
  KfacDenseOptions o = Options(KfacDampingMode::kEigenExact, 0.1);
  o.learning_rate = C(0.5);
  o.momentum = C(0.9);
  o.weight_decay = C(0.01);
  o.inverse_period = 10;
  Harness h(o);
  StepData s1 = MakeStep(31), s2 = MakeStep(32);
  const MatrixXd a = OracleGram(s1.a, true, kRows);
  const MatrixXd g = OracleGram(s1.g, false, kRows);
  const MatrixXd w = RandomMatrix(kDout, kDin + 1, 33);

  KfacStepInput in1 = RawInput(s1);  // no params: no weight decay
  h.Step(1, in1, 0.7);
  const MatrixXd m1 = 0.7 * ExactOracle(a, g, s1.grad, 0.1);

  KfacStepInput in2 = RawInput(s2);
  in2.params = w;
  BlockStepOutput out = h.Step(2, in2, 0.6);
  const MatrixXd v2 = ExactOracle(a, g, s2.grad + 0.01 * w, 0.1);  // stale
  EXPECT_LT(RelErr(out.delta.ToMatrix<double>(), -0.5 * (0.9 * m1 + 0.6 * v2)), 1e-10);
}

TEST(KfacDenseBlock, PredictedReductionIsTheQuadraticModel) {
  for (KfacDampingMode mode : kModes) {
    KfacDenseOptions o = Options(mode, 0.2);
    o.learning_rate = C(0.7);
    o.momentum = C(0.5);
    o.inverse_period = 1;
    Harness h(o);
    std::vector<StepData> steps = {MakeStep(41), MakeStep(42)};
    h.Step(1, RawInput(steps[0]), 0.8);
    auto p = h.Propose(2, RawInput(steps[1]));
    ASSERT_TRUE(p.ok());
    auto [a, g] = OracleEma(steps, 0.95, 2);
    const double nu = 0.6;
    const double predicted = (*p)->curvature()->PredictedReduction(nu);
    BlockStepOutput out = (*p)->Commit(nu);
    // The session may ask before or after committing.
    EXPECT_EQ((*p)->curvature()->PredictedReduction(nu), predicted);
    const VectorXd d = Vec(out.delta.ToMatrix<double>());
    MatrixXd f = Kron(a, g);
    f.diagonal().array() += 0.2;
    const double model = Vec(steps[1].grad).dot(d) + 0.5 * d.dot(f * d);
    EXPECT_NEAR(predicted, model, 1e-10 * std::abs(model));
  }
}

TEST(KfacDenseBlock, BadInputsAreRejectedAndChangeNothing) {
  KfacDenseOptions o = Options(KfacDampingMode::kFactoredTikhonov, 0.1);
  o.momentum = C(0.9);
  Harness h(o);
  h.Step(1, RawInput(MakeStep(51)));
  const BlockState before = h.block->ExportState();
  const StepData good = MakeStep(52);
  const MatrixXd a_good = OracleGram(good.a, true, kRows);
  const MatrixXd g_good = OracleGram(good.g, false, kRows);

  struct Case {
    std::string name;
    std::function<void(KfacStepInput&, std::optional<double>&, int64_t&)> mutate;
    std::string message;
  };
  auto reduced = [&](KfacStepInput& in) {
    in = ReducedInput(a_good, g_good, good.grad, kRows);
  };
  const double nan = std::nan("");
  std::vector<Case> cases = {
      {"gradient shape", [](auto& in, auto&, auto&) { in.gradient = MatrixXd::Zero(2, 3); },
       "gradient has shape [2, 3], want [2, 4]"},
      {"gradient nan", [&](auto& in, auto&, auto&) { MatrixXd m = good.grad; m(1, 2) = nan; in.gradient = m; },
       "gradient has a non-finite value (nan) at [1, 2]"},
      {"params shape", [](auto& in, auto&, auto&) { in.params = MatrixXd::Zero(3, 4); },
       "params has shape [3, 4], want [2, 4]"},
      {"params inf", [](auto& in, auto&, auto&) {
         MatrixXd m = MatrixXd::Zero(2, 4);
         m(0, 0) = INFINITY;
         in.params = m;
       }, "params has a non-finite value"},
      {"activation columns", [](auto& in, auto&, auto&) {
         in.kfac->activations = MatrixXd::Zero(kRows, 7);
       }, "kfac.raw.activations has 7 columns, want 3"},
      {"output gradient columns", [](auto& in, auto&, auto&) {
         in.kfac->output_gradients = MatrixXd::Zero(kRows, 5);
       }, "kfac.raw.output_gradients has 5 columns, want 2"},
      {"row mismatch", [](auto& in, auto&, auto&) {
         in.kfac->output_gradients = MatrixXd::Zero(kRows - 1, kDout);
       }, "kfac.raw.output_gradients has 6 rows, want 7"},
      {"zero rows", [](auto& in, auto&, auto&) {
         in.kfac->activations = MatrixXd::Zero(0, kDin);
         in.kfac->output_gradients = MatrixXd::Zero(0, kDout);
       }, "kfac.raw.activations has 0 rows"},
      {"activation nan", [&](auto& in, auto&, auto&) { MatrixXd m = good.a; m(3, 1) = nan; in.kfac->activations = m; },
       "kfac.raw.activations has a non-finite value"},
      {"output gradient inf", [&](auto& in, auto&, auto&) {
         MatrixXd m = good.g;
         m(0, 0) = -INFINITY;
         in.kfac->output_gradients = m;
       }, "kfac.raw.output_gradients has a non-finite value"},
      {"stats missing", [](auto& in, auto&, auto&) { in.kfac.reset(); },
       "kfac statistics are missing"},
      {"reduced n", [&](auto& in, auto&, auto&) {
         reduced(in);
         in.kfac->num_examples = 0;
       }, "kfac.reduced.num_examples is 0, want > 0"},
      {"reduced shape", [&](auto& in, auto&, auto&) {
         reduced(in);
         in.kfac->a_factor = MatrixXd::Identity(3, 3);
       }, "kfac.reduced.a_factor has shape [3, 3], want [4, 4]"},
      {"reduced asymmetric", [&](auto& in, auto&, auto&) {
         reduced(in);
         MatrixXd m = a_good;
         m(0, 1) += 0.5;
         in.kfac->a_factor = m;
       }, "kfac.reduced.a_factor is not symmetric"},
      {"reduced negative diagonal", [&](auto& in, auto&, auto&) {
         reduced(in);
         MatrixXd m = MatrixXd::Identity(2, 2);
         m(1, 1) = -1;
         in.kfac->g_factor = m;
       }, "kfac.reduced.g_factor has a negative diagonal entry"},
      {"reduced indefinite", [&](auto& in, auto&, auto&) {
         reduced(in);
         MatrixXd m(2, 2);
         m << 1, 2, 2, 1;
         in.kfac->g_factor = m;
       }, "kfac.reduced.g_factor is not positive semidefinite"},
      {"reduced nan", [&](auto& in, auto&, auto&) {
         reduced(in);
         MatrixXd m = a_good;
         m(2, 2) = nan;
         in.kfac->a_factor = m;
       }, "kfac.reduced.a_factor has a non-finite value"},
      {"negative damping override", [](auto&, auto& d, auto&) { d = -1e-3; },
       "damping_override is -0.001 at step 2, want > 0"},
      {"zero damping override", [](auto&, auto& d, auto&) { d = 0.0; },
       "damping_override is 0"},
      {"step 0", [](auto&, auto&, auto& t) { t = 0; }, "step is 0, want >= 1"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    KfacStepInput in = RawInput(good);
    std::optional<double> damping;
    int64_t t = 2;
    c.mutate(in, damping, t);
    auto p = h.Propose(t, in, damping);
    ASSERT_FALSE(p.ok());
    EXPECT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(p.status().message(), HasSubstr("block \"fc1\": "));
    EXPECT_THAT(p.status().message(), HasSubstr(c.message));
    ExpectSameState(before, h.block->ExportState());
  }
  // A proposal that is dropped changes nothing either.
  { auto p = h.Propose(2, RawInput(good)); ASSERT_TRUE(p.ok()); }
  ExpectSameState(before, h.block->ExportState());
  // Old step numbers are the session's bug, not the client's.
  auto p = h.Propose(1, RawInput(good));
  EXPECT_EQ(p.status().code(), absl::StatusCode::kFailedPrecondition);
}

TEST(KfacDenseBlock, BadScheduleValuesAndFloatRange) {
  KfacDenseOptions o = Options(KfacDampingMode::kEigenExact, -0.5);
  Harness neg_damping(o);
  auto p = neg_damping.Propose(1, RawInput(MakeStep(61)));
  ASSERT_FALSE(p.ok());
  EXPECT_THAT(p.status().message(),
              HasSubstr("block \"fc1\": damping is -0.5 at step 1, want > 0"));

  o = Options(KfacDampingMode::kEigenExact, 0.1);
  o.learning_rate = C(std::nan(""));
  Harness nan_lr(o);
  p = nan_lr.Propose(1, RawInput(MakeStep(61)));
  ASSERT_FALSE(p.ok());
  EXPECT_THAT(p.status().message(), HasSubstr("learning_rate is nan"));

  Harness f32(Options(KfacDampingMode::kEigenExact, 0.1), Precision::kFloat32);
  const StepData big = MakeStep(62);
  KfacStepInput in = RawInput(big);
  MatrixXd huge = big.grad;
  huge(0, 0) = 1e300;
  in.gradient = huge;
  p = f32.Propose(1, in);
  ASSERT_FALSE(p.ok());
  EXPECT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(p.status().message(), HasSubstr("gradient has values beyond float32"));
}

// Issue 11: a delta or momentum that would overflow is refused in Propose
// (for every KL scale Commit may apply), and the block is unchanged.
TEST(KfacDenseBlock, NonFiniteDeltaOrMomentumIsRefusedAndChangesNothing) {
  for (KfacDampingMode mode : kModes) {
    KfacDenseOptions o = Options(mode, 0.1);
    o.learning_rate = C(1e308);
    Harness h(o);
    const BlockState before = h.block->ExportState();
    auto p = h.Propose(1, RawInput(MakeStep(63)));
    ASSERT_FALSE(p.ok());
    EXPECT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(p.status().message(), HasSubstr("block \"fc1\": delta would be non-finite"));
    ExpectSameState(before, h.block->ExportState());

    // Momentum at or above 1 from a schedule is refused at that step.
    KfacDenseOptions m = Options(mode, 0.1);
    m.momentum = C(1.0);
    Harness hm(m);
    p = hm.Propose(1, RawInput(MakeStep(64)));
    ASSERT_FALSE(p.ok());
    EXPECT_THAT(p.status().message(), HasSubstr("momentum is 1 at step 1, want in [0, 1)"));

    // A float64 block answering a float32 client: beyond float32's range.
    KfacDenseOptions f = Options(mode, 0.1);
    f.learning_rate = C(1e200);
    Harness hf(f);
    const StepData step = MakeStep(65);
    KfacStepInput in = RawInput(step);
    const Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> rm =
        step.grad.cast<float>();
    in.gradient = DenseTensor::FromBytes(
        DType::kFloat32, {rm.rows(), rm.cols()},
        std::string(reinterpret_cast<const char*>(rm.data()), rm.size() * sizeof(float)));
    p = hf.Propose(1, in);
    ASSERT_FALSE(p.ok());
    EXPECT_THAT(p.status().message(), HasSubstr("delta would overflow float32"));
  }
}

TEST(KfacDenseBlock, OptionsAreValidatedAndDefaulted) {
  struct Case {
    std::function<void(KfacDenseOptions&)> mutate;
    std::string message;
  };
  const std::vector<Case> cases = {
      {[](auto& o) { o.d_in = 0; }, "kfac_dense.d_in is 0"},
      {[](auto& o) { o.d_out = -3; }, "kfac_dense.d_out is -3"},
      {[](auto& o) { o.d_out = kKfacMaxFactorDim + 1; }, "kfac_dense.d_out is"},
      {[](auto& o) { o.ema_decay = 1.0; }, "kfac_dense.ema_decay is 1"},
      {[](auto& o) { o.ema_decay = -0.1; }, "kfac_dense.ema_decay is -0.1"},
      {[](auto& o) { o.inverse_period = -1; }, "kfac_dense.inverse_period is -1"},
      {[](auto& o) { o.stats_period = -2; }, "kfac_dense.stats_period is -2"},
      {[](auto& o) { o.locations = -1; }, "kfac_dense.locations is -1"},
      {[](auto& o) { o.damping_mode = static_cast<KfacDampingMode>(7); },
       "kfac_dense.damping_mode is 7"},
      {[](auto& o) {
         o.async_inversion = true;
         o.inverse_period = 2;
         o.max_staleness = 3;
       }, "kfac_dense.max_staleness is 3, want <= inverse_period (2)"},
  };
  for (const Case& c : cases) {
    KfacDenseOptions o = Options(KfacDampingMode::kEigenExact, 0.1);
    c.mutate(o);
    auto b = NewKfacDenseBlock("conv2", o, Precision::kFloat32);
    ASSERT_FALSE(b.ok()) << c.message;
    EXPECT_EQ(b.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(b.status().message(), HasSubstr("block \"conv2\": " + c.message));
  }

  KfacDenseOptions o;
  o.d_in = 4;
  o.d_out = 5;
  o.ema_decay = 0;
  o.inverse_period = 0;
  o.stats_period = 0;
  o.locations = 0;
  o.async_inversion = true;
  auto b = NewKfacDenseBlock("x", o, Precision::kFloat32);
  ASSERT_TRUE(b.ok());
  auto* block = dynamic_cast<KfacDenseBlock<float>*>(b->get());
  ASSERT_NE(block, nullptr);
  EXPECT_EQ((*b)->kind(), "kfac_dense");
  const KfacDenseOptions& n = block->options();
  EXPECT_EQ(n.ema_decay, 0.95);
  EXPECT_EQ(n.inverse_period, 5);
  EXPECT_EQ(n.stats_period, 1);
  EXPECT_EQ(n.locations, 1);
  EXPECT_EQ(n.max_staleness, 5);
  EXPECT_EQ(n.learning_rate->Value(3), 0.1);
  EXPECT_EQ(n.damping->Value(3), 1e-3);
  EXPECT_EQ(n.momentum->Value(3), 0.0);
  EXPECT_EQ(n.weight_decay->Value(3), 0.0);
  EXPECT_EQ(n.damping_mode, KfacDampingMode::kFactoredTikhonov);
}

TEST(KfacDenseBlock, ExportImportRoundTripContinuesIdentically) {
  for (KfacDampingMode mode : kModes) {
    for (Precision p : {Precision::kFloat32, Precision::kFloat64}) {
      KfacDenseOptions o = Options(mode, 0.05);
      o.momentum = C(0.9);
      o.inverse_period = 3;
      Harness a(o, p), b(o, p);
      for (int t = 1; t <= 4; ++t) a.Step(t, RawInput(MakeStep(70 + t)));
      const BlockState exported = a.block->ExportState();
      ASSERT_TRUE(b.block->ImportState(exported).ok());
      ExpectSameState(exported, b.block->ExportState());
      EXPECT_EQ(a.block->StateBytes(), b.block->StateBytes());
      for (int t = 5; t <= 8; ++t) {
        StepData s = MakeStep(70 + t);
        BlockStepOutput x = a.Step(t, RawInput(s), 0.5);
        BlockStepOutput y = b.Step(t, RawInput(s), 0.5);
        EXPECT_TRUE(x.delta.ToMatrix<double>() == y.delta.ToMatrix<double>()) << "step " << t;
      }
    }
  }
}

TEST(KfacDenseBlock, ImportStateValidatesAndChangesNothingOnError) {
  Harness eig(Options(KfacDampingMode::kEigenExact, 0.1));
  Harness fac(Options(KfacDampingMode::kFactoredTikhonov, 0.1));
  eig.Step(1, RawInput(MakeStep(81)));
  fac.Step(1, RawInput(MakeStep(82)));
  const BlockState good = fac.block->ExportState();
  std::vector<std::pair<BlockState, std::string>> bad;
  bad.push_back({eig.block->ExportState(), "tensor \"a_eigenvalues\" is not expected"});
  BlockState s = good;
  s.tensors.erase("momentum");
  bad.push_back({s, "tensor \"momentum\" is missing"});
  s = good;
  s.tensors["a_ema"] = MatrixXd::Zero(3, 3);
  bad.push_back({s, "state tensor \"a_ema\" has shape [3, 3], want [4, 4]"});
  s = good;
  s.scalars["ema_weight"] = std::nan("");
  bad.push_back({s, "scalar \"ema_weight\" is nan"});
  s = good;
  s.scalars["last_step"] = 2.5;
  bad.push_back({s, "scalar \"last_step\" is 2.5"});
  s = good;
  s.tensors["g_damped_inverse"](0, 0) = INFINITY;
  bad.push_back({s, "g_damped_inverse\" has a non-finite value"});

  Harness target(Options(KfacDampingMode::kFactoredTikhonov, 0.1));
  target.Step(1, RawInput(MakeStep(83)));
  const BlockState before = target.block->ExportState();
  for (const auto& [state, message] : bad) {
    absl::Status st = target.block->ImportState(state);
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << message;
    EXPECT_THAT(st.message(), HasSubstr(message));
    ExpectSameState(before, target.block->ExportState());
  }
}

TEST(KfacDenseBlock, StateBytesCountsFactorsDecompositionsAndMomentum) {
  Harness h(Options(KfacDampingMode::kEigenExact, 0.1), Precision::kFloat32);
  const int a = kDin + 1, g = kDout;
  EXPECT_EQ(h.block->StateBytes(), 4 * (a * a + g * g + g * a));
  h.Step(1, RawInput(MakeStep(91)));
  EXPECT_EQ(h.block->StateBytes(),
            4 * (2 * a * a + 2 * g * g + g * a + a + g));
  KfacDenseOptions o = Options(KfacDampingMode::kEigenExact, 0.1);
  EXPECT_GE(KfacDenseStateBytes(o, Precision::kFloat32), h.block->StateBytes());
}

TEST(KfacDenseBlock, AsyncRefreshRespectsMaxStaleness) {
  // Lazy engine: a refresh computes only when the block waits for it.
  KfacDenseOptions o = Options(KfacDampingMode::kEigenExact, 0.1);
  o.inverse_period = 3;
  o.async_inversion = true;
  o.max_staleness = 2;
  Harness h(o, Precision::kFloat64, /*lazy=*/true);
  std::vector<StepData> steps;
  for (int t = 1; t <= 7; ++t) steps.push_back(MakeStep(400 + t));
  // Refreshes at 1 (waits: first), 4 (in flight at 4 and 5, waited for at
  // 6 = 4 + max_staleness) and 7 (in flight).
  const int used[] = {1, 1, 1, 1, 1, 4, 4};
  const int computed[] = {2, 2, 2, 2, 2, 4, 4};
  // The lazy engine computes only what a step waits for: MayWaitForEngine
  // (a session's cue to keep the block on the step's own thread) must be
  // true on those steps (1, 4: the first and overdue, 6), and it is false
  // at 2 and 3 (no refresh, none in flight).
  const bool may_wait[] = {true, false, false, true, true, true, true};
  for (int t = 1; t <= 7; ++t) {
    EXPECT_EQ(h.block->MayWaitForEngine(t), may_wait[t - 1]) << "step " << t;
    const int computed_before = h.engine.computed();
    BlockStepOutput out = h.Step(t, RawInput(steps[t - 1]));
    if (h.engine.computed() > computed_before) EXPECT_TRUE(may_wait[t - 1]) << "step " << t;
    auto [a, g] = OracleEma(steps, 0.95, used[t - 1]);
    EXPECT_LT(RelErr(-out.delta.ToMatrix<double>(), ExactOracle(a, g, steps[t - 1].grad, 0.1)),
              1e-10)
        << "step " << t;
    EXPECT_EQ(h.engine.computed(), computed[t - 1]) << "step " << t;
  }
  EXPECT_EQ(h.engine.submitted(), 6);

  // An eager engine's refresh is ready at once and used at its own step.
  Harness eager(o);
  for (int t = 1; t <= 4; ++t) {
    BlockStepOutput out = eager.Step(t, RawInput(steps[t - 1]));
    auto [a, g] = OracleEma(steps, 0.95, t < 4 ? 1 : 4);
    EXPECT_LT(RelErr(-out.delta.ToMatrix<double>(), ExactOracle(a, g, steps[t - 1].grad, 0.1)),
              1e-10);
  }
}

TEST(KfacDenseBlock, ExportWaitsForInFlightRefresh) {
  KfacDenseOptions o = Options(KfacDampingMode::kFactoredTikhonov, 0.1);
  o.inverse_period = 2;
  o.async_inversion = true;
  o.max_staleness = 2;
  Harness a(o, Precision::kFloat64, true), b(o, Precision::kFloat64, true);
  std::vector<StepData> steps;
  for (int t = 1; t <= 4; ++t) steps.push_back(MakeStep(500 + t));
  a.Step(1, RawInput(steps[0]));
  a.Step(2, RawInput(steps[1]));
  a.Step(3, RawInput(steps[2]));  // refresh submitted at 3, left in flight
  EXPECT_EQ(a.engine.computed(), 2);
  const BlockState st = a.block->ExportState();
  EXPECT_EQ(st.scalars.at("decomposition_step"), 3);
  ASSERT_TRUE(b.block->ImportState(st).ok());
  // Both continue with the step-3 decomposition.
  BlockStepOutput x = a.Step(4, RawInput(steps[3]));
  BlockStepOutput y = b.Step(4, RawInput(steps[3]));
  EXPECT_TRUE(x.delta.ToMatrix<double>() == y.delta.ToMatrix<double>());
  auto [af, gf] = OracleEma(steps, 0.95, 3);
  EXPECT_LT(RelErr(-x.delta.ToMatrix<double>(), FactoredOracle(af, gf, steps[3].grad, 0.1)), 1e-10);
}

// --- Packed factors and the PSD tests (issue 13) --------------------------

// A symmetric factor as the wire carries it in dtype T: the full row-major
// [d, d] matrix, or (packed) its upper triangle row by row.
template <typename T>
DenseTensor WireFactor(const MatrixXd& x, bool packed) {
  const int d = static_cast<int>(x.rows());
  std::string bytes;
  for (int i = 0; i < d; ++i) {
    for (int j = packed ? i : 0; j < d; ++j) {
      const T v = static_cast<T>(x(i, j));
      bytes.append(reinterpret_cast<const char*>(&v), sizeof(T));
    }
  }
  const DType dt = sizeof(T) == 4 ? DType::kFloat32 : DType::kFloat64;
  if (packed) return DenseTensor::FromBytes(dt, {int64_t{d} * (d + 1) / 2}, bytes);
  return DenseTensor::FromBytes(dt, {d, d}, bytes);
}

template <typename T>
KfacStepInput WireReduced(const StepData& s, bool packed) {
  KfacStepInput in =
      ReducedInput(OracleGram(s.a, true, kRows), OracleGram(s.g, false, kRows), s.grad, kRows);
  in.kfac->a_factor = WireFactor<T>(OracleGram(s.a, true, kRows), packed);
  in.kfac->g_factor = WireFactor<T>(OracleGram(s.g, false, kRows), packed);
  return in;
}

template <typename T>
void ExpectPackedEqualsUnpacked(Precision precision) {
  for (KfacDampingMode mode : kModes) {
    SCOPED_TRACE(static_cast<int>(mode));
    KfacDenseOptions o = Options(mode, 0.1);
    o.inverse_period = 2;
    Harness full(o, precision), packed(o, precision);
    for (int t = 1; t <= 3; ++t) {
      const StepData s = MakeStep(300 + t);
      const BlockStepOutput a = full.Step(t, WireReduced<T>(s, false));
      const BlockStepOutput b = packed.Step(t, WireReduced<T>(s, true));
      EXPECT_TRUE(a.delta.ToMatrix<double>() == b.delta.ToMatrix<double>()) << "step " << t;
    }
    ExpectSameState(full.block->ExportState(), packed.block->ExportState());
  }
}

TEST(KfacDenseBlock, PackedFactorsEqualUnpackedBitForBit) {
  ExpectPackedEqualsUnpacked<float>(Precision::kFloat32);
  ExpectPackedEqualsUnpacked<float>(Precision::kFloat64);
  ExpectPackedEqualsUnpacked<double>(Precision::kFloat32);
  ExpectPackedEqualsUnpacked<double>(Precision::kFloat64);
}

TEST(KfacDenseBlock, PackedFactorOfTheWrongLengthIsRefused) {
  Harness h(Options(KfacDampingMode::kEigenExact, 0.1));
  h.Step(1, RawInput(MakeStep(310)));
  const BlockState before = h.block->ExportState();
  KfacStepInput in = WireReduced<float>(MakeStep(311), true);
  in.kfac->g_factor = WireFactor<float>(MatrixXd::Identity(3, 3), true);  // 6, want 3
  auto p = h.Propose(2, in);
  ASSERT_FALSE(p.ok());
  EXPECT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(p.status().message(),
              HasSubstr("block \"fc1\": kfac.reduced.g_factor is packed with 6 values, "
                        "want d(d+1)/2 = 3 (d = 2)"));
  ExpectSameState(before, h.block->ExportState());
}

// Indefinite, yet every 2x2 principal minor is positive, so only the
// Cholesky tells: v = (1, -1, 1, 0) gives v^T X v = 3 - 5.4 < 0.
MatrixXd IndefiniteA(double scale) {
  MatrixXd x = MatrixXd::Identity(kDin + 1, kDin + 1);
  x(0, 1) = x(1, 0) = 0.9;
  x(1, 2) = x(2, 1) = 0.9;
  x(0, 2) = x(2, 0) = -0.9;
  return scale * x;
}

// Refused by the step that sends it, whether or not that step decomposes:
// folded into the EMA it could not be taken out again.
TEST(KfacDenseBlock, IndefiniteFactorIsRefusedAtTheStepThatSendsIt) {
  for (Precision precision : {Precision::kFloat64, Precision::kFloat32}) {
    for (KfacDampingMode mode : kModes) {
      SCOPED_TRACE(static_cast<int>(mode));
      KfacDenseOptions o = Options(mode, 0.1);
      o.inverse_period = 3;  // decompositions at steps 1 and 4
      Harness h(o, precision);
      const StepData s1 = MakeStep(320);
      const MatrixXd g1 = OracleGram(s1.g, false, kRows);
      const BlockState fresh = h.block->ExportState();
      auto p = h.Propose(1, ReducedInput(IndefiniteA(1), g1, s1.grad, kRows));
      ASSERT_FALSE(p.ok());
      EXPECT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument);
      EXPECT_THAT(p.status().message(),
                  HasSubstr("block \"fc1\": kfac.reduced.a_factor is not positive "
                            "semidefinite beyond rounding"));
      ExpectSameState(fresh, h.block->ExportState());

      // At a step that does not decompose: refused as well, nothing changes,
      // and the session goes on through the next decomposition.
      h.Step(1, RawInput(s1));
      const StepData s2 = MakeStep(321);
      const BlockState before = h.block->ExportState();
      p = h.Propose(2, ReducedInput(IndefiniteA(100), OracleGram(s2.g, false, kRows),
                                    s2.grad, kRows));
      ASSERT_FALSE(p.ok());
      EXPECT_THAT(p.status().message(),
                  HasSubstr("kfac.reduced.a_factor is not positive semidefinite"));
      ExpectSameState(before, h.block->ExportState());
      h.Step(2, RawInput(s2));
      h.Step(3, RawInput(MakeStep(322)));
      h.Step(4, RawInput(MakeStep(323)));
    }
  }
}

// Rank-deficient PSD factors (fewer rows than dimensions, an input that is
// always 0) pass the test at decomposition: their clamped eigenvalues'
// Rayleigh quotients are rounding-sized.
TEST(KfacDenseBlock, RankDeficientFactorsPassThePsdTest) {
  for (Precision precision : {Precision::kFloat64, Precision::kFloat32}) {
    for (KfacDampingMode mode : kModes) {
      SCOPED_TRACE(static_cast<int>(mode));
      Harness h(Options(mode, 1e-6), precision);
      StepData s = MakeStep(330, kDin, kDout, 2);
      s.a.col(1).setZero();
      auto p = h.Propose(1, ReducedInput(OracleGram(s.a, true, 2), OracleGram(s.g, false, 2),
                                         s.grad, 2));
      EXPECT_TRUE(p.ok()) << p.status();
    }
  }
}

// The arrival test's rounding allowance for a reduced factor formed in
// float32 from n rows: gamma_n tr(X), the bound on ||fl(a^T a / n) - a^T a / n||_2
// for any summation order. A rank-deficient Gram of correlated activations
// (lambda_max ~ d max X_ii) moved along a null vector by a quarter of that
// bound is taken, though it is far outside the diagonal-scaled allowance
// (the test checks that first); moved by four times the bound it is refused.
TEST(KfacDenseBlock, ReducedFactorRoundingAllowanceScalesWithTheTrace) {
  constexpr int kWideIn = 63, kN = 1000, kRank = 4;
  const MatrixXd z = RandomMatrix(kN, kRank, 340);
  const MatrixXd w = RandomMatrix(kRank, kWideIn, 341);
  MatrixXd abar(kN, kWideIn + 1);
  abar.leftCols(kWideIn) = (1.0 + 0.05 * (z * w).array()).matrix();
  abar.col(kWideIn).setOnes();
  const MatrixXd exact = abar.transpose() * abar / kN;  // rank kRank + 1
  Eigen::SelfAdjointEigenSolver<MatrixXd> eig(exact);
  const Eigen::VectorXd null = eig.eigenvectors().col(0);
  ASSERT_LT(std::abs(eig.eigenvalues()(0)), 1e-10);
  const double eps = std::numeric_limits<float>::epsilon();
  const double gamma = kN * eps / (1 - kN * eps);
  const double allowance = gamma * exact.trace();
  const double max_diag = exact.diagonal().maxCoeff();
  const double old_allowance = 1e-4 * max_diag + (kWideIn + 1) * eps * max_diag;
  ASSERT_GT(0.25 * allowance, 2 * old_allowance) << "no longer tests the trace term";
  const StepData s = MakeStep(342, kWideIn, kDout, kN);
  for (Precision precision : {Precision::kFloat32, Precision::kFloat64}) {
    for (double times : {0.25, 4.0}) {
      SCOPED_TRACE(times);
      KfacDenseOptions o = Options(KfacDampingMode::kEigenExact, 1e-3);
      o.d_in = kWideIn;
      Harness h(o, precision);
      const MatrixXd a = exact - times * allowance * null * null.transpose();
      KfacStepInput in = ReducedInput(a, OracleGram(s.g, false, kN), s.grad, kN);
      in.kfac->a_factor = WireFactor<float>(a, /*packed=*/true);
      auto p = h.Propose(1, in);
      if (times < 1) {
        EXPECT_TRUE(p.ok()) << p.status();
      } else {
        ASSERT_FALSE(p.ok());
        EXPECT_THAT(p.status().message(),
                    HasSubstr("kfac.reduced.a_factor is not positive semidefinite"));
      }
    }
  }
}

}  // namespace
}  // namespace natgrad::core
