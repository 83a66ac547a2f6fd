// Closed-form natural-gradient directions against finite-difference JVPs of
// the textbook map θ -> ξ: (ξ(θ + hv) − ξ(θ − hv)) / 2h.
#include "server/blocks/gaussian/math/natural_gradient_direction.h"

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
using ::natgrad::core::testing::RandomSymmetric;
using ::natgrad::core::testing::RandomVector;
using Eigen::MatrixXd;
using Eigen::VectorXd;

class DirectionTest : public ::testing::TestWithParam<GaussianParametrization> {
};

TEST_P(DirectionTest, MatchesFiniteDifferenceJvpOfThetaToXi) {
  const GaussianParametrization p = GetParam();
  std::mt19937 rng(31);
  for (int trial = 0; trial < 8; ++trial) {
    const int n = 1 + trial;
    const MeanCov truth{RandomVector(n, &rng), RandomSpd(n, &rng)};
    const auto [t1, t2] = OracleParams(GaussianParametrization::kNatural, truth);
    const ExpectationGradient<double> v{RandomVector(n, &rng),
                                        RandomSymmetric(n, &rng)};

    const auto xi_at = [&](double t) {
      return OracleParams(
          p, OracleMeanCov(GaussianParametrization::kNatural, t1 + t * v.g1,
                           t2 + t * v.g2));
    };
    const double h = 1e-5;
    const auto [a1, a2] = xi_at(h);
    const auto [b1, b2] = xi_at(-h);
    const VectorXd fd1 = (a1 - b1) / (2 * h);
    const MatrixXd fd2 = (a2 - b2) / (2 * h);

    const auto [x1, x2] = OracleParams(p, truth);
    auto q = GaussianFromParams<double>(p, x1, x2);
    ASSERT_TRUE(q.ok()) << q.status();
    const GaussianParams<double> d = NaturalGradientDirection<double>(p, *q, v);
    const double scale = 1 + fd1.cwiseAbs().maxCoeff() + fd2.cwiseAbs().maxCoeff();
    EXPECT_LT(MaxAbsDiff(d.first, fd1), 1e-7 * scale) << "n=" << n;
    EXPECT_LT(MaxAbsDiff(d.second, fd2), 1e-7 * scale) << "n=" << n;
  }
}

INSTANTIATE_TEST_SUITE_P(
    All, DirectionTest, ::testing::ValuesIn(AllParametrizations()),
    [](const auto& info) {
      return std::string(GaussianParametrizationName(info.param));
    });

// docs/math.md (Gaussian) states the directions in terms of the (m, S) gradient:
// ṁ = S ∂L/∂m, Ṡ = 2SGS, L̇ = L Φ(2LᵀGL).
TEST(DirectionTest, DesignClosedFormsFromMeanCovarianceGradient) {
  std::mt19937 rng(32);
  const int n = 5;
  const MeanCov truth{RandomVector(n, &rng), RandomSpd(n, &rng)};
  const VectorXd dm = RandomVector(n, &rng);
  const MatrixXd g = RandomSymmetric(n, &rng);
  auto q = GaussianFromParams<double>(GaussianParametrization::kMeanCovariance,
                                      truth.m, truth.s);
  ASSERT_TRUE(q.ok());
  const ExpectationGradient<double> v =
      ExpectationGradientFromMeanCovariance<double>(*q, dm, g);
  const auto cov =
      NaturalGradientDirection(GaussianParametrization::kMeanCovariance, *q, v);
  EXPECT_LT(MaxAbsDiff(cov.first, truth.s * dm), 1e-12);
  EXPECT_LT(MaxAbsDiff(cov.second, 2 * truth.s * g * truth.s), 1e-12);
  const auto chol =
      NaturalGradientDirection(GaussianParametrization::kMeanCholesky, *q, v);
  const MatrixXd l = truth.s.llt().matrixL();
  MatrixXd inner = 2 * l.transpose() * g * l;
  MatrixXd phi = inner.triangularView<Eigen::Lower>();
  phi.diagonal() *= 0.5;
  EXPECT_LT(MaxAbsDiff(chol.second, l * phi), 1e-12);
  EXPECT_TRUE(chol.second.isLowerTriangular(0.0));
}

}  // namespace
}  // namespace natgrad::core
