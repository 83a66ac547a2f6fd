// Dense kernels for the Gaussian block, through OpenBLAS / LAPACKE
// (server/linalg/blas.h; internal). Matrices are Eigen column-major with
// leading dimension rows(). Each is one call on the caller's thread, with
// whatever OpenBLAS thread count the engine last set (nothing here reads or
// changes it; see server/linalg/thread_policy.h).
#ifndef NATGRAD_SERVER_BLOCKS_GAUSSIAN_MATH_GAUSSIAN_LINALG_H_
#define NATGRAD_SERVER_BLOCKS_GAUSSIAN_MATH_GAUSSIAN_LINALG_H_

#include <algorithm>

#include "server/blocks/gaussian/math/gaussian_parametrization.h"

namespace natgrad::core::gaussian_linalg {

// Lower Cholesky factor of the symmetric `a` (lower triangle read) into
// *chol, entries above the diagonal zero. False when not (numerically)
// positive definite, or the factor is not finite with a positive diagonal.
template <typename T>
bool LowerCholesky(const GMatrix<T>& a, GMatrix<T>* chol);

// (LLᵀ)⁻¹ from the lower factor L, exactly symmetric (?potri).
template <typename T>
GMatrix<T> InverseFromCholesky(const GMatrix<T>& chol);

// LLᵀ from the lower factor L, exactly symmetric (?lauum on the reversed
// factor: n³/3 multiply-adds instead of a full product).
template <typename T>
GMatrix<T> OuterFromCholesky(const GMatrix<T>& chol);

// From a symmetric positive-definite P: the lower Cholesky factor of S = P⁻¹
// and S itself, with one factorisation of P (P reversed, JPJ = L'L'ᵀ, gives
// S = (J L'⁻ᵀ J)(J L'⁻ᵀ J)ᵀ with J L'⁻ᵀ J lower triangular). False when P is
// not positive definite (kNotPd) or S is not finite (kIllConditioned).
enum class InverseStatus { kOk, kNotPd, kIllConditioned };
template <typename T>
InverseStatus InverseAndItsCholesky(const GMatrix<T>& p, GMatrix<T>* cov,
                           GMatrix<T>* cov_chol);

// C = A B for symmetric A (lower triangle read).
template <typename T>
GMatrix<T> SymmetricTimes(const GMatrix<T>& a, const GMatrix<T>& b);
// C = B A for symmetric A (lower triangle read).
template <typename T>
GMatrix<T> TimesSymmetric(const GMatrix<T>& b, const GMatrix<T>& a);

// In place: B ← op(L) B (left) or B ← B op(L) (right), L lower triangular,
// op = transpose when `trans`.
template <typename T>
void LowerTriangularMultiply(const GMatrix<T>& l, bool left, bool trans,
                             GMatrix<T>* b);
// In place: B ← op(L)⁻¹ B (left) or B ← B op(L)⁻¹ (right).
template <typename T>
void LowerTriangularSolve(const GMatrix<T>& l, bool left, bool trans,
                          GMatrix<T>* b);

// Calls f(i, j) for every i < j < n, in 32 x 32 tiles (so that a loop body
// touching both (i, j) and (j, i) stays in cache).
template <typename F>
void ForUpperTiles(Eigen::Index n, const F& f) {
  constexpr Eigen::Index kTile = 32;
  for (Eigen::Index jb = 0; jb < n; jb += kTile) {
    const Eigen::Index je = std::min(n, jb + kTile);
    for (Eigen::Index ib = 0; ib <= jb; ib += kTile) {
      for (Eigen::Index j = jb; j < je; ++j) {
        const Eigen::Index ie = std::min(j, ib + kTile);
        for (Eigen::Index i = ib; i < ie; ++i) f(i, j);
      }
    }
  }
}

}  // namespace natgrad::core::gaussian_linalg

#endif  // NATGRAD_SERVER_BLOCKS_GAUSSIAN_MATH_GAUSSIAN_LINALG_H_
