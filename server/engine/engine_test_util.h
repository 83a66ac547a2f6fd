// Test helpers shared by the engine tests: random SPD matrices and the Eigen
// oracle checks (Q diag(s) Qᵀ ≈ A, QᵀQ ≈ I, inverse·A ≈ I).
#ifndef NATGRAD_SERVER_ENGINE_ENGINE_TEST_UTIL_H_
#define NATGRAD_SERVER_ENGINE_ENGINE_TEST_UTIL_H_

#include <random>

#include "Eigen/Core"
#include "gtest/gtest.h"
#include "server/engine/inversion_engine.h"

namespace natgrad::engine::testing {

template <typename Scalar>
using Mat = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;

// M Mᵀ / n + shift·I: eigenvalues in about [shift, shift + 4], well conditioned.
template <typename Scalar>
Mat<Scalar> RandomSpd(int n, uint32_t seed, double shift = 0.5) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> normal;
  Eigen::MatrixXd m(n, n);
  for (int j = 0; j < n; ++j)
    for (int i = 0; i < n; ++i) m(i, j) = normal(rng);
  Eigen::MatrixXd a = m * m.transpose() / std::max(n, 1);
  a.diagonal().array() += shift;
  return a.cast<Scalar>();
}

// Rank-`rank` PSD matrix B Bᵀ (singular for rank < n).
template <typename Scalar>
Mat<Scalar> SingularPsd(int n, int rank, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> normal;
  Eigen::MatrixXd b(n, rank);
  for (int j = 0; j < rank; ++j)
    for (int i = 0; i < n; ++i) b(i, j) = normal(rng);
  Eigen::MatrixXd a = b * b.transpose();
  return a.cast<Scalar>();
}

template <typename Scalar>
double Tol() {
  return std::is_same_v<Scalar, float> ? 2e-3 : 1e-9;
}

template <typename Scalar>
void ExpectEighMatches(const Mat<Scalar>& a, const Decomposition<Scalar>& d) {
  const int n = static_cast<int>(a.rows());
  ASSERT_EQ(d.kind, DecompositionKind::kEigh);
  ASSERT_EQ(d.eigenvalues.size(), n);
  ASSERT_EQ(d.matrix.rows(), n);
  ASSERT_EQ(d.matrix.cols(), n);
  for (int i = 0; i < n; ++i) {
    EXPECT_GE(d.eigenvalues(i), Scalar(0));
    if (i > 0) EXPECT_LE(d.eigenvalues(i - 1), d.eigenvalues(i));
  }
  const Eigen::MatrixXd q = d.matrix.template cast<double>();
  const Eigen::MatrixXd ad = a.template cast<double>();
  const Eigen::MatrixXd sym = (ad + ad.transpose()) / 2;
  const Eigen::MatrixXd rec =
      q * d.eigenvalues.template cast<double>().asDiagonal() * q.transpose();
  const double scale = std::max(1.0, sym.norm());
  EXPECT_LT((rec - sym).norm() / scale, Tol<Scalar>()) << "n=" << n;
  EXPECT_LT((q.transpose() * q - Eigen::MatrixXd::Identity(n, n)).norm(),
            Tol<Scalar>() * std::max(1, n) / 4)
      << "n=" << n;
}

template <typename Scalar>
void ExpectInverseMatches(const Mat<Scalar>& a, const Decomposition<Scalar>& d) {
  const int n = static_cast<int>(a.rows());
  ASSERT_EQ(d.kind, DecompositionKind::kCholeskyInverse);
  ASSERT_EQ(d.matrix.rows(), n);
  ASSERT_EQ(d.matrix.cols(), n);
  const Eigen::MatrixXd inv = d.matrix.template cast<double>();
  const Eigen::MatrixXd ad = a.template cast<double>();
  const Eigen::MatrixXd sym = (ad + ad.transpose()) / 2;
  EXPECT_LT((inv * sym - Eigen::MatrixXd::Identity(n, n)).norm() / std::sqrt(std::max(n, 1)),
            Tol<Scalar>())
      << "n=" << n;
  EXPECT_LT((inv - inv.transpose()).norm(), Tol<Scalar>() * std::max(1.0, inv.norm()));
}

}  // namespace natgrad::engine::testing

#endif  // NATGRAD_SERVER_ENGINE_ENGINE_TEST_UTIL_H_
