// Large dense products through OpenBLAS (cblas ?gemm, ?syrk), column-major,
// optionally split over a ComputePool. Callers keep small products on Eigen
// (UseBlas): below kBlasMinWork multiply-adds the call overhead is not worth
// it.
//
// Split policy (thread_policy.h has the whole picture): with a pool of
// parallelism p > 1, a product of at least kBlasSplitWork multiply-adds is
// cut into min(p, columns / kMinPanelColumns) column panels, each one BLAS
// call, run by ParallelFor on the pool's workers and the caller. Otherwise
// (no pool, p = 1, or a smaller product) it is one BLAS call on the caller's
// thread. Nothing here reads or changes OpenBLAS's thread count.
#ifndef NATGRAD_SERVER_LINALG_PRODUCTS_H_
#define NATGRAD_SERVER_LINALG_PRODUCTS_H_

#include <cstdint>

#include "server/linalg/compute_pool.h"

namespace natgrad::linalg {

// m * n * k at or above which a product goes to BLAS.
inline constexpr int64_t kBlasMinWork = int64_t{64} * 64 * 64;
// m * n * k at or above which a product is split over the pool.
inline constexpr int64_t kBlasSplitWork = int64_t{192} * 192 * 192;
// Narrowest panel worth a BLAS call of its own.
inline constexpr int64_t kMinPanelColumns = 32;

inline bool UseBlas(int64_t m, int64_t n, int64_t k) {
  return m * n * k >= kBlasMinWork;
}

// How many column panels a product of `work` multiply-adds with `cols`
// output columns is cut into on `pool` (1: one BLAS call, no split).
int PanelCount(int64_t work, int64_t cols, const ComputePool* pool);

// C = alpha op(A) op(B) + beta C; op(A) is m x k, op(B) k x n, C m x n.
template <typename Scalar>
void Gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
          Scalar alpha, const Scalar* a, int64_t lda, const Scalar* b,
          int64_t ldb, Scalar beta, Scalar* c, int64_t ldc,
          ComputePool* pool = nullptr);

// Lower triangle of the n x n C = alpha X^T X (beta 0), X is k x n. The
// strict upper triangle of C is not touched.
template <typename Scalar>
void GramLower(int64_t n, int64_t k, Scalar alpha, const Scalar* x,
               int64_t ldx, Scalar* c, int64_t ldc,
               ComputePool* pool = nullptr);

// The same Gram from X stored row-major (k rows of n values, row stride
// ldx >= n): C = alpha X^T X without transposing X first (as column-major
// memory it is X^T, n x k, so this is SYRK/GEMM without transposes).
template <typename Scalar>
void GramLowerRowMajor(int64_t n, int64_t k, Scalar alpha, const Scalar* x, int64_t ldx,
                       Scalar* c, int64_t ldc, ComputePool* pool = nullptr);

extern template void Gemm<float>(bool, bool, int64_t, int64_t, int64_t, float,
                                 const float*, int64_t, const float*, int64_t,
                                 float, float*, int64_t, ComputePool*);
extern template void Gemm<double>(bool, bool, int64_t, int64_t, int64_t,
                                  double, const double*, int64_t,
                                  const double*, int64_t, double, double*,
                                  int64_t, ComputePool*);
extern template void GramLower<float>(int64_t, int64_t, float, const float*,
                                      int64_t, float*, int64_t, ComputePool*);
extern template void GramLower<double>(int64_t, int64_t, double,
                                       const double*, int64_t, double*,
                                       int64_t, ComputePool*);
extern template void GramLowerRowMajor<float>(int64_t, int64_t, float, const float*, int64_t,
                                              float*, int64_t, ComputePool*);
extern template void GramLowerRowMajor<double>(int64_t, int64_t, double, const double*,
                                               int64_t, double*, int64_t, ComputePool*);

}  // namespace natgrad::linalg

#endif  // NATGRAD_SERVER_LINALG_PRODUCTS_H_
