// The EKFAC block's own arithmetic kernels (docs/math.md, EKFAC), templates
// over the state precision; the products and Gram factors are kfac_dense's
// (kfac_kernels.h). Exposed so the tests can check the scaling estimator and
// the update formula on their own, and K-FAC's eigen-exact update as the
// special case s = s_G s_A^T.
#ifndef NATGRAD_SERVER_BLOCKS_EKFAC_MATH_EKFAC_KERNELS_H_
#define NATGRAD_SERVER_BLOCKS_EKFAC_MATH_EKFAC_KERNELS_H_

#include <cstdint>

#include "Eigen/Core"
#include "server/blocks/kfac_dense/math/kfac_kernels.h"
#include "server/linalg/compute_pool.h"

namespace natgrad::core::ekfac {

// The matrix type and the products are kfac_dense's (kfac_kernels.h).
using kfac::Matrix;
using kfac::Product;

// This step's estimate of the scaling in the eigenbasis,
//   s = (1/n) sum_i (U_G^T G_i U_A)^2   (elementwise square),
// from the rotated rows: ga = g U_G ([n*T, d_out]) and aa = abar U_A
// ([n*T, d_a]), rows grouped by example (T consecutive rows each). Example
// i's gradient in the eigenbasis is P_i = sum_t ga_{i,t}^T aa_{i,t}.
// T = 1: P_i is the outer product of two rows, so P_i^2 = ga_i^2 aa_i^2^T and
// the sum is one product (ga^2)^T (aa^2) of n * d_out * d_a multiply-adds.
// T > 1: P_i is formed per example (T * d_out * d_a each, the cost of the
// per-example gradient itself) and squared.
template <typename Scalar>
Matrix<Scalar> ScalingEstimate(const Matrix<Scalar>& ga, const Matrix<Scalar>& aa,
                               int64_t locations,
                               linalg::ComputePool* pool = nullptr) {
  const Eigen::Index rows = ga.rows();
  const Eigen::Index n = rows / locations;
  if (locations == 1) {
    const Matrix<Scalar> ga2 = ga.array().square().matrix();
    const Matrix<Scalar> aa2 = aa.array().square().matrix();
    Matrix<Scalar> s = Product<Scalar>(ga2, true, aa2, false, pool);
    s /= static_cast<Scalar>(n);
    return s;
  }
  Matrix<Scalar> s = Matrix<Scalar>::Zero(ga.cols(), aa.cols());
  Matrix<Scalar> p(ga.cols(), aa.cols());
  for (Eigen::Index i = 0; i < n; ++i) {
    const Eigen::Index r = i * locations;
    p.noalias() = ga.middleRows(r, locations).transpose() *
                  aa.middleRows(r, locations);
    s.array() += p.array().square();
  }
  s /= static_cast<Scalar>(n);
  return s;
}

// V = U_G [(U_G^T grad U_A) / (s + lambda)] U_A^T.
template <typename Scalar>
Matrix<Scalar> PreconditionScaled(const Matrix<Scalar>& u_g,
                                  const Matrix<Scalar>& u_a,
                                  const Matrix<Scalar>& scaling,
                                  const Matrix<Scalar>& grad, Scalar lambda,
                                  linalg::ComputePool* pool = nullptr) {
  Matrix<Scalar> rotated = Product<Scalar>(
      Product<Scalar>(u_g, true, grad, false, pool), false, u_a, false, pool);
  rotated.array() /= (scaling.array() + lambda);
  return Product<Scalar>(Product<Scalar>(u_g, false, rotated, false, pool),
                         false, u_a, true, pool);
}

}  // namespace natgrad::core::ekfac

#endif  // NATGRAD_SERVER_BLOCKS_EKFAC_MATH_EKFAC_KERNELS_H_
