// Large dense products of the K-FAC block through OpenBLAS (cblas ?gemm,
// ?syrk), column-major. Small products stay on Eigen (see kfac_kernels.h):
// below kBlasMinWork multiply-adds the call overhead is not worth it.
//
// Threads: the process-wide OpenBLAS thread count belongs to the inversion
// engine (server/engine/cpu_backend.cc toggles it between 1 and all cores).
// These helpers never change it. When it is above 1 a product is one BLAS
// call and OpenBLAS splits it; when it is 1 (the engine streams batches, or
// last ran one) a product of at least kBlasSplitWork multiply-adds is cut
// into column panels run on short-lived threads, one single-threaded BLAS
// call each, up to std::thread::hardware_concurrency() of them. See README.
#ifndef NATGRAD_SERVER_CORE_KFAC_BLAS_PRODUCTS_H_
#define NATGRAD_SERVER_CORE_KFAC_BLAS_PRODUCTS_H_

#include <cstdint>

namespace natgrad::core::kfac {

// m * n * k at or above which a product goes to BLAS.
inline constexpr int64_t kBlasMinWork = int64_t{64} * 64 * 64;
// m * n * k at or above which a product is split over threads when the
// OpenBLAS thread count is 1.
inline constexpr int64_t kBlasSplitWork = int64_t{192} * 192 * 192;

inline bool UseBlas(int64_t m, int64_t n, int64_t k) {
  return m * n * k >= kBlasMinWork;
}

// C = alpha op(A) op(B) + beta C; op(A) is m x k, op(B) k x n, C m x n.
template <typename Scalar>
void BlasGemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
              Scalar alpha, const Scalar* a, int64_t lda, const Scalar* b,
              int64_t ldb, Scalar beta, Scalar* c, int64_t ldc);

// Lower triangle of the n x n C = alpha X^T X (beta 0), X is k x n. The
// strict upper triangle of C is not touched.
template <typename Scalar>
void BlasGramLower(int64_t n, int64_t k, Scalar alpha, const Scalar* x,
                   int64_t ldx, Scalar* c, int64_t ldc);

extern template void BlasGemm<float>(bool, bool, int64_t, int64_t, int64_t,
                                     float, const float*, int64_t,
                                     const float*, int64_t, float, float*,
                                     int64_t);
extern template void BlasGemm<double>(bool, bool, int64_t, int64_t, int64_t,
                                      double, const double*, int64_t,
                                      const double*, int64_t, double, double*,
                                      int64_t);
extern template void BlasGramLower<float>(int64_t, int64_t, float,
                                          const float*, int64_t, float*,
                                          int64_t);
extern template void BlasGramLower<double>(int64_t, int64_t, double,
                                           const double*, int64_t, double*,
                                           int64_t);

}  // namespace natgrad::core::kfac

#endif  // NATGRAD_SERVER_CORE_KFAC_BLAS_PRODUCTS_H_
