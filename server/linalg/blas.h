// Typed float / double wrappers over the BLAS and LAPACKE routines the blocks
// call, column-major, one call each (no splitting, no size policy: see
// products.h for that). The system headers stay in blas.cc
// (cblas_lapacke.h), so including this brings no C macros along.
//
// LAPACK wrappers return LAPACK's info: 0 success, < 0 a bad argument,
// > 0 a numerical failure (e.g. not positive definite).
#ifndef NATGRAD_SERVER_LINALG_BLAS_H_
#define NATGRAD_SERVER_LINALG_BLAS_H_

#include <cstdint>

namespace natgrad::linalg::blas {

// C = alpha op(A) op(B) + beta C; op(A) m x k, op(B) k x n.
void Gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
          float alpha, const float* a, int64_t lda, const float* b,
          int64_t ldb, float beta, float* c, int64_t ldc);
void Gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
          double alpha, const double* a, int64_t lda, const double* b,
          int64_t ldb, double beta, double* c, int64_t ldc);

// Lower triangle of the n x n C = alpha X^T X + beta C, X k x n (?syrk,
// uplo L, trans T).
void SyrkLowerTrans(int64_t n, int64_t k, float alpha, const float* x,
                    int64_t ldx, float beta, float* c, int64_t ldc);
void SyrkLowerTrans(int64_t n, int64_t k, double alpha, const double* x,
                    int64_t ldx, double beta, double* c, int64_t ldc);
// The same for C = alpha X X^T + beta C, X n x k.
void SyrkLower(int64_t n, int64_t k, float alpha, const float* x, int64_t ldx, float beta,
               float* c, int64_t ldc);
void SyrkLower(int64_t n, int64_t k, double alpha, const double* x, int64_t ldx, double beta,
               double* c, int64_t ldc);

// C = alpha A B + beta C (left) or alpha B A + beta C (right), A symmetric
// with its lower triangle read; B and C m x n.
void SymmLower(bool left, int64_t m, int64_t n, float alpha, const float* a,
               int64_t lda, const float* b, int64_t ldb, float beta, float* c,
               int64_t ldc);
void SymmLower(bool left, int64_t m, int64_t n, double alpha, const double* a,
               int64_t lda, const double* b, int64_t ldb, double beta,
               double* c, int64_t ldc);

// In place, B m x n: B <- alpha op(L) B (left) or alpha B op(L) (right), L
// lower triangular, non-unit diagonal, op = transpose when `trans`.
void TrmmLower(bool left, bool trans, int64_t m, int64_t n, float alpha,
               const float* l, int64_t ldl, float* b, int64_t ldb);
void TrmmLower(bool left, bool trans, int64_t m, int64_t n, double alpha,
               const double* l, int64_t ldl, double* b, int64_t ldb);
// In place: B <- alpha op(L)^-1 B (left) or alpha B op(L)^-1 (right).
void TrsmLower(bool left, bool trans, int64_t m, int64_t n, float alpha,
               const float* l, int64_t ldl, float* b, int64_t ldb);
void TrsmLower(bool left, bool trans, int64_t m, int64_t n, double alpha,
               const double* l, int64_t ldl, double* b, int64_t ldb);

// LAPACKE ?potrf / ?potri / ?trtri (non-unit) / ?lauum, n x n, `uplo` 'L' or
// 'U'.
int Potrf(char uplo, int64_t n, float* a, int64_t lda);
int Potrf(char uplo, int64_t n, double* a, int64_t lda);
int Potri(char uplo, int64_t n, float* a, int64_t lda);
int Potri(char uplo, int64_t n, double* a, int64_t lda);
int Trtri(char uplo, int64_t n, float* a, int64_t lda);
int Trtri(char uplo, int64_t n, double* a, int64_t lda);
int Lauum(char uplo, int64_t n, float* a, int64_t lda);
int Lauum(char uplo, int64_t n, double* a, int64_t lda);

}  // namespace natgrad::linalg::blas

#endif  // NATGRAD_SERVER_LINALG_BLAS_H_
