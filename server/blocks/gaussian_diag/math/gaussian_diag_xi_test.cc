// The diagonal Gaussian block's ξ-space step (step_space kXi) against a
// dense transcription written from the definitions: per element, ξ = (a, c)
// in the block's parametrisation, the 2 x 2 Fisher F_ξ = ∂²/∂ξ'² KL(q_ξ ‖ q_ξ')
// at ξ' = ξ by (Richardson-extrapolated) central differences in long double,
// d = F_ξ⁻¹ ∂L/∂ξ and ξ' = ξ − γ d.
#include <cmath>
#include <random>

#include "Eigen/Core"
#include "Eigen/LU"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/blocks/gaussian_diag/math/gaussian_diag_block.h"
#include "server/core/schedule.h"

namespace natgrad::core {
namespace {

using LD = long double;
using Eigen::MatrixXd;
using DP = GaussianDiagParametrization;
using Space = GaussianStepInput::GradientSpace;

constexpr int kCopies = 2, kDim = 3;

struct Mv {
  LD m, s;
};

Mv MeanVarOf(DP p, LD a, LD c) {
  switch (p) {
    case DP::kNatural:
      return {a * (LD(-0.5) / c), LD(-0.5) / c};
    case DP::kExpectation:
      return {a, c - a * a};
    case DP::kMeanVariance:
      return {a, c};
    case DP::kMeanLogStd:
      return {a, std::exp(LD(2) * c)};
  }
  return {};
}

std::pair<double, double> ParamsOf(DP p, double m, double s) {
  switch (p) {
    case DP::kNatural:
      return {m / s, -0.5 / s};
    case DP::kExpectation:
      return {m, s + m * m};
    case DP::kMeanVariance:
      return {m, s};
    case DP::kMeanLogStd:
      return {m, 0.5 * std::log(s)};
  }
  return {};
}

LD Kl(DP p, LD a0, LD c0, LD a1, LD c1) {
  const Mv q = MeanVarOf(p, a0, c0), r = MeanVarOf(p, a1, c1);
  const LD dm = r.m - q.m;
  return LD(0.5) * (q.s / r.s + dm * dm / r.s - 1 + std::log(r.s) - std::log(q.s));
}

// F_ξ⁻¹ g at ξ = (a, c).
std::pair<LD, LD> OracleDirection(DP p, LD a, LD c, LD g1, LD g2) {
  const LD h = 1e-3L;
  const auto d = [&](int i, int j, LD hh) {
    const auto f = [&](LD si, LD sj) {
      LD x[2] = {a, c};
      x[i] += si;
      x[j] += sj;
      return Kl(p, a, c, x[0], x[1]);
    };
    return (f(hh, hh) - f(hh, -hh) - f(-hh, hh) + f(-hh, -hh)) / (4 * hh * hh);
  };
  Eigen::Matrix<LD, 2, 2> fq;
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j) fq(i, j) = (4 * d(i, j, h) - d(i, j, 2 * h)) / 3;
  const Eigen::Matrix<LD, 2, 1> dir = fq.inverse() * Eigen::Matrix<LD, 2, 1>(g1, g2);
  return {dir(0), dir(1)};
}

TEST(GaussianDiagXiStepTest, MatchesDenseTranscription) {
  std::mt19937 rng(5);
  std::normal_distribution<double> n;
  std::uniform_real_distribution<double> u(0.5, 2.0);
  constexpr double kGamma = 0.3;
  for (DP p : {DP::kNatural, DP::kExpectation, DP::kMeanVariance, DP::kMeanLogStd}) {
    SCOPED_TRACE(static_cast<int>(p));
    GaussianDiagOptions o;
    o.dim = kDim;
    o.copies = kCopies;
    o.parametrization = p;
    o.gamma = ConstantSchedule(kGamma);
    o.return_direction = true;
    o.step_space = GaussianDiagStepSpace::kXi;
    auto block = NewGaussianDiagBlock("q", o, Precision::kFloat64);
    ASSERT_TRUE(block.ok());
    MatrixXd p1(kCopies, kDim), p2(kCopies, kDim), g1(kCopies, kDim), g2(kCopies, kDim);
    for (int i = 0; i < kCopies; ++i)
      for (int j = 0; j < kDim; ++j) {
        std::tie(p1(i, j), p2(i, j)) = ParamsOf(p, n(rng), u(rng));
        g1(i, j) = 0.1 * n(rng);
        g2(i, j) = 0.1 * n(rng);
      }
    GaussianDiagStepInput in;
    in.param1 = p1;
    in.param2 = p2;
    in.grad1 = g1;
    in.grad2 = g2;
    in.gradient_space = Space::kParametrization;
    StepContext ctx;
    ctx.step = 1;
    auto pending = (*block)->Propose(in, ctx);
    ASSERT_TRUE(pending.ok()) << pending.status();
    const auto out = (*pending)->Commit(1);
    const auto& g = std::get<GaussianDiagStepOutput>(out.kind_output);
    EXPECT_EQ(g.halvings, 0);
    const MatrixXd q1 = g.param1.ToMatrix<double>(), q2 = g.param2.ToMatrix<double>();
    const MatrixXd r1 = g.direction1.ToMatrix<double>(), r2 = g.direction2.ToMatrix<double>();
    for (int i = 0; i < kCopies; ++i)
      for (int j = 0; j < kDim; ++j) {
        const auto [d1, d2] = OracleDirection(p, p1(i, j), p2(i, j), g1(i, j), g2(i, j));
        const double w1 = p1(i, j) - kGamma * static_cast<double>(d1);
        const double w2 = p2(i, j) - kGamma * static_cast<double>(d2);
        EXPECT_NEAR(q1(i, j), w1, 1e-8 * std::max(1.0, std::abs(w1)));
        EXPECT_NEAR(q2(i, j), w2, 1e-8 * std::max(1.0, std::abs(w2)));
        EXPECT_NEAR(r1(i, j), static_cast<double>(d1), 1e-8);
        EXPECT_NEAR(r2(i, j), static_cast<double>(d2), 1e-8);
      }
    EXPECT_EQ(g.delta1.ToMatrix<double>(), q1 - p1);
    EXPECT_EQ(g.delta2.ToMatrix<double>(), q2 - p2);
  }
}

// A ξ step to a non-positive variance halves γ; with no halvings allowed it
// is refused.
TEST(GaussianDiagXiStepTest, HalvesGammaWhenVarianceWouldBeNonPositive) {
  for (DP p : {DP::kMeanVariance, DP::kExpectation}) {
    GaussianDiagOptions o;
    o.dim = 1;
    o.copies = 1;
    o.parametrization = p;
    o.gamma = ConstantSchedule(1.0);
    o.return_direction = true;
    o.step_space = GaussianDiagStepSpace::kXi;
    auto block = *NewGaussianDiagBlock("q", o, Precision::kFloat64);
    GaussianDiagStepInput in;
    // m = 0, s = 1; dL/dη2 = 3: ṡ = 2s² · 3 = 6, so s − γ' 6 > 0 needs γ' < 1/6.
    in.param1 = MatrixXd::Zero(1, 1);
    in.param2 = MatrixXd::Ones(1, 1);
    in.grad1 = MatrixXd::Zero(1, 1);
    in.grad2 = MatrixXd::Constant(1, 1, 3.0);
    in.gradient_space = Space::kExpectation;
    StepContext ctx;
    ctx.step = 1;
    auto pending = block->Propose(in, ctx);
    ASSERT_TRUE(pending.ok()) << pending.status();
    const auto out = (*pending)->Commit(1);
    const auto& g = std::get<GaussianDiagStepOutput>(out.kind_output);
    EXPECT_EQ(g.halvings, 3);
    EXPECT_EQ(g.gamma_used, 0.125);
    EXPECT_DOUBLE_EQ(g.param2.ToMatrix<double>()(0, 0), 1.0 - 0.125 * 6.0);

    o.max_halvings = 0;
    auto strict = *NewGaussianDiagBlock("q", o, Precision::kFloat64);
    auto refused = strict->Propose(in, ctx);
    ASSERT_FALSE(refused.ok());
    EXPECT_THAT(refused.status().message(), ::testing::HasSubstr("block \"q\""));
    EXPECT_EQ(strict->ExportState().scalars.at("steps"), 0);
  }
}

}  // namespace
}  // namespace natgrad::core
