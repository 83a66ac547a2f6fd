// The conjugate oracle (docs/math.md): SVGP with a Gaussian likelihood.
//
// Model: 1-D inputs, RBF kernel, M inducing points Z, q(u) = N(m, S) in the
// NON-whitened form (u = f(Z), prior p(u) = N(0, Kmm)). With A = Knm Kmm⁻¹,
//   ELBO(m, S) = −N/2 log 2πσ² − (‖y − Am‖² + tr(Knn − AKmn) + tr(ASAᵀ))/2σ²
//                − KL(N(m, S) ‖ N(0, Kmm)),
// and the loss is L = −ELBO. Its optimum is θ1* = Aᵀy/σ²,
// θ2* = −½(Kmm⁻¹ + AᵀA/σ²), where the ELBO equals Titsias' collapsed bound
//   log N(y | 0, Qnn + σ²I) − tr(Knn − Qnn)/2σ²,  Qnn = Knm Kmm⁻¹ Kmn.
// ∂L/∂η = θ − θ*, so one step with γ = 1 lands on the optimum from any start,
// and with γ < 1, θ_t − θ* = (1 − γ)^t (θ_0 − θ*) exactly.
#include <cmath>
#include <numbers>
#include <random>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "server/blocks/gaussian/math/gaussian_block.h"
#include "server/blocks/gaussian/math/gaussian_test_util.h"
#include "server/core/schedule.h"

namespace natgrad::core {
namespace {

using ::natgrad::core::testing::AllParametrizations;
using ::natgrad::core::testing::GaussianOf;
using ::natgrad::core::testing::MaxAbsDiff;
using ::natgrad::core::testing::MeanCov;
using ::natgrad::core::testing::OracleMeanCov;
using ::natgrad::core::testing::OracleParams;
using ::natgrad::core::testing::RandomSpd;
using ::natgrad::core::testing::RandomVector;
using Eigen::MatrixXd;
using Eigen::VectorXd;
using Space = GaussianStepInput::GradientSpace;

double LogDet(const MatrixXd& spd) {
  const MatrixXd l = spd.llt().matrixL();
  return 2 * l.diagonal().array().log().sum();
}

class Svgp {
 public:
  Svgp() {
    std::mt19937 rng(41);
    std::uniform_real_distribution<double> unif(-3, 3);
    std::normal_distribution<double> noise(0, 0.3);
    x_.resize(kN);
    y_.resize(kN);
    for (int i = 0; i < kN; ++i) {
      x_(i) = unif(rng);
      y_(i) = std::sin(2 * x_(i)) + noise(rng);
    }
    z_ = VectorXd::LinSpaced(kM, -2.5, 2.5);
    kmm_ = Kernel(z_, z_);
    knm_ = Kernel(x_, z_);
    kmm_inv_ = kmm_.inverse();
    a_ = knm_ * kmm_inv_;
  }

  static constexpr int kN = 40;
  static constexpr int kM = 6;
  static constexpr double kNoise = 0.09;  // σ²

  double Elbo(const MeanCov& q) const {
    const VectorXd r = y_ - a_ * q.m;
    const double knn_trace = kN * kVariance;
    const double residual = r.squaredNorm() + knn_trace -
                            (a_ * knm_.transpose()).trace() +
                            (a_ * q.s * a_.transpose()).trace();
    const double lik =
        -0.5 * kN * std::log(2 * std::numbers::pi * kNoise) - residual / (2 * kNoise);
    const double kl = 0.5 * ((kmm_inv_ * q.s).trace() + q.m.dot(kmm_inv_ * q.m) -
                             kM + LogDet(kmm_) - LogDet(q.s));
    return lik - kl;
  }

  double TitsiasBound() const {
    const MatrixXd qnn = knm_ * kmm_inv_ * knm_.transpose();
    const MatrixXd c = qnn + kNoise * MatrixXd::Identity(kN, kN);
    const double log_marginal =
        -0.5 * (kN * std::log(2 * std::numbers::pi) + LogDet(c) +
                y_.dot(c.llt().solve(y_)));
    return log_marginal - (kN * kVariance - qnn.trace()) / (2 * kNoise);
  }

  // Optimal natural parameters.
  VectorXd Theta1Star() const { return a_.transpose() * y_ / kNoise; }
  MatrixXd Theta2Star() const {
    return -0.5 * (kmm_inv_ + a_.transpose() * a_ / kNoise);
  }

  // Analytic ∂L/∂m and ∂L/∂S (symmetric) of L = −ELBO.
  VectorXd GradMean(const MeanCov& q) const {
    return -a_.transpose() * (y_ - a_ * q.m) / kNoise + kmm_inv_ * q.m;
  }
  MatrixXd GradCov(const MeanCov& q) const {
    return a_.transpose() * a_ / (2 * kNoise) + 0.5 * kmm_inv_ -
           0.5 * q.s.inverse();
  }

  // The gradient a client in parametrisation p would send, by hand-derived
  // chain rules (the full-matrix autodiff convention, not symmetrised).
  std::pair<VectorXd, MatrixXd> Gradient(GaussianParametrization p,
                                         const MeanCov& q, Space space) const {
    const VectorXd gm = GradMean(q);
    const MatrixXd g = GradCov(q);
    if (space == Space::kExpectation) return {gm - 2 * g * q.m, g};
    switch (p) {
      case GaussianParametrization::kMeanCovariance:
        return {gm, g};
      case GaussianParametrization::kExpectation:
        return {gm - 2 * g * q.m, g};
      case GaussianParametrization::kMeanCholesky: {
        const MatrixXd l = q.s.llt().matrixL();
        return {gm, 2 * g * l};  // upper part nonzero: must be ignored
      }
      case GaussianParametrization::kNatural:
        // m = Sθ1, S = −½θ2⁻¹: dS = 2S dθ2 S, dm = 2S dθ2 m + S dθ1.
        return {q.s * gm, 2 * q.s * g * q.s + 2 * q.s * gm * q.m.transpose()};
    }
    return {};
  }

 private:
  static constexpr double kVariance = 1.5;
  static constexpr double kLengthscale = 0.8;
  static MatrixXd Kernel(const VectorXd& a, const VectorXd& b) {
    MatrixXd k(a.size(), b.size());
    for (int i = 0; i < a.size(); ++i)
      for (int j = 0; j < b.size(); ++j) {
        const double d = (a(i) - b(j)) / kLengthscale;
        k(i, j) = kVariance * std::exp(-0.5 * d * d);
      }
    return k;
  }

  VectorXd x_, y_, z_;
  MatrixXd kmm_, knm_, kmm_inv_, a_;
};

GaussianStepInput MakeInput(const Svgp& model, GaussianParametrization p,
                         const std::vector<MeanCov>& qs, Space space) {
  GaussianStepInput in;
  in.gradient_space = space;
  for (const MeanCov& q : qs) {
    auto [p1, p2] = OracleParams(p, q);
    auto [g1, g2] = model.Gradient(p, q, space);
    in.param1.push_back(p1);
    in.param2.push_back(p2);
    in.grad1.push_back(g1);
    in.grad2.push_back(g2);
  }
  return in;
}

std::unique_ptr<ParameterBlock> MakeBlock(GaussianParametrization p,
                                          double gamma, int copies,
                                          Precision precision = Precision::kFloat64) {
  GaussianOptions o;
  o.dim = Svgp::kM;
  o.copies = copies;
  o.parametrization = p;
  o.gamma = ConstantSchedule(gamma);
  auto block = NewGaussianBlock("q_u", o, precision);
  EXPECT_TRUE(block.ok()) << block.status();
  return *std::move(block);
}

struct Case {
  GaussianParametrization p;
  Space space;
};

class SvgpOracleTest : public ::testing::TestWithParam<Case> {};

TEST_P(SvgpOracleTest, UnitStepLandsOnTitsiasBound) {
  const auto [p, space] = GetParam();
  const Svgp model;
  const double bound = model.TitsiasBound();
  std::mt19937 rng(42);
  for (int trial = 0; trial < 5; ++trial) {
    // Two copies from different random starts, same data.
    const std::vector<MeanCov> starts = {
        {RandomVector(Svgp::kM, &rng, 2.0), RandomSpd(Svgp::kM, &rng)},
        {RandomVector(Svgp::kM, &rng, 0.5), 0.1 * RandomSpd(Svgp::kM, &rng)}};
    auto block = MakeBlock(p, 1.0, 2);
    StepContext ctx;
    ctx.step = 1;
    auto pending = block->Propose(MakeInput(model, p, starts, space), ctx);
    ASSERT_TRUE(pending.ok()) << pending.status();
    const BlockStepOutput out = (*pending)->Commit(1.0);
    ASSERT_TRUE(std::holds_alternative<GaussianStepOutput>(out.kind_output));
    EXPECT_EQ(GaussianOf(out).halvings, 0);
    EXPECT_EQ(GaussianOf(out).gamma_used, 1.0);
    for (int c = 0; c < 2; ++c) {
      EXPECT_GT(bound - model.Elbo(starts[c]), 1e-3) << "start not optimal";
      const MeanCov q =
          OracleMeanCov(p, GaussianOf(out).param1[c], GaussianOf(out).param2[c]);
      EXPECT_NEAR(model.Elbo(q), bound, 1e-8) << "copy " << c;
      const auto [t1, t2] = OracleParams(GaussianParametrization::kNatural, q);
      EXPECT_LT(MaxAbsDiff(t1, model.Theta1Star()),
                1e-8 * model.Theta1Star().cwiseAbs().maxCoeff());
      EXPECT_LT(MaxAbsDiff(t2, model.Theta2Star()),
                1e-8 * model.Theta2Star().cwiseAbs().maxCoeff());
    }
  }
}

TEST_P(SvgpOracleTest, DampedStepsContractExactly) {
  const auto [p, space] = GetParam();
  const Svgp model;
  const double gamma = 0.3;
  std::mt19937 rng(43);
  MeanCov q{RandomVector(Svgp::kM, &rng, 2.0), RandomSpd(Svgp::kM, &rng)};
  const auto [t1_0, t2_0] = OracleParams(GaussianParametrization::kNatural, q);
  const VectorXd e1_0 = t1_0 - model.Theta1Star();
  const MatrixXd e2_0 = t2_0 - model.Theta2Star();
  const double scale = e1_0.cwiseAbs().maxCoeff() + e2_0.cwiseAbs().maxCoeff();
  auto block = MakeBlock(p, gamma, 1);
  for (int t = 1; t <= 8; ++t) {
    StepContext ctx;
    ctx.step = t;
    auto pending = block->Propose(MakeInput(model, p, {q}, space), ctx);
    ASSERT_TRUE(pending.ok()) << pending.status();
    const BlockStepOutput out = (*pending)->Commit(1.0);
    EXPECT_EQ(GaussianOf(out).gamma_used, gamma);
    q = OracleMeanCov(p, GaussianOf(out).param1[0], GaussianOf(out).param2[0]);
    const auto [t1, t2] = OracleParams(GaussianParametrization::kNatural, q);
    const double f = std::pow(1 - gamma, t);
    EXPECT_LT(MaxAbsDiff(t1 - model.Theta1Star(), f * e1_0), 1e-9 * scale)
        << "t=" << t;
    EXPECT_LT(MaxAbsDiff(t2 - model.Theta2Star(), f * e2_0), 1e-9 * scale)
        << "t=" << t;
  }
  EXPECT_EQ(block->ExportState().scalars.at("steps"), 8);
}

std::vector<Case> AllCases() {
  std::vector<Case> cases;
  for (GaussianParametrization p : AllParametrizations()) {
    cases.push_back({p, Space::kParametrization});
    cases.push_back({p, Space::kExpectation});
  }
  return cases;
}

INSTANTIATE_TEST_SUITE_P(
    All, SvgpOracleTest, ::testing::ValuesIn(AllCases()),
    [](const auto& info) {
      return absl::StrCat(GaussianParametrizationName(info.param.p),
                          info.param.space == Space::kExpectation
                              ? "_dL_deta"
                              : "_dL_dxi");
    });

TEST(SvgpOracleFloat32Test, UnitStepLandsNearTitsiasBound) {
  const Svgp model;
  const double bound = model.TitsiasBound();
  std::mt19937 rng(44);
  const MeanCov start{RandomVector(Svgp::kM, &rng), RandomSpd(Svgp::kM, &rng)};
  for (GaussianParametrization p : AllParametrizations()) {
    auto block = MakeBlock(p, 1.0, 1, Precision::kFloat32);
    StepContext ctx;
    ctx.step = 1;
    auto pending = block->Propose(
        MakeInput(model, p, {start}, Space::kParametrization), ctx);
    ASSERT_TRUE(pending.ok()) << pending.status();
    const BlockStepOutput out = (*pending)->Commit(1.0);
    const MeanCov q =
        OracleMeanCov(p, GaussianOf(out).param1[0], GaussianOf(out).param2[0]);
    EXPECT_NEAR(model.Elbo(q), bound, 1e-3 * std::abs(bound))
        << GaussianParametrizationName(p);
  }
}

}  // namespace
}  // namespace natgrad::core
