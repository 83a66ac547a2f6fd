// The K-FAC dense block's arithmetic kernels, shared by the block and by
// bench/kfac. Templates over the state precision; products above a size
// threshold call OpenBLAS through server/linalg/products.h, split over the
// `pool` given (the step's core::StepContext::compute_pool; nullptr: one BLAS
// call on the caller's thread; see server/linalg/thread_policy.h).
#ifndef NATGRAD_SERVER_BLOCKS_KFAC_DENSE_MATH_KFAC_KERNELS_H_
#define NATGRAD_SERVER_BLOCKS_KFAC_DENSE_MATH_KFAC_KERNELS_H_

#include <cmath>

#include "Eigen/Core"
#include "server/linalg/compute_pool.h"
#include "server/linalg/products.h"

namespace natgrad::core::kfac {

template <typename Scalar>
using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;
template <typename Scalar>
using Vector = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;

// op(a) op(b), op = transpose when the flag says so. Products of at least
// linalg::kBlasMinWork multiply-adds go to OpenBLAS (linalg::Gemm), smaller
// ones stay on Eigen.
template <typename Scalar>
Matrix<Scalar> Product(const Matrix<Scalar>& a, bool trans_a,
                       const Matrix<Scalar>& b, bool trans_b,
                       linalg::ComputePool* pool = nullptr) {
  const Eigen::Index m = trans_a ? a.cols() : a.rows();
  const Eigen::Index k = trans_a ? a.rows() : a.cols();
  const Eigen::Index n = trans_b ? b.rows() : b.cols();
  Matrix<Scalar> out(m, n);
  if (m == 0 || n == 0) return out;
  // An empty inner dimension is a zero product (never handed to BLAS).
  if (k == 0) return Matrix<Scalar>::Zero(m, n);
  if (linalg::UseBlas(m, n, k)) {
    linalg::Gemm<Scalar>(trans_a, trans_b, m, n, k, Scalar(1), a.data(),
                         a.rows(), b.data(), b.rows(), Scalar(0), out.data(),
                         m, pool);
  } else if (trans_a && trans_b) {
    out.noalias() = a.transpose() * b.transpose();
  } else if (trans_a) {
    out.noalias() = a.transpose() * b;
  } else if (trans_b) {
    out.noalias() = a * b.transpose();
  } else {
    out.noalias() = a * b;
  }
  return out;
}

// Mirrors the lower triangle into the upper one (exact symmetry, no temp).
template <typename Scalar>
void CopyLowerToUpper(Matrix<Scalar>& m) {
  for (Eigen::Index j = 1; j < m.cols(); ++j) {
    m.col(j).head(j) = m.row(j).head(j).transpose();
  }
}

// x^T x / divisor for the rows of x, with a trailing column of ones appended
// when append_one (bias), without materialising [x, 1]. Exactly symmetric.
template <typename Scalar>
Matrix<Scalar> GramFactor(const Matrix<Scalar>& x, bool append_one,
                          Scalar divisor, linalg::ComputePool* pool = nullptr) {
  const Eigen::Index d = x.cols();
  const Eigen::Index n = d + (append_one ? 1 : 0);
  Matrix<Scalar> out = Matrix<Scalar>::Zero(n, n);
  // SYRK on the lower triangle: half the flops of x^T x.
  if (linalg::UseBlas(d, d, x.rows())) {
    linalg::GramLower<Scalar>(d, x.rows(), Scalar(1) / divisor, x.data(),
                              x.rows(), out.data(), n, pool);
  } else {
    out.topLeftCorner(d, d).template selfadjointView<Eigen::Lower>().rankUpdate(
        x.transpose(), Scalar(1) / divisor);
  }
  if (append_one) {
    out.row(d).head(d) = x.colwise().sum() / divisor;
    out(d, d) = static_cast<Scalar>(x.rows()) / divisor;
  }
  CopyLowerToUpper(out);
  return out;
}

// The same for the rows of a row-major [rows, cols] array as it came off
// the wire (raw statistics): no transposed copy of x first.
template <typename Scalar>
Matrix<Scalar> GramFactorRowMajor(const Scalar* x, Eigen::Index rows, Eigen::Index cols,
                                  bool append_one, Scalar divisor,
                                  linalg::ComputePool* pool = nullptr) {
  const Eigen::Index n = cols + (append_one ? 1 : 0);
  Matrix<Scalar> out = Matrix<Scalar>::Zero(n, n);
  const Eigen::Map<const Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>
      view(x, rows, cols);
  if (linalg::UseBlas(cols, cols, rows)) {
    linalg::GramLowerRowMajor<Scalar>(cols, rows, Scalar(1) / divisor, x, cols, out.data(), n,
                                      pool);
  } else {
    out.topLeftCorner(cols, cols).template selfadjointView<Eigen::Lower>().rankUpdate(
        view.transpose(), Scalar(1) / divisor);
  }
  if (append_one) {
    // Row by row: contiguous adds (a column sum of a row-major array strides).
    Eigen::Matrix<Scalar, 1, Eigen::Dynamic> sum = Eigen::Matrix<Scalar, 1, Eigen::Dynamic>::Zero(cols);
    for (Eigen::Index r = 0; r < rows; ++r) sum += view.row(r);
    out.row(cols).head(cols) = sum / divisor;
    out(cols, cols) = static_cast<Scalar>(rows) / divisor;
  }
  CopyLowerToUpper(out);
  return out;
}

// pi = sqrt((tr A / dim A) / (tr G / dim G)) (Martens & Grosse §6.3), 1 when
// either trace is not positive (an all-zero factor) or the ratio overflows.
template <typename Scalar>
double PiCorrection(const Matrix<Scalar>& a, const Matrix<Scalar>& g) {
  const double ta = static_cast<double>(a.trace()) / a.rows();
  const double tg = static_cast<double>(g.trace()) / g.rows();
  if (!(ta > 0) || !(tg > 0)) return 1.0;
  const double pi = std::sqrt(ta / tg);
  return std::isfinite(pi) && pi > 0 ? pi : 1.0;
}

// Exact damping in the Kronecker eigenbasis:
// V = Q_G [(Q_G^T grad Q_A) / (s_G s_A^T + lambda)] Q_A^T.
template <typename Scalar>
Matrix<Scalar> PreconditionEigen(const Matrix<Scalar>& q_g,
                                 const Vector<Scalar>& s_g,
                                 const Matrix<Scalar>& q_a,
                                 const Vector<Scalar>& s_a,
                                 const Matrix<Scalar>& grad, Scalar lambda,
                                 linalg::ComputePool* pool = nullptr) {
  Matrix<Scalar> rotated = Product<Scalar>(
      Product<Scalar>(q_g, true, grad, false, pool), false, q_a, false, pool);
  const Vector<Scalar> sg = s_g.cwiseMax(Scalar(0));
  const Vector<Scalar> sa = s_a.cwiseMax(Scalar(0));
  rotated.array() /= ((sg * sa.transpose()).array() + lambda);
  return Product<Scalar>(Product<Scalar>(q_g, false, rotated, false, pool),
                         false, q_a, true, pool);
}

// Factored Tikhonov with the damped inverses precomputed:
// V = (G + sqrt(lambda)/pi I)^-1 grad (A + pi sqrt(lambda) I)^-1.
template <typename Scalar>
Matrix<Scalar> PreconditionFactored(const Matrix<Scalar>& g_inverse,
                                    const Matrix<Scalar>& a_inverse,
                                    const Matrix<Scalar>& grad,
                                    linalg::ComputePool* pool = nullptr) {
  return Product<Scalar>(Product<Scalar>(g_inverse, false, grad, false, pool),
                         false, a_inverse, false, pool);
}

}  // namespace natgrad::core::kfac

#endif  // NATGRAD_SERVER_BLOCKS_KFAC_DENSE_MATH_KFAC_KERNELS_H_
