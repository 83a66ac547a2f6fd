// The products behind the Gaussian block against dense Eigen arithmetic, at
// sizes below (Eigen path) and above (BLAS path) the small-size threshold.
#include "server/blocks/gaussian/math/gaussian_linalg.h"

#include <random>

#include "gtest/gtest.h"

namespace natgrad::core::gaussian_linalg {
namespace {

using M = GMatrix<double>;

M Random(int r, int c, std::mt19937& rng) {
  std::normal_distribution<double> n;
  M m(r, c);
  for (int i = 0; i < r; ++i)
    for (int j = 0; j < c; ++j) m(i, j) = n(rng);
  return m;
}

class GaussianLinalg : public ::testing::TestWithParam<int> {};

TEST_P(GaussianLinalg, ProductsMatchDenseArithmetic) {
  const int n = GetParam();
  std::mt19937 rng(n);
  M s = Random(n, n, rng);
  s = (s + s.transpose()).eval();
  M lower_only = s.triangularView<Eigen::Lower>();  // what the BLAS side reads
  M b = Random(n, 3, rng), bt = Random(3, n, rng);
  const double tol = 1e-10 * n;
  EXPECT_LT((SymmetricTimes(lower_only, b) - s * b).cwiseAbs().maxCoeff(), tol);
  EXPECT_LT((TimesSymmetric(bt, lower_only) - bt * s).cwiseAbs().maxCoeff(), tol);

  M l = Random(n, n, rng).triangularView<Eigen::Lower>();
  l.diagonal() = l.diagonal().cwiseAbs().array() + n;  // well conditioned
  const M dense_l = l;
  for (bool left : {true, false}) {
    for (bool trans : {false, true}) {
      const M op = trans ? M(dense_l.transpose()) : dense_l;
      M x = left ? b : bt;
      LowerTriangularMultiply(l, left, trans, &x);
      const M want = left ? M(op * b) : M(bt * op);
      EXPECT_LT((x - want).cwiseAbs().maxCoeff(), tol) << left << trans;
      M y = want;
      LowerTriangularSolve(l, left, trans, &y);
      EXPECT_LT((y - (left ? b : bt)).cwiseAbs().maxCoeff(), tol) << left << trans;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(BelowAndAboveThreshold, GaussianLinalg, ::testing::Values(5, 127, 130));

}  // namespace
}  // namespace natgrad::core::gaussian_linalg
