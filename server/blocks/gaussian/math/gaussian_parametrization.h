// The four ways a client may hold a Gaussian q = N(m, S) (docs/math.md) and
// the conversions between them. Everything goes through GaussianForms, which
// holds one validated Gaussian in every form a natural-gradient step needs, so
// each conversion factorises at most twice.
//
//   natural      (θ1, θ2) = (S⁻¹m, −½S⁻¹)
//   expectation  (η1, η2) = (m, S + mmᵀ)
//   mean+cov     (m, S)
//   mean+chol    (m, L), L lower triangular with positive diagonal, S = LLᵀ
//
// Templated on the scalar (float, double), explicitly instantiated in the .cc.
#ifndef NATGRAD_SERVER_BLOCKS_GAUSSIAN_MATH_GAUSSIAN_PARAMETRIZATION_H_
#define NATGRAD_SERVER_BLOCKS_GAUSSIAN_MATH_GAUSSIAN_PARAMETRIZATION_H_

#include "Eigen/Core"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace natgrad::core {

// Mirrors natgrad.v1.GaussianParametrization (UNSPECIFIED = MEAN_COVARIANCE).
enum class GaussianParametrization {
  kNatural,
  kExpectation,
  kMeanCovariance,
  kMeanCholesky,
};

absl::string_view GaussianParametrizationName(GaussianParametrization p);

template <typename T>
using GVector = Eigen::Matrix<T, Eigen::Dynamic, 1>;
template <typename T>
using GMatrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;

// One Gaussian in all forms at once; every field is always filled.
template <typename T>
struct GaussianForms {
  GVector<T> mean;       // m = η1
  GMatrix<T> cov;        // S (exactly symmetric)
  GMatrix<T> chol;       // L: lower Cholesky factor of S
  GMatrix<T> precision;  // P = S⁻¹ = −2θ2 (exactly symmetric)
  GVector<T> theta1;     // θ1 = P m
};

// A pair in some parametrisation: first part [dim], second part [dim x dim].
template <typename T>
struct GaussianParams {
  GVector<T> first;
  GMatrix<T> second;
};

// Largest |X − Xᵀ| accepted for a matrix that must be symmetric, relative to
// max|X|: loose enough for a float32 client's matmul rounding, tight enough to
// catch a transposed or garbage matrix. The matrix is symmetrised afterwards.
inline constexpr double kSymmetryRelTolerance = 1e-5;

// Validates (p1, p2) as parameters in `p` and computes every form.
// Preconditions (the block checks them first): p1 has n entries, p2 is n x n,
// all finite. Checks: symmetry of S, θ2, η2 (then symmetrises); exact zeros
// above L's diagonal and a positive diagonal; positive definiteness of S,
// −2θ2, η2 − mmᵀ. INVALID_ARGUMENT whose message starts with `field2` (the
// caller's name for p2, e.g. "gaussian.param2[1] is not positive definite").
template <typename T>
absl::StatusOr<GaussianForms<T>> GaussianFromParams(
    GaussianParametrization p, const GVector<T>& p1, const GMatrix<T>& p2,
    absl::string_view field2 = "param2");

// From natural parameters; fails (INVALID_ARGUMENT) when −2θ2 is not
// positive definite or S = (−2θ2)⁻¹ cannot be factorised. θ2 is symmetrised.
template <typename T>
absl::StatusOr<GaussianForms<T>> GaussianFromNatural(
    const GVector<T>& theta1, const GMatrix<T>& theta2,
    absl::string_view field2 = "theta2");

// The Gaussian in parametrisation `p`. Cannot fail: forms are validated.
template <typename T>
GaussianParams<T> GaussianToParams(const GaussianForms<T>& q,
                                   GaussianParametrization p);

// Whether max|X − Xᵀ| <= kSymmetryRelTolerance * max|X|.
template <typename T>
bool IsNearlySymmetric(const GMatrix<T>& x);

// Symmetric part (X + Xᵀ)/2.
template <typename T>
GMatrix<T> Symmetrize(const GMatrix<T>& x);

// Φ(X): the lower triangle of X with the diagonal halved (the adjoint of the
// Cholesky factor's differential, Murray 2016).
template <typename T>
GMatrix<T> LowerHalfDiagonal(const GMatrix<T>& x);

}  // namespace natgrad::core

#endif  // NATGRAD_SERVER_BLOCKS_GAUSSIAN_MATH_GAUSSIAN_PARAMETRIZATION_H_
