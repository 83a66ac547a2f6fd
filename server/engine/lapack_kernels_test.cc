#include "server/engine/lapack_kernels.h"

#include <cmath>
#include <limits>

#include "gtest/gtest.h"
#include "server/engine/engine_test_util.h"

namespace natgrad::engine {
namespace {

using ::natgrad::engine::testing::ExpectEighMatches;
using ::natgrad::engine::testing::ExpectInverseMatches;
using ::natgrad::engine::testing::RandomSpd;
using ::natgrad::engine::testing::SingularPsd;

template <typename T>
class LapackKernelsTest : public ::testing::Test {};
using Scalars = ::testing::Types<float, double>;
TYPED_TEST_SUITE(LapackKernelsTest, Scalars);

TYPED_TEST(LapackKernelsTest, EighReconstructsAndIsOrthonormal) {
  for (int n : {1, 2, 7, 64, 150}) {
    const auto a = RandomSpd<TypeParam>(n, 100 + n);
    auto d = DecomposeLapack<TypeParam>(a, DecompositionKind::kEigh);
    ASSERT_TRUE(d.ok()) << d.status();
    EXPECT_EQ(d->retries, 0);
    ExpectEighMatches<TypeParam>(a, *d);
  }
}

TYPED_TEST(LapackKernelsTest, CholeskyInverseTimesAIsIdentity) {
  for (int n : {1, 3, 33, 128}) {
    const auto a = RandomSpd<TypeParam>(n, 200 + n);
    auto d = DecomposeLapack<TypeParam>(a, DecompositionKind::kCholeskyInverse);
    ASSERT_TRUE(d.ok()) << d.status();
    EXPECT_EQ(d->retries, 0);
    EXPECT_EQ(d->eigenvalues.size(), 0);
    ExpectInverseMatches<TypeParam>(a, *d);
    // potri writes one triangle; the other must be mirrored exactly.
    EXPECT_EQ(d->matrix, d->matrix.transpose());
  }
}

TYPED_TEST(LapackKernelsTest, AsymmetricInputIsSymmetrisedFirst) {
  auto a = RandomSpd<TypeParam>(20, 7);
  a(3, 1) += TypeParam(0.25);  // (a + aᵀ)/2 is still SPD
  auto d = DecomposeLapack<TypeParam>(a, DecompositionKind::kEigh);
  ASSERT_TRUE(d.ok());
  ExpectEighMatches<TypeParam>(a, *d);  // the oracle compares with sym(a)
  auto inv = DecomposeLapack<TypeParam>(a, DecompositionKind::kCholeskyInverse);
  ASSERT_TRUE(inv.ok());
  ExpectInverseMatches<TypeParam>(a, *inv);
}

TYPED_TEST(LapackKernelsTest, NonFiniteInputIsRefused) {
  for (TypeParam bad : {std::numeric_limits<TypeParam>::quiet_NaN(),
                        std::numeric_limits<TypeParam>::infinity()}) {
    auto a = RandomSpd<TypeParam>(8, 1);
    a(2, 5) = bad;
    for (auto kind : {DecompositionKind::kEigh, DecompositionKind::kCholeskyInverse}) {
      auto d = DecomposeLapack<TypeParam>(a, kind);
      ASSERT_FALSE(d.ok());
      EXPECT_EQ(d.status().code(), absl::StatusCode::kInvalidArgument);
      EXPECT_NE(d.status().message().find("non-finite"), absl::string_view::npos);
    }
  }
}

TYPED_TEST(LapackKernelsTest, NonSquareIsRefused) {
  MatrixX<TypeParam> a = MatrixX<TypeParam>::Ones(3, 4);
  auto d = DecomposeLapack<TypeParam>(a, DecompositionKind::kEigh);
  EXPECT_EQ(d.status().code(), absl::StatusCode::kInvalidArgument);
}

TYPED_TEST(LapackKernelsTest, EmptyMatrixIsFine) {
  MatrixX<TypeParam> a(0, 0);
  for (auto kind : {DecompositionKind::kEigh, DecompositionKind::kCholeskyInverse}) {
    auto d = DecomposeLapack<TypeParam>(a, kind);
    ASSERT_TRUE(d.ok());
    EXPECT_EQ(d->matrix.size(), 0);
  }
}

TYPED_TEST(LapackKernelsTest, EigenvaluesOfSingularPsdAreClampedAtZero) {
  const auto a = SingularPsd<TypeParam>(40, 10, 3);
  auto d = DecomposeLapack<TypeParam>(a, DecompositionKind::kEigh);
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(d->retries, 0);
  // 30 exact zeros that rounding would make slightly negative.
  EXPECT_GE(d->eigenvalues.minCoeff(), TypeParam(0));
  ExpectEighMatches<TypeParam>(a, *d);
}

TYPED_TEST(LapackKernelsTest, SingularCholeskyIsRetriedWithJitter) {
  const int n = 40;
  const auto a = SingularPsd<TypeParam>(n, n / 2, 11);
  auto d = DecomposeLapack<TypeParam>(a, DecompositionKind::kCholeskyInverse);
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_GE(d->retries, 1);
  ASSERT_TRUE(d->matrix.allFinite());
  // The result is (A + δI)⁻¹ with δ tiny against A's nonzero spectrum, so it
  // acts as a pseudo-inverse there: A X A ≈ A.
  const Eigen::MatrixXd ad = a.template cast<double>();
  const Eigen::MatrixXd x = d->matrix.template cast<double>();
  EXPECT_LT((ad * x * ad - ad).norm() / ad.norm(), 1e-2);
}

TYPED_TEST(LapackKernelsTest, ZeroMatrixInverseUsesAbsoluteJitter) {
  MatrixX<TypeParam> a = MatrixX<TypeParam>::Zero(5, 5);
  auto d = DecomposeLapack<TypeParam>(a, DecompositionKind::kCholeskyInverse);
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_GE(d->retries, 1);
  EXPECT_TRUE(d->matrix.allFinite());
}

}  // namespace
}  // namespace natgrad::engine
