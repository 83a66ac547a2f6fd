#include "server/linalg/products.h"

#include <algorithm>
#include <cmath>

#include "server/linalg/blas.h"

namespace natgrad::linalg {

int PanelCount(int64_t work, int64_t cols, const ComputePool* pool) {
  const int p = Parallelism(pool);
  if (p <= 1 || work < kBlasSplitWork) return 1;
  return static_cast<int>(
      std::clamp<int64_t>(cols / kMinPanelColumns, 1, p));
}

template <typename Scalar>
void Gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
          Scalar alpha, const Scalar* a, int64_t lda, const Scalar* b,
          int64_t ldb, Scalar beta, Scalar* c, int64_t ldc,
          ComputePool* pool) {
  const int panels = PanelCount(m * n * k, n, pool);
  if (panels == 1) {
    blas::Gemm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  // Column panel [j0, j1) of C needs columns j0..j1 of op(B).
  pool->ParallelFor(panels, [&](size_t p) {
    const int64_t j0 = n * static_cast<int64_t>(p) / panels;
    const int64_t j1 = n * static_cast<int64_t>(p + 1) / panels;
    const Scalar* bp = trans_b ? b + j0 : b + j0 * ldb;
    blas::Gemm(trans_a, trans_b, m, j1 - j0, k, alpha, a, lda, bp, ldb, beta,
               c + j0 * ldc, ldc);
  });
}

namespace {

// Column block [j0, j1) of Gram panels p of `panels`: blocks of equal
// trapezoid area (the area of columns [0, j) is n j - j^2 / 2, so
// j = n (1 - sqrt(1 - f))).
int64_t PanelEdge(int64_t n, int panels, int64_t p) {
  if (p >= panels) return n;
  const double f = static_cast<double>(p) / panels;
  return std::clamp<int64_t>(static_cast<int64_t>(std::llround(n * (1.0 - std::sqrt(1.0 - f)))),
                             0, n);
}

}  // namespace

template <typename Scalar>
void GramLower(int64_t n, int64_t k, Scalar alpha, const Scalar* x,
               int64_t ldx, Scalar* c, int64_t ldc, ComputePool* pool) {
  const int panels = PanelCount(n * n * k / 2, n, pool);
  if (panels == 1) {
    blas::SyrkLowerTrans(n, k, alpha, x, ldx, Scalar(0), c, ldc);
    return;
  }
  // Column block [j0, j1) of the lower triangle: its diagonal square by
  // SYRK, the rows below by GEMM.
  pool->ParallelFor(panels, [&](size_t p) {
    const int64_t j0 = PanelEdge(n, panels, p), j1 = PanelEdge(n, panels, p + 1), w = j1 - j0;
    if (w <= 0) return;
    blas::SyrkLowerTrans(w, k, alpha, x + j0 * ldx, ldx, Scalar(0),
                         c + j0 + j0 * ldc, ldc);
    if (n - j1 > 0) {
      blas::Gemm(true, false, n - j1, w, k, alpha, x + j1 * ldx, ldx,
                 x + j0 * ldx, ldx, Scalar(0), c + j1 + j0 * ldc, ldc);
    }
  });
}

template <typename Scalar>
void GramLowerRowMajor(int64_t n, int64_t k, Scalar alpha, const Scalar* x, int64_t ldx,
                       Scalar* c, int64_t ldc, ComputePool* pool) {
  // x as column-major memory is Z = X^T (n x k, leading dimension ldx):
  // C = Z Z^T, and feature j is row j of Z (x + j).
  const int panels = PanelCount(n * n * k / 2, n, pool);
  if (panels == 1) {
    blas::SyrkLower(n, k, alpha, x, ldx, Scalar(0), c, ldc);
    return;
  }
  pool->ParallelFor(panels, [&](size_t p) {
    const int64_t j0 = PanelEdge(n, panels, p), j1 = PanelEdge(n, panels, p + 1), w = j1 - j0;
    if (w <= 0) return;
    blas::SyrkLower(w, k, alpha, x + j0, ldx, Scalar(0), c + j0 + j0 * ldc, ldc);
    if (n - j1 > 0) {
      blas::Gemm(false, true, n - j1, w, k, alpha, x + j1, ldx, x + j0, ldx, Scalar(0),
                 c + j1 + j0 * ldc, ldc);
    }
  });
}

template void Gemm<float>(bool, bool, int64_t, int64_t, int64_t, float,
                          const float*, int64_t, const float*, int64_t, float,
                          float*, int64_t, ComputePool*);
template void Gemm<double>(bool, bool, int64_t, int64_t, int64_t, double,
                           const double*, int64_t, const double*, int64_t,
                           double, double*, int64_t, ComputePool*);
template void GramLower<float>(int64_t, int64_t, float, const float*, int64_t,
                               float*, int64_t, ComputePool*);
template void GramLower<double>(int64_t, int64_t, double, const double*,
                                int64_t, double*, int64_t, ComputePool*);
template void GramLowerRowMajor<float>(int64_t, int64_t, float, const float*, int64_t, float*,
                                       int64_t, ComputePool*);
template void GramLowerRowMajor<double>(int64_t, int64_t, double, const double*, int64_t,
                                        double*, int64_t, ComputePool*);

}  // namespace natgrad::linalg
