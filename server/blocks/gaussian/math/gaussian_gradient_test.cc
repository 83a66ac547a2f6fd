// Every gradient conversion against central finite differences: the client's
// gradient ∂L/∂ξ is itself a finite-difference gradient of a smooth test loss
// through the textbook map ξ -> (m, S), and the converted ∂L/∂η must match the
// finite-difference gradient of the same loss through η -> (m, S).
#include "server/blocks/gaussian/math/gaussian_gradient.h"

#include <cmath>
#include <functional>
#include <random>

#include "gtest/gtest.h"
#include "server/blocks/gaussian/math/gaussian_test_util.h"

namespace natgrad::core {
namespace {

using ::natgrad::core::testing::AllParametrizations;
using ::natgrad::core::testing::MaxAbsDiff;
using ::natgrad::core::testing::MeanCov;
using ::natgrad::core::testing::OracleMeanCov;
using ::natgrad::core::testing::OracleParams;
using ::natgrad::core::testing::RandomMatrix;
using ::natgrad::core::testing::RandomSpd;
using ::natgrad::core::testing::RandomVector;
using Eigen::MatrixXd;
using Eigen::VectorXd;

// A smooth loss of (m, S) coupling both: a KL to a fixed Gaussian plus
// nonlinear terms.
struct TestLoss {
  VectorXd mu, c;
  MatrixXd a, b, d;
  double operator()(const MeanCov& q) const {
    const Eigen::PartialPivLU<MatrixXd> lu(q.s);
    const double logdet = lu.matrixLU().diagonal().array().abs().log().sum();
    const VectorXd r = q.m - mu;
    const double trds = (d * q.s).trace();
    return 0.5 * r.dot(a * r) + std::sin(c.dot(q.m)) + (b * q.s).trace() +
           0.3 * q.m.dot(q.s * q.m) - 0.5 * logdet + 0.1 * trds * trds;
  }
};

TestLoss MakeLoss(int n, std::mt19937* rng) {
  return {RandomVector(n, rng), RandomVector(n, rng), RandomSpd(n, rng),
          RandomSpd(n, rng), RandomSpd(n, rng)};
}

// Central differences of f at (p1, p2). Symmetric second parts are perturbed
// symmetrically (E_ij + E_ji) and the result split evenly, which is the
// symmetric gradient; lower-triangular ones only below the diagonal.
struct FdGradient {
  VectorXd g1;
  MatrixXd g2;
};
FdGradient FiniteDifferences(
    const std::function<double(const VectorXd&, const MatrixXd&)>& f,
    const VectorXd& p1, const MatrixXd& p2, bool lower_triangular) {
  const double h = 1e-5;
  const int n = static_cast<int>(p1.size());
  FdGradient g{VectorXd::Zero(n), MatrixXd::Zero(n, n)};
  for (int i = 0; i < n; ++i) {
    VectorXd plus = p1, minus = p1;
    plus(i) += h;
    minus(i) -= h;
    g.g1(i) = (f(plus, p2) - f(minus, p2)) / (2 * h);
  }
  for (int j = 0; j < n; ++j) {
    for (int i = j; i < n; ++i) {
      MatrixXd plus = p2, minus = p2;
      plus(i, j) += h;
      minus(i, j) -= h;
      if (!lower_triangular && i != j) {
        plus(j, i) += h;
        minus(j, i) -= h;
      }
      const double d = (f(p1, plus) - f(p1, minus)) / (2 * h);
      if (lower_triangular || i == j) {
        g.g2(i, j) = d;
      } else {
        g.g2(i, j) = g.g2(j, i) = d / 2;
      }
    }
  }
  return g;
}

class GradientConversionTest
    : public ::testing::TestWithParam<GaussianParametrization> {};

TEST_P(GradientConversionTest, MatchesFiniteDifferencesInEta) {
  const GaussianParametrization p = GetParam();
  std::mt19937 rng(21);
  for (int trial = 0; trial < 6; ++trial) {
    const int n = 2 + trial;
    const TestLoss loss = MakeLoss(n, &rng);
    const MeanCov truth{RandomVector(n, &rng), RandomSpd(n, &rng)};
    const auto [p1, p2] = OracleParams(p, truth);
    const auto in_p = [&](const VectorXd& x1, const MatrixXd& x2) {
      return loss(OracleMeanCov(p, x1, x2));
    };
    FdGradient g_xi = FiniteDifferences(
        in_p, p1, p2, p == GaussianParametrization::kMeanCholesky);
    MatrixXd g2_sent = g_xi.g2;
    if (p == GaussianParametrization::kMeanCholesky) {
      // Entries above the diagonal are not parameters; they must be ignored.
      g2_sent.triangularView<Eigen::StrictlyUpper>() =
          RandomMatrix(n, n, &rng);
    } else {
      // An antisymmetric part does not change L along symmetric directions;
      // autodiff of a non-symmetric formula produces one.
      const MatrixXd x = RandomMatrix(n, n, &rng);
      g2_sent += x - x.transpose();
    }

    auto q = GaussianFromParams<double>(p, p1, p2);
    ASSERT_TRUE(q.ok()) << q.status();
    const ExpectationGradient<double> got =
        ExpectationGradientFrom<double>(p, *q, g_xi.g1, g2_sent);

    const auto [e1, e2] =
        OracleParams(GaussianParametrization::kExpectation, truth);
    const FdGradient want = FiniteDifferences(
        [&](const VectorXd& x1, const MatrixXd& x2) {
          return loss(OracleMeanCov(GaussianParametrization::kExpectation, x1,
                                    x2));
        },
        e1, e2, false);
    const double scale = 1 + want.g1.cwiseAbs().maxCoeff() +
                         want.g2.cwiseAbs().maxCoeff();
    EXPECT_LT(MaxAbsDiff(got.g1, want.g1), 1e-6 * scale) << "n=" << n;
    EXPECT_LT(MaxAbsDiff(got.g2, want.g2), 1e-6 * scale) << "n=" << n;
    EXPECT_EQ(got.g2, got.g2.transpose());
  }
}

INSTANTIATE_TEST_SUITE_P(
    All, GradientConversionTest, ::testing::ValuesIn(AllParametrizations()),
    [](const auto& info) {
      return std::string(GaussianParametrizationName(info.param));
    });

// docs/math.md (Gaussian)'s closed form from (m, S) on a non-symmetric ∂L/∂S: forgetting
// to symmetrise doubles or drops the off-diagonal contribution.
TEST(GradientConversionTest, MeanCovarianceSymmetrisesBeforeUse) {
  std::mt19937 rng(22);
  const int n = 4;
  const MeanCov truth{RandomVector(n, &rng), RandomSpd(n, &rng)};
  auto q = GaussianFromParams<double>(GaussianParametrization::kMeanCovariance,
                                      truth.m, truth.s);
  ASSERT_TRUE(q.ok());
  const VectorXd dm = RandomVector(n, &rng);
  const MatrixXd ds = RandomMatrix(n, n, &rng);  // not symmetric
  const ExpectationGradient<double> got =
      ExpectationGradientFromMeanCovariance<double>(*q, dm, ds);
  const MatrixXd g = 0.5 * (ds + ds.transpose());
  EXPECT_LT(MaxAbsDiff(got.g2, g), 1e-14);
  EXPECT_LT(MaxAbsDiff(got.g1, dm - 2 * g * truth.m), 1e-13);
}

TEST(GradientConversionTest, FloatMatchesDouble) {
  std::mt19937 rng(23);
  const int n = 5;
  const MeanCov truth{RandomVector(n, &rng), RandomSpd(n, &rng)};
  const VectorXd g1 = RandomVector(n, &rng);
  const MatrixXd g2 = RandomMatrix(n, n, &rng);
  for (GaussianParametrization p : AllParametrizations()) {
    const auto [p1, p2] = OracleParams(p, truth);
    auto qd = GaussianFromParams<double>(p, p1, p2);
    auto qf = GaussianFromParams<float>(p, p1.cast<float>(), p2.cast<float>());
    ASSERT_TRUE(qd.ok() && qf.ok());
    const auto d = ExpectationGradientFrom<double>(p, *qd, g1, g2);
    const auto f = ExpectationGradientFrom<float>(p, *qf, g1.cast<float>(),
                                                  g2.cast<float>());
    const double scale = 1 + d.g1.cwiseAbs().maxCoeff() + d.g2.cwiseAbs().maxCoeff();
    EXPECT_LT(MaxAbsDiff(f.g1.cast<double>(), d.g1), 1e-4 * scale);
    EXPECT_LT(MaxAbsDiff(f.g2.cast<double>(), d.g2), 1e-4 * scale);
  }
}

}  // namespace
}  // namespace natgrad::core
