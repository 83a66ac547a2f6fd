#include "server/blocks/gaussian/math/gaussian_parametrization.h"

#include <random>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/blocks/gaussian/math/gaussian_test_util.h"

namespace natgrad::core {
namespace {

using ::natgrad::core::testing::AllParametrizations;
using ::natgrad::core::testing::MaxAbsDiff;
using ::natgrad::core::testing::MeanCov;
using ::natgrad::core::testing::OracleMeanCov;
using ::natgrad::core::testing::OracleParams;
using ::natgrad::core::testing::RandomSpd;
using ::natgrad::core::testing::RandomVector;
using ::testing::HasSubstr;
using Eigen::MatrixXd;
using Eigen::VectorXd;

class ParametrizationTest
    : public ::testing::TestWithParam<GaussianParametrization> {};

TEST_P(ParametrizationTest, FromParamsMatchesTextbookFormulas) {
  const GaussianParametrization p = GetParam();
  std::mt19937 rng(11);
  for (int trial = 0; trial < 10; ++trial) {
    const int n = 1 + trial;
    const MeanCov truth{RandomVector(n, &rng), RandomSpd(n, &rng)};
    const auto [p1, p2] = OracleParams(p, truth);
    absl::StatusOr<GaussianForms<double>> q = GaussianFromParams<double>(p, p1, p2);
    ASSERT_TRUE(q.ok()) << q.status();
    EXPECT_LT(MaxAbsDiff(q->mean, truth.m), 1e-10);
    EXPECT_LT(MaxAbsDiff(q->cov, truth.s), 1e-10);
    EXPECT_LT(MaxAbsDiff(q->precision, truth.s.inverse()), 1e-9);
    EXPECT_LT(MaxAbsDiff(q->theta1, truth.s.inverse() * truth.m), 1e-9);
    EXPECT_LT(MaxAbsDiff(q->chol * q->chol.transpose(), truth.s), 1e-10);
    EXPECT_TRUE(q->chol.isLowerTriangular(0.0));
    EXPECT_EQ(q->cov, q->cov.transpose());
    EXPECT_EQ(q->precision, q->precision.transpose());

    // And back, against the textbook forms of every parametrisation.
    for (GaussianParametrization out : AllParametrizations()) {
      const auto [o1, o2] = OracleParams(out, truth);
      const GaussianParams<double> back = GaussianToParams(*q, out);
      EXPECT_LT(MaxAbsDiff(back.first, o1), 1e-9)
          << GaussianParametrizationName(out);
      EXPECT_LT(MaxAbsDiff(back.second, o2), 1e-9)
          << GaussianParametrizationName(out);
    }
  }
}

TEST_P(ParametrizationTest, RoundTripsThroughEveryOtherParametrization) {
  const GaussianParametrization p = GetParam();
  std::mt19937 rng(12);
  for (int trial = 0; trial < 10; ++trial) {
    const int n = 2 + trial;
    const auto [p1, p2] =
        OracleParams(p, {RandomVector(n, &rng), RandomSpd(n, &rng)});
    for (GaussianParametrization via : AllParametrizations()) {
      auto q = GaussianFromParams<double>(p, p1, p2);
      ASSERT_TRUE(q.ok()) << q.status();
      const GaussianParams<double> mid = GaussianToParams(*q, via);
      auto q2 = GaussianFromParams<double>(via, mid.first, mid.second);
      ASSERT_TRUE(q2.ok()) << q2.status();
      const GaussianParams<double> back = GaussianToParams(*q2, p);
      EXPECT_LT(MaxAbsDiff(back.first, p1), 1e-9);
      EXPECT_LT(MaxAbsDiff(back.second, p2), 1e-9);
    }
  }
}

TEST_P(ParametrizationTest, FloatRoundTrip) {
  const GaussianParametrization p = GetParam();
  std::mt19937 rng(13);
  const int n = 6;
  const auto [p1, p2] =
      OracleParams(p, {RandomVector(n, &rng), RandomSpd(n, &rng)});
  for (GaussianParametrization via : AllParametrizations()) {
    auto q = GaussianFromParams<float>(p, p1.cast<float>(), p2.cast<float>());
    ASSERT_TRUE(q.ok()) << q.status();
    const GaussianParams<float> mid = GaussianToParams(*q, via);
    auto q2 = GaussianFromParams<float>(via, mid.first, mid.second);
    ASSERT_TRUE(q2.ok()) << q2.status();
    const GaussianParams<float> back = GaussianToParams(*q2, p);
    EXPECT_LT(MaxAbsDiff(back.first.cast<double>(), p1), 1e-4);
    EXPECT_LT(MaxAbsDiff(back.second.cast<double>(), p2), 1e-4);
  }
}

TEST_P(ParametrizationTest, RejectsNonPositiveDefinite) {
  const GaussianParametrization p = GetParam();
  const int n = 3;
  VectorXd m = VectorXd::LinSpaced(n, -1, 1);
  MatrixXd p2;
  switch (p) {
    case GaussianParametrization::kNatural:  // −2θ2 = −I
      p2 = 0.5 * MatrixXd::Identity(n, n);
      break;
    case GaussianParametrization::kExpectation:  // η2 − mmᵀ = −mmᵀ
      p2 = MatrixXd::Zero(n, n);
      break;
    case GaussianParametrization::kMeanCovariance:
      p2 = MatrixXd::Identity(n, n);
      p2(1, 1) = -1;
      break;
    case GaussianParametrization::kMeanCholesky:
      p2 = MatrixXd::Identity(n, n);
      p2(2, 2) = 0;
      break;
  }
  auto q = GaussianFromParams<double>(p, m, p2, "gaussian.param2[0]");
  ASSERT_FALSE(q.ok());
  EXPECT_EQ(q.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(q.status().message(),
              HasSubstr("gaussian.param2[0] is not"));
  EXPECT_THAT(q.status().message(), HasSubstr("positive definite"));
}

INSTANTIATE_TEST_SUITE_P(
    All, ParametrizationTest, ::testing::ValuesIn(AllParametrizations()),
    [](const auto& info) {
      return std::string(GaussianParametrizationName(info.param));
    });

// Only parametrisations whose second part is a symmetric matrix (a Cholesky
// factor is triangular and is checked by CholeskyParametrizationTest).
class SymmetricSecondPartTest : public ::testing::TestWithParam<GaussianParametrization> {};

TEST_P(SymmetricSecondPartTest, RejectsNonSymmetric) {
  const GaussianParametrization p = GetParam();
  std::mt19937 rng(14);
  const auto [p1, p2] =
      OracleParams(p, {RandomVector(4, &rng), RandomSpd(4, &rng)});
  MatrixXd bad = p2;
  bad(0, 3) += 1e-2;
  auto q = GaussianFromParams<double>(p, p1, bad, "X");
  ASSERT_FALSE(q.ok());
  EXPECT_EQ(q.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(q.status().message(), HasSubstr("X is not symmetric"));
  // Rounding-level asymmetry is accepted and symmetrised.
  MatrixXd fuzzy = p2;
  fuzzy(0, 3) *= 1 + 1e-9;
  auto ok = GaussianFromParams<double>(p, p1, fuzzy);
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ(ok->cov, ok->cov.transpose());
}

INSTANTIATE_TEST_SUITE_P(
    Symmetric, SymmetricSecondPartTest,
    ::testing::Values(GaussianParametrization::kNatural, GaussianParametrization::kExpectation,
                      GaussianParametrization::kMeanCovariance),
    [](const auto& info) { return std::string(GaussianParametrizationName(info.param)); });

TEST(CholeskyParametrizationTest, RejectsEntriesAboveDiagonal) {
  MatrixXd l = MatrixXd::Identity(3, 3);
  l(0, 2) = 1e-12;
  auto q = GaussianFromParams<double>(GaussianParametrization::kMeanCholesky,
                                      VectorXd::Zero(3), l, "F");
  ASSERT_FALSE(q.ok());
  EXPECT_EQ(q.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(q.status().message(),
              HasSubstr("F has nonzero entries above the diagonal"));
}

TEST(CholeskyParametrizationTest, RejectsNegativeDiagonal) {
  MatrixXd l = MatrixXd::Identity(3, 3);
  l(1, 1) = -2;
  auto q = GaussianFromParams<double>(GaussianParametrization::kMeanCholesky,
                                      VectorXd::Zero(3), l, "F");
  ASSERT_FALSE(q.ok());
  EXPECT_THAT(q.status().message(), HasSubstr("F is not positive definite"));
}

TEST(LowerHalfDiagonalTest, KeepsLowerHalvesDiagonal) {
  MatrixXd x(2, 2);
  x << 2, 3, 4, 6;
  MatrixXd want(2, 2);
  want << 1, 0, 4, 3;
  EXPECT_EQ(LowerHalfDiagonal<double>(x), want);
}

}  // namespace
}  // namespace natgrad::core
