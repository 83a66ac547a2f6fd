#include "server/core/kfac/blas_products.h"

#include <algorithm>
#include <cmath>
#include <system_error>
#include <thread>
#include <vector>

// OpenBLAS's cblas, declared here rather than through <cblas.h> (which of
// the netlib / OpenBLAS headers that resolves to is a Debian alternative).
extern "C" {
void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k,
                 float alpha, const float* a, int lda, const float* b, int ldb,
                 float beta, float* c, int ldc);
void cblas_dgemm(int order, int trans_a, int trans_b, int m, int n, int k,
                 double alpha, const double* a, int lda, const double* b,
                 int ldb, double beta, double* c, int ldc);
void cblas_ssyrk(int order, int uplo, int trans, int n, int k, float alpha,
                 const float* a, int lda, float beta, float* c, int ldc);
void cblas_dsyrk(int order, int uplo, int trans, int n, int k, double alpha,
                 const double* a, int lda, double beta, double* c, int ldc);
int openblas_get_num_threads(void);
}

namespace natgrad::core::kfac {
namespace {

constexpr int kColMajor = 102;
constexpr int kNoTrans = 111;
constexpr int kTrans = 112;
constexpr int kLower = 122;

void Gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha,
          const float* a, int64_t lda, const float* b, int64_t ldb, float beta,
          float* c, int64_t ldc) {
  cblas_sgemm(kColMajor, ta ? kTrans : kNoTrans, tb ? kTrans : kNoTrans,
              static_cast<int>(m), static_cast<int>(n), static_cast<int>(k),
              alpha, a, static_cast<int>(lda), b, static_cast<int>(ldb), beta,
              c, static_cast<int>(ldc));
}
void Gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, double alpha,
          const double* a, int64_t lda, const double* b, int64_t ldb,
          double beta, double* c, int64_t ldc) {
  cblas_dgemm(kColMajor, ta ? kTrans : kNoTrans, tb ? kTrans : kNoTrans,
              static_cast<int>(m), static_cast<int>(n), static_cast<int>(k),
              alpha, a, static_cast<int>(lda), b, static_cast<int>(ldb), beta,
              c, static_cast<int>(ldc));
}
void Syrk(int64_t n, int64_t k, float alpha, const float* x, int64_t ldx,
          float* c, int64_t ldc) {
  cblas_ssyrk(kColMajor, kLower, kTrans, static_cast<int>(n),
              static_cast<int>(k), alpha, x, static_cast<int>(ldx), 0.0f, c,
              static_cast<int>(ldc));
}
void Syrk(int64_t n, int64_t k, double alpha, const double* x, int64_t ldx,
          double* c, int64_t ldc) {
  cblas_dsyrk(kColMajor, kLower, kTrans, static_cast<int>(n),
              static_cast<int>(k), alpha, x, static_cast<int>(ldx), 0.0, c,
              static_cast<int>(ldc));
}

// How many column panels to cut a product of `work` multiply-adds and
// `cols` output columns into: 1 unless OpenBLAS is held at one thread (by
// the engine) and the product is large; then one per core.
int Panels(int64_t work, int64_t cols) {
  if (work < kBlasSplitWork || openblas_get_num_threads() > 1) return 1;
  static const int cores =
      std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
  return static_cast<int>(std::min<int64_t>(cores, std::max<int64_t>(1, cols / 32)));
}

// Runs fn(p) for p in [0, panels): panels 1.. on new threads, 0 here. A
// thread that cannot be started runs its panel here instead.
template <typename Fn>
void RunPanels(int panels, const Fn& fn) {
  std::vector<std::thread> threads;
  threads.reserve(panels - 1);
  for (int p = 1; p < panels; ++p) {
    try {
      threads.emplace_back([&fn, p] { fn(p); });
    } catch (const std::system_error&) {
      fn(p);
    }
  }
  fn(0);
  for (std::thread& t : threads) t.join();
}

}  // namespace

template <typename Scalar>
void BlasGemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
              Scalar alpha, const Scalar* a, int64_t lda, const Scalar* b,
              int64_t ldb, Scalar beta, Scalar* c, int64_t ldc) {
  const int panels = Panels(m * n * k, n);
  if (panels == 1) {
    Gemm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  // Column panel [j0, j1) of C needs columns j0..j1 of op(B).
  RunPanels(panels, [&](int p) {
    const int64_t j0 = n * p / panels, j1 = n * (p + 1) / panels;
    const Scalar* bp = trans_b ? b + j0 : b + j0 * ldb;
    Gemm(trans_a, trans_b, m, j1 - j0, k, alpha, a, lda, bp, ldb, beta,
         c + j0 * ldc, ldc);
  });
}

template <typename Scalar>
void BlasGramLower(int64_t n, int64_t k, Scalar alpha, const Scalar* x,
                   int64_t ldx, Scalar* c, int64_t ldc) {
  const int panels = Panels(n * n * k / 2, n);
  if (panels == 1) {
    Syrk(n, k, alpha, x, ldx, c, ldc);
    return;
  }
  // Column block [j0, j1) of the lower triangle: its diagonal square by
  // SYRK, the rows below by GEMM. Blocks of equal trapezoid area: the area
  // of columns [0, j) is n j - j^2 / 2, so j = n (1 - sqrt(1 - f)).
  auto edge = [&](int p) {
    if (p >= panels) return n;
    const double f = static_cast<double>(p) / panels;
    return std::clamp<int64_t>(
        static_cast<int64_t>(std::llround(n * (1.0 - std::sqrt(1.0 - f)))), 0,
        n);
  };
  RunPanels(panels, [&](int p) {
    const int64_t j0 = edge(p), j1 = edge(p + 1), w = j1 - j0;
    if (w <= 0) return;
    Syrk(w, k, alpha, x + j0 * ldx, ldx, c + j0 + j0 * ldc, ldc);
    if (n - j1 > 0) {
      Gemm(true, false, n - j1, w, k, alpha, x + j1 * ldx, ldx, x + j0 * ldx,
           ldx, Scalar(0), c + j1 + j0 * ldc, ldc);
    }
  });
}

template void BlasGemm<float>(bool, bool, int64_t, int64_t, int64_t, float,
                              const float*, int64_t, const float*, int64_t,
                              float, float*, int64_t);
template void BlasGemm<double>(bool, bool, int64_t, int64_t, int64_t, double,
                               const double*, int64_t, const double*, int64_t,
                               double, double*, int64_t);
template void BlasGramLower<float>(int64_t, int64_t, float, const float*,
                                   int64_t, float*, int64_t);
template void BlasGramLower<double>(int64_t, int64_t, double, const double*,
                                    int64_t, double*, int64_t);

}  // namespace natgrad::core::kfac
