#include "server/linalg/blas.h"

#include "server/linalg/cblas_lapacke.h"

namespace natgrad::linalg::blas {
namespace {

// BLAS and LAPACK take 32-bit sizes here (LP64 OpenBLAS).
int I(int64_t v) { return static_cast<int>(v); }
CBLAS_TRANSPOSE T(bool trans) { return trans ? CblasTrans : CblasNoTrans; }
CBLAS_SIDE S(bool left) { return left ? CblasLeft : CblasRight; }

}  // namespace

void Gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha,
          const float* a, int64_t lda, const float* b, int64_t ldb, float beta,
          float* c, int64_t ldc) {
  cblas_sgemm(CblasColMajor, T(ta), T(tb), I(m), I(n), I(k), alpha, a, I(lda),
              b, I(ldb), beta, c, I(ldc));
}
void Gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, double alpha,
          const double* a, int64_t lda, const double* b, int64_t ldb,
          double beta, double* c, int64_t ldc) {
  cblas_dgemm(CblasColMajor, T(ta), T(tb), I(m), I(n), I(k), alpha, a, I(lda),
              b, I(ldb), beta, c, I(ldc));
}

void SyrkLowerTrans(int64_t n, int64_t k, float alpha, const float* x,
                    int64_t ldx, float beta, float* c, int64_t ldc) {
  cblas_ssyrk(CblasColMajor, CblasLower, CblasTrans, I(n), I(k), alpha, x,
              I(ldx), beta, c, I(ldc));
}
void SyrkLowerTrans(int64_t n, int64_t k, double alpha, const double* x,
                    int64_t ldx, double beta, double* c, int64_t ldc) {
  cblas_dsyrk(CblasColMajor, CblasLower, CblasTrans, I(n), I(k), alpha, x,
              I(ldx), beta, c, I(ldc));
}

void SyrkLower(int64_t n, int64_t k, float alpha, const float* x, int64_t ldx, float beta,
               float* c, int64_t ldc) {
  cblas_ssyrk(CblasColMajor, CblasLower, CblasNoTrans, I(n), I(k), alpha, x, I(ldx), beta, c,
              I(ldc));
}
void SyrkLower(int64_t n, int64_t k, double alpha, const double* x, int64_t ldx, double beta,
               double* c, int64_t ldc) {
  cblas_dsyrk(CblasColMajor, CblasLower, CblasNoTrans, I(n), I(k), alpha, x, I(ldx), beta, c,
              I(ldc));
}

void SymmLower(bool left, int64_t m, int64_t n, float alpha, const float* a,
               int64_t lda, const float* b, int64_t ldb, float beta, float* c,
               int64_t ldc) {
  cblas_ssymm(CblasColMajor, S(left), CblasLower, I(m), I(n), alpha, a, I(lda),
              b, I(ldb), beta, c, I(ldc));
}
void SymmLower(bool left, int64_t m, int64_t n, double alpha, const double* a,
               int64_t lda, const double* b, int64_t ldb, double beta,
               double* c, int64_t ldc) {
  cblas_dsymm(CblasColMajor, S(left), CblasLower, I(m), I(n), alpha, a, I(lda),
              b, I(ldb), beta, c, I(ldc));
}

void TrmmLower(bool left, bool trans, int64_t m, int64_t n, float alpha,
               const float* l, int64_t ldl, float* b, int64_t ldb) {
  cblas_strmm(CblasColMajor, S(left), CblasLower, T(trans), CblasNonUnit, I(m),
              I(n), alpha, l, I(ldl), b, I(ldb));
}
void TrmmLower(bool left, bool trans, int64_t m, int64_t n, double alpha,
               const double* l, int64_t ldl, double* b, int64_t ldb) {
  cblas_dtrmm(CblasColMajor, S(left), CblasLower, T(trans), CblasNonUnit, I(m),
              I(n), alpha, l, I(ldl), b, I(ldb));
}
void TrsmLower(bool left, bool trans, int64_t m, int64_t n, float alpha,
               const float* l, int64_t ldl, float* b, int64_t ldb) {
  cblas_strsm(CblasColMajor, S(left), CblasLower, T(trans), CblasNonUnit, I(m),
              I(n), alpha, l, I(ldl), b, I(ldb));
}
void TrsmLower(bool left, bool trans, int64_t m, int64_t n, double alpha,
               const double* l, int64_t ldl, double* b, int64_t ldb) {
  cblas_dtrsm(CblasColMajor, S(left), CblasLower, T(trans), CblasNonUnit, I(m),
              I(n), alpha, l, I(ldl), b, I(ldb));
}

int Potrf(char uplo, int64_t n, float* a, int64_t lda) {
  return LAPACKE_spotrf(LAPACK_COL_MAJOR, uplo, I(n), a, I(lda));
}
int Potrf(char uplo, int64_t n, double* a, int64_t lda) {
  return LAPACKE_dpotrf(LAPACK_COL_MAJOR, uplo, I(n), a, I(lda));
}
int Potri(char uplo, int64_t n, float* a, int64_t lda) {
  return LAPACKE_spotri(LAPACK_COL_MAJOR, uplo, I(n), a, I(lda));
}
int Potri(char uplo, int64_t n, double* a, int64_t lda) {
  return LAPACKE_dpotri(LAPACK_COL_MAJOR, uplo, I(n), a, I(lda));
}
int Trtri(char uplo, int64_t n, float* a, int64_t lda) {
  return LAPACKE_strtri(LAPACK_COL_MAJOR, uplo, 'N', I(n), a, I(lda));
}
int Trtri(char uplo, int64_t n, double* a, int64_t lda) {
  return LAPACKE_dtrtri(LAPACK_COL_MAJOR, uplo, 'N', I(n), a, I(lda));
}
int Lauum(char uplo, int64_t n, float* a, int64_t lda) {
  return LAPACKE_slauum(LAPACK_COL_MAJOR, uplo, I(n), a, I(lda));
}
int Lauum(char uplo, int64_t n, double* a, int64_t lda) {
  return LAPACKE_dlauum(LAPACK_COL_MAJOR, uplo, I(n), a, I(lda));
}

}  // namespace natgrad::linalg::blas
