// Test-only oracles for the Gaussian block: random instances and conversions
// written the plain way (Eigen's general inverse, no shared code with the
// library), so tests compare two independent implementations.
#ifndef NATGRAD_SERVER_BLOCKS_GAUSSIAN_MATH_GAUSSIAN_TEST_UTIL_H_
#define NATGRAD_SERVER_BLOCKS_GAUSSIAN_MATH_GAUSSIAN_TEST_UTIL_H_

#include <random>
#include <utility>
#include <vector>

#include "Eigen/Cholesky"
#include "Eigen/Core"
#include "Eigen/LU"
#include "server/blocks/gaussian/math/gaussian_parametrization.h"

#include "server/core/block.h"

namespace natgrad::core::testing {

using Eigen::MatrixXd;
using Eigen::VectorXd;

inline const std::vector<GaussianParametrization>& AllParametrizations() {
  static const std::vector<GaussianParametrization> all = {
      GaussianParametrization::kNatural, GaussianParametrization::kExpectation,
      GaussianParametrization::kMeanCovariance,
      GaussianParametrization::kMeanCholesky};
  return all;
}

inline VectorXd RandomVector(int n, std::mt19937* rng, double scale = 1.0) {
  std::normal_distribution<double> normal(0.0, scale);
  VectorXd v(n);
  for (int i = 0; i < n; ++i) v(i) = normal(*rng);
  return v;
}

inline MatrixXd RandomMatrix(int r, int c, std::mt19937* rng) {
  std::normal_distribution<double> normal(0.0, 1.0);
  MatrixXd x(r, c);
  for (int j = 0; j < c; ++j)
    for (int i = 0; i < r; ++i) x(i, j) = normal(*rng);
  return x;
}

inline MatrixXd RandomSymmetric(int n, std::mt19937* rng) {
  const MatrixXd x = RandomMatrix(n, n, rng);
  return 0.5 * (x + x.transpose());
}

// Moderately conditioned SPD matrix (eigenvalues roughly in [0.3, 3]).
inline MatrixXd RandomSpd(int n, std::mt19937* rng) {
  const MatrixXd x = RandomMatrix(n, n, rng) / std::sqrt(double(n));
  MatrixXd s = x * x.transpose() + 0.3 * MatrixXd::Identity(n, n);
  return 0.5 * (s + s.transpose());
}

struct MeanCov {
  VectorXd m;
  MatrixXd s;
};

// (m, S) -> (p1, p2) in parametrisation p, the textbook way.
inline std::pair<VectorXd, MatrixXd> OracleParams(GaussianParametrization p,
                                                  const MeanCov& q) {
  switch (p) {
    case GaussianParametrization::kNatural: {
      const MatrixXd prec = q.s.inverse();
      return {prec * q.m, -0.5 * prec};
    }
    case GaussianParametrization::kExpectation:
      return {q.m, q.s + q.m * q.m.transpose()};
    case GaussianParametrization::kMeanCovariance:
      return {q.m, q.s};
    case GaussianParametrization::kMeanCholesky:
      return {q.m, MatrixXd(q.s.llt().matrixL())};
  }
  return {};
}

// (p1, p2) in parametrisation p -> (m, S); works for non-symmetric p2 too
// (finite differences perturb single entries).
inline MeanCov OracleMeanCov(GaussianParametrization p, const VectorXd& p1,
                             const MatrixXd& p2) {
  switch (p) {
    case GaussianParametrization::kNatural: {
      const MatrixXd s = (-2.0 * p2).inverse();
      return {s * p1, s};
    }
    case GaussianParametrization::kExpectation:
      return {p1, p2 - p1 * p1.transpose()};
    case GaussianParametrization::kMeanCovariance:
      return {p1, p2};
    case GaussianParametrization::kMeanCholesky: {
      const MatrixXd l = p2.triangularView<Eigen::Lower>();
      return {p1, l * l.transpose()};
    }
  }
  return {};
}

// A Gaussian block's kind-specific output.
inline const GaussianStepOutput& GaussianOf(const BlockStepOutput& out) {
  return std::get<GaussianStepOutput>(out.kind_output);
}

inline double MaxAbsDiff(const MatrixXd& a, const MatrixXd& b) {
  return (a - b).cwiseAbs().maxCoeff();
}

}  // namespace natgrad::core::testing

#endif  // NATGRAD_SERVER_BLOCKS_GAUSSIAN_MATH_GAUSSIAN_TEST_UTIL_H_
