// The diagonal Gaussian block against two independent oracles: the
// full-covariance block (server/blocks/gaussian/math) on diagonal
// covariances, and central finite differences of a loss through each
// parametrisation for the gradient conversions.
#include "server/blocks/gaussian_diag/math/gaussian_diag_block.h"

#include <cmath>
#include <functional>
#include <random>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/blocks/gaussian/math/gaussian_block.h"

namespace natgrad::core {
namespace {

using ::testing::HasSubstr;
using Eigen::MatrixXd;
using Eigen::VectorXd;
using DP = GaussianDiagParametrization;
using FP = GaussianParametrization;
using Space = GaussianStepInput::GradientSpace;

constexpr int kCopies = 2, kDim = 3;

struct MeanVar {
  MatrixXd m, s;  // [copies, dim]
};

MeanVar RandomQ(std::mt19937& rng) {
  std::normal_distribution<double> n;
  std::uniform_real_distribution<double> u(0.5, 2.0);
  MeanVar q{MatrixXd(kCopies, kDim), MatrixXd(kCopies, kDim)};
  for (int c = 0; c < kCopies; ++c)
    for (int i = 0; i < kDim; ++i) {
      q.m(c, i) = n(rng);
      q.s(c, i) = u(rng);
    }
  return q;
}

MatrixXd RandomMatrix(std::mt19937& rng, double scale) {
  std::normal_distribution<double> n(0, scale);
  MatrixXd g(kCopies, kDim);
  for (int c = 0; c < kCopies; ++c)
    for (int i = 0; i < kDim; ++i) g(c, i) = n(rng);
  return g;
}

// (param1, param2) of q in a diagonal parametrisation.
std::pair<MatrixXd, MatrixXd> Params(DP p, const MeanVar& q) {
  switch (p) {
    case DP::kNatural:
      return {q.m.cwiseQuotient(q.s), -0.5 * q.s.cwiseInverse()};
    case DP::kExpectation:
      return {q.m, q.s + q.m.cwiseProduct(q.m)};
    case DP::kMeanVariance:
      return {q.m, q.s};
    case DP::kMeanLogStd:
      return {q.m, 0.5 * q.s.array().log().matrix()};
  }
  return {};
}

MeanVar FromParams(DP p, const MatrixXd& a, const MatrixXd& b) {
  switch (p) {
    case DP::kNatural: {
      MatrixXd s = -0.5 * b.cwiseInverse();
      return {a.cwiseProduct(s), s};
    }
    case DP::kExpectation:
      return {a, b - a.cwiseProduct(a)};
    case DP::kMeanVariance:
      return {a, b};
    case DP::kMeanLogStd:
      return {a, (2 * b).array().exp().matrix()};
  }
  return {};
}

FP FullOf(DP p) {
  switch (p) {
    case DP::kNatural:
      return FP::kNatural;
    case DP::kExpectation:
      return FP::kExpectation;
    default:
      return FP::kMeanCovariance;
  }
}

StepContext Ctx(int64_t t) {
  StepContext c;
  c.step = t;
  return c;
}

std::unique_ptr<ParameterBlock> Diag(DP p, double gamma, Precision precision = Precision::kFloat64,
                                     int max_halvings = 8) {
  GaussianDiagOptions o;
  o.dim = kDim;
  o.copies = kCopies;
  o.parametrization = p;
  o.gamma = ConstantSchedule(gamma);
  o.max_halvings = max_halvings;
  o.return_direction = true;
  return *NewGaussianDiagBlock("q", o, precision);
}

GaussianDiagStepInput DiagInput(const MatrixXd& p1, const MatrixXd& p2, const MatrixXd& g1,
                                const MatrixXd& g2, Space space) {
  GaussianDiagStepInput in;
  in.param1 = p1;
  in.param2 = p2;
  in.grad1 = g1;
  in.grad2 = g2;
  in.gradient_space = space;
  return in;
}

const GaussianDiagStepOutput& Out(const BlockStepOutput& o) {
  return std::get<GaussianDiagStepOutput>(o.kind_output);
}

// The full-covariance block on the same q with diagonal S. Its second
// parts are matrices: η2 = S + mmᵀ is not diagonal, and in natural
// coordinates the loss's gradient in the full θ2 has off-diagonal entries
// 2 g1_i m_j (m = −½θ2⁻¹θ1 depends on them) that the diagonal family cannot
// carry; the diagonal entries are what the diagonal block sees.
GaussianStepOutput FullStep(DP p, const MeanVar& q, const MatrixXd& p1, const MatrixXd& p2,
                            const MatrixXd& g1, const MatrixXd& g2, Space space, double gamma) {
  GaussianOptions o;
  o.dim = kDim;
  o.copies = kCopies;
  o.parametrization = FullOf(p);
  o.gamma = ConstantSchedule(gamma);
  o.return_direction = true;
  auto block = *NewGaussianBlock("full", o, Precision::kFloat64);
  GaussianStepInput in;
  for (int c = 0; c < kCopies; ++c) {
    const VectorXd m = q.m.row(c).transpose();
    in.param1.push_back(p1.row(c).transpose());
    MatrixXd second = p2.row(c).asDiagonal();
    if (p == DP::kExpectation) second = MatrixXd(q.s.row(c).asDiagonal()) + m * m.transpose();
    in.param2.push_back(second);
    in.grad1.push_back(g1.row(c).transpose());
    MatrixXd grad2 = g2.row(c).asDiagonal();
    if (p == DP::kNatural && space == Space::kParametrization) {
      for (int i = 0; i < kDim; ++i)
        for (int j = 0; j < kDim; ++j)
          if (i != j) grad2(i, j) = 2 * g1(c, i) * m(j);
    }
    in.grad2.push_back(grad2);
  }
  in.gradient_space = space;
  auto pending = block->Propose(in, Ctx(1));
  EXPECT_TRUE(pending.ok()) << pending.status();
  return std::get<GaussianStepOutput>((*pending)->Commit(1).kind_output);
}

// The diagonal block's second part from the full block's: diag(S') for
// mean+cov and natural (θ2 diagonal), diag(S' + m'm'ᵀ) = s' + m'² for
// expectation, which is the diagonal of the full matrix either way.
double MaxDiff(const DenseTensor& t, const MatrixXd& want) {
  return (t.ToMatrix<double>() - want).cwiseAbs().maxCoeff();
}

MatrixXd Row(const std::vector<VectorXd>& v) {
  MatrixXd m(v.size(), v[0].size());
  for (size_t c = 0; c < v.size(); ++c) m.row(c) = v[c].transpose();
  return m;
}
MatrixXd Diagonals(const std::vector<MatrixXd>& v) {
  MatrixXd m(v.size(), v[0].rows());
  for (size_t c = 0; c < v.size(); ++c) m.row(c) = v[c].diagonal().transpose();
  return m;
}

TEST(GaussianDiagBlock, EqualsTheFullBlockOnDiagonalCovariances) {
  for (DP p : {DP::kNatural, DP::kExpectation, DP::kMeanVariance}) {
    for (Space space : {Space::kExpectation, Space::kParametrization}) {
      std::mt19937 rng(3);
      const MeanVar q = RandomQ(rng);
      auto [p1, p2] = Params(p, q);
      const MatrixXd g1 = RandomMatrix(rng, 0.3), g2 = RandomMatrix(rng, 0.05);
      auto block = Diag(p, 0.7);
      auto pending = block->Propose(DiagInput(p1, p2, g1, g2, space), Ctx(1));
      ASSERT_TRUE(pending.ok()) << pending.status();
      const BlockStepOutput out = (*pending)->Commit(1);
      const GaussianStepOutput want = FullStep(p, q, p1, p2, g1, g2, space, 0.7);
      SCOPED_TRACE(static_cast<int>(p) * 10 + static_cast<int>(space));
      EXPECT_LT(MaxDiff(Out(out).param1, Row(want.param1)), 1e-10);
      EXPECT_LT(MaxDiff(Out(out).param2, Diagonals(want.param2)), 1e-10);
      EXPECT_LT(MaxDiff(Out(out).delta1, Row(want.delta1)), 1e-10);
      EXPECT_LT(MaxDiff(Out(out).delta2, Diagonals(want.delta2)), 1e-10);
      EXPECT_LT(MaxDiff(Out(out).direction1, Row(want.direction1)), 1e-10);
      EXPECT_LT(MaxDiff(Out(out).direction2, Diagonals(want.direction2)), 1e-10);
      EXPECT_EQ(Out(out).gamma_used, want.gamma_used);
    }
  }
}

// L(m, s) with every term coupling mean and variance.
double Loss(const MeanVar& q) {
  double l = 0;
  for (int c = 0; c < kCopies; ++c)
    for (int i = 0; i < kDim; ++i) {
      const double m = q.m(c, i), s = q.s(c, i);
      l += std::sin(m + 0.3 * i) * s + 0.5 * m * m / s + std::log(s) * (c + 1);
    }
  return l;
}

// ∂L/∂(param1, param2) in parametrisation p by central differences.
std::pair<MatrixXd, MatrixXd> FiniteDifferenceGradient(DP p, const MatrixXd& p1,
                                                       const MatrixXd& p2) {
  const double h = 1e-6;
  MatrixXd g1(kCopies, kDim), g2(kCopies, kDim);
  for (int c = 0; c < kCopies; ++c)
    for (int i = 0; i < kDim; ++i) {
      for (int part = 0; part < 2; ++part) {
        MatrixXd a = p1, b = p2, a2 = p1, b2 = p2;
        (part == 0 ? a : b)(c, i) += h;
        (part == 0 ? a2 : b2)(c, i) -= h;
        const double d = (Loss(FromParams(p, a, b)) - Loss(FromParams(p, a2, b2))) / (2 * h);
        (part == 0 ? g1 : g2)(c, i) = d;
      }
    }
  return {g1, g2};
}

// The gradient conversion of every parametrisation (log-std included)
// against finite differences: a step from ∂L/∂ξ equals the step from
// ∂L/∂η of the same loss.
TEST(GaussianDiagBlock, GradientConversionsMatchFiniteDifferences) {
  std::mt19937 rng(9);
  const MeanVar q = RandomQ(rng);
  auto [e1, e2] = Params(DP::kExpectation, q);
  auto [eg1, eg2] = FiniteDifferenceGradient(DP::kExpectation, e1, e2);
  for (DP p : {DP::kNatural, DP::kExpectation, DP::kMeanVariance, DP::kMeanLogStd}) {
    auto [p1, p2] = Params(p, q);
    auto [g1, g2] = FiniteDifferenceGradient(p, p1, p2);
    auto from_xi = Diag(p, 0.1)->Propose(DiagInput(p1, p2, g1, g2, Space::kParametrization), Ctx(1));
    auto from_eta = Diag(p, 0.1)->Propose(DiagInput(p1, p2, eg1, eg2, Space::kExpectation), Ctx(1));
    ASSERT_TRUE(from_xi.ok() && from_eta.ok());
    const BlockStepOutput a = (*from_xi)->Commit(1), b = (*from_eta)->Commit(1);
    SCOPED_TRACE(static_cast<int>(p));
    EXPECT_LT(MaxDiff(Out(a).param1, Out(b).param1.ToMatrix<double>()), 1e-7);
    EXPECT_LT(MaxDiff(Out(a).param2, Out(b).param2.ToMatrix<double>()), 1e-7);
  }
}

// Mean + log-std moves q exactly as mean + variance does.
TEST(GaussianDiagBlock, LogStdTakesTheSameStepAsMeanVariance) {
  std::mt19937 rng(4);
  const MeanVar q = RandomQ(rng);
  const MatrixXd g1 = RandomMatrix(rng, 0.3), g2 = RandomMatrix(rng, 0.05);
  auto mv = Diag(DP::kMeanVariance, 0.5)->Propose(
      DiagInput(q.m, q.s, g1, g2, Space::kExpectation), Ctx(1));
  auto [l1, l2] = Params(DP::kMeanLogStd, q);
  auto ls = Diag(DP::kMeanLogStd, 0.5)->Propose(DiagInput(l1, l2, g1, g2, Space::kExpectation),
                                               Ctx(1));
  ASSERT_TRUE(mv.ok() && ls.ok());
  const BlockStepOutput a = (*mv)->Commit(1), b = (*ls)->Commit(1);
  const MeanVar qa = FromParams(DP::kMeanVariance, Out(a).param1.ToMatrix<double>(),
                                Out(a).param2.ToMatrix<double>());
  const MeanVar qb = FromParams(DP::kMeanLogStd, Out(b).param1.ToMatrix<double>(),
                                Out(b).param2.ToMatrix<double>());
  EXPECT_LT((qa.m - qb.m).cwiseAbs().maxCoeff(), 1e-12);
  EXPECT_LT((qa.s - qb.s).cwiseAbs().maxCoeff(), 1e-12);
  // ρ̇ = ṡ / (2s).
  const MatrixXd want = Out(a).direction2.ToMatrix<double>().cwiseQuotient(2 * q.s);
  EXPECT_LT(MaxDiff(Out(b).direction2, want), 1e-12);
}

TEST(GaussianDiagBlock, Float32AgreesWithFloat64) {
  std::mt19937 rng(5);
  const MeanVar q = RandomQ(rng);
  const MatrixXd g1 = RandomMatrix(rng, 0.3), g2 = RandomMatrix(rng, 0.05);
  for (DP p : {DP::kNatural, DP::kExpectation, DP::kMeanVariance, DP::kMeanLogStd}) {
    auto [p1, p2] = Params(p, q);
    auto a = Diag(p, 0.5)->Propose(DiagInput(p1, p2, g1, g2, Space::kParametrization), Ctx(1));
    auto b = Diag(p, 0.5, Precision::kFloat32)
                 ->Propose(DiagInput(p1, p2, g1, g2, Space::kParametrization), Ctx(1));
    ASSERT_TRUE(a.ok() && b.ok());
    const BlockStepOutput x = (*a)->Commit(1), y = (*b)->Commit(1);
    EXPECT_EQ(Out(y).param1.dtype(), DType::kFloat32);
    const MatrixXd w = Out(x).param2.ToMatrix<double>();
    EXPECT_LT(MaxDiff(Out(y).param2, w) / w.cwiseAbs().maxCoeff(), 1e-5);
  }
}

TEST(GaussianDiagBlock, HalvesGammaToStayPositiveAndRefusesWhenItCannot) {
  // ∂L/∂η2 = -1 with s = 1: θ2' = -0.5 + γ is not negative for γ = 1 or 1/2;
  // γ = 1/4 gives θ2' = -1/4, s' = 2.
  MatrixXd m = MatrixXd::Zero(kCopies, kDim), s = MatrixXd::Ones(kCopies, kDim);
  MatrixXd g1 = MatrixXd::Zero(kCopies, kDim), g2 = -MatrixXd::Ones(kCopies, kDim);
  auto block = Diag(DP::kMeanVariance, 1.0);
  auto p = block->Propose(DiagInput(m, s, g1, g2, Space::kExpectation), Ctx(1));
  ASSERT_TRUE(p.ok()) << p.status();
  const BlockStepOutput out = (*p)->Commit(1);
  EXPECT_EQ(Out(out).halvings, 2);
  EXPECT_EQ(Out(out).gamma_used, 0.25);
  EXPECT_LT(MaxDiff(Out(out).param2, MatrixXd::Constant(kCopies, kDim, 2.0)), 1e-12);
  const BlockState before = block->ExportState();
  auto refused = Diag(DP::kMeanVariance, 1.0, Precision::kFloat64, 1)
                     ->Propose(DiagInput(m, s, g1, g2, Space::kExpectation), Ctx(1));
  ASSERT_FALSE(refused.ok());
  EXPECT_THAT(refused.status().message(), HasSubstr("leaves the positive variances"));
  EXPECT_EQ(block->ExportState().scalars, before.scalars);
}

TEST(GaussianDiagBlock, BadInputsAreRefusedNamingTheField) {
  std::mt19937 rng(6);
  const MeanVar q = RandomQ(rng);
  MatrixXd s = q.s;
  s(1, 2) = -1;
  auto block = Diag(DP::kMeanVariance, 0.5);
  auto p = block->Propose(DiagInput(q.m, s, q.m, q.m, Space::kExpectation), Ctx(1));
  ASSERT_FALSE(p.ok());
  EXPECT_THAT(p.status().message(), HasSubstr("block \"q\": gaussian.param2 gives no positive variance at [1, 2]"));
  auto wrong = block->Propose(DiagInput(q.m, MatrixXd::Ones(1, 2), q.m, q.m, Space::kExpectation), Ctx(1));
  ASSERT_FALSE(wrong.ok());
  EXPECT_THAT(wrong.status().message(), HasSubstr("gaussian.param2 has 2 values"));
  GaussianDiagOptions o;
  o.dim = 0;
  EXPECT_FALSE(NewGaussianDiagBlock("q", o, Precision::kFloat64).ok());
  EXPECT_EQ(block->ExportState().scalars.at("steps"), 0);
}

}  // namespace
}  // namespace natgrad::core
