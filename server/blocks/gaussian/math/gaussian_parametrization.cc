#include "server/blocks/gaussian/math/gaussian_parametrization.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "server/blocks/gaussian/math/gaussian_linalg.h"

namespace natgrad::core {
namespace {

using gaussian_linalg::InverseFromCholesky;
using gaussian_linalg::LowerCholesky;
using gaussian_linalg::OuterFromCholesky;

absl::Status NotPd(absl::string_view field, absl::string_view what) {
  return absl::InvalidArgumentError(
      absl::StrCat(field, " is not positive definite", what));
}

// Fills every form from a validated symmetric covariance.
template <typename T>
absl::StatusOr<GaussianForms<T>> FromMeanAndCovariance(
    GVector<T> mean, GMatrix<T> cov, absl::string_view field,
    absl::string_view what) {
  GaussianForms<T> q;
  if (!LowerCholesky(cov, &q.chol)) return NotPd(field, what);
  q.precision = InverseFromCholesky(q.chol);
  q.theta1 = q.precision * mean;
  if (!q.precision.allFinite() || !q.theta1.allFinite()) {
    return NotPd(field, absl::StrCat(what, " (too ill-conditioned to invert)"));
  }
  q.mean = std::move(mean);
  q.cov = std::move(cov);
  return q;
}

}  // namespace

absl::string_view GaussianParametrizationName(GaussianParametrization p) {
  switch (p) {
    case GaussianParametrization::kNatural:
      return "natural";
    case GaussianParametrization::kExpectation:
      return "expectation";
    case GaussianParametrization::kMeanCovariance:
      return "mean_covariance";
    case GaussianParametrization::kMeanCholesky:
      return "mean_cholesky";
  }
  return "unknown";
}

template <typename T>
bool IsNearlySymmetric(const GMatrix<T>& x) {
  if (x.size() == 0) return true;
  const T scale = x.cwiseAbs().maxCoeff();
  // max |X − Xᵀ| over the strict upper triangle, tile by tile (X(j, i) read
  // from a cache-resident tile rather than a stride-n walk).
  T asym = T(0);
  bool nan = false;
  gaussian_linalg::ForUpperTiles(x.rows(), [&](Eigen::Index i, Eigen::Index j) {
    const T d = std::abs(x(i, j) - x(j, i));
    nan |= std::isnan(d);
    asym = std::max(asym, d);
  });
  return !nan && asym <= static_cast<T>(kSymmetryRelTolerance) * scale;
}

template <typename T>
GMatrix<T> Symmetrize(const GMatrix<T>& x) {
  // (X + Xᵀ)/2 entry by entry (the same rounding as the expression), tiled.
  const Eigen::Index n = x.rows();
  GMatrix<T> out(n, n);
  for (Eigen::Index k = 0; k < n; ++k) out(k, k) = (x(k, k) + x(k, k)) * T(0.5);
  gaussian_linalg::ForUpperTiles(n, [&](Eigen::Index i, Eigen::Index j) {
    out(i, j) = (x(i, j) + x(j, i)) * T(0.5);
    out(j, i) = (x(j, i) + x(i, j)) * T(0.5);
  });
  return out;
}

template <typename T>
GMatrix<T> LowerHalfDiagonal(const GMatrix<T>& x) {
  GMatrix<T> out = x.template triangularView<Eigen::Lower>();
  out.diagonal() *= T(0.5);
  return out;
}

template <typename T>
absl::StatusOr<GaussianForms<T>> GaussianFromNatural(const GVector<T>& theta1,
                                                     const GMatrix<T>& theta2,
                                                     absl::string_view field2) {
  if (!IsNearlySymmetric(theta2)) {
    return absl::InvalidArgumentError(absl::StrCat(field2, " is not symmetric"));
  }
  GaussianForms<T> q;
  q.precision = Symmetrize(theta2) * T(-2);
  const gaussian_linalg::InverseStatus status =
      gaussian_linalg::InverseAndItsCholesky(q.precision, &q.cov, &q.chol);
  if (status == gaussian_linalg::InverseStatus::kNotPd) {
    return absl::InvalidArgumentError(absl::StrCat(
        field2, " is not a natural parameter: -2 theta2 is not positive "
                "definite"));
  }
  if (status == gaussian_linalg::InverseStatus::kOk) q.mean = q.cov * theta1;
  if (status != gaussian_linalg::InverseStatus::kOk || !q.mean.allFinite()) {
    return absl::InvalidArgumentError(absl::StrCat(
        field2, " is not a natural parameter: -2 theta2 is not positive "
                "definite (too ill-conditioned to invert)"));
  }
  q.theta1 = theta1;
  return q;
}

template <typename T>
absl::StatusOr<GaussianForms<T>> GaussianFromParams(GaussianParametrization p,
                                                    const GVector<T>& p1,
                                                    const GMatrix<T>& p2,
                                                    absl::string_view field2) {
  switch (p) {
    case GaussianParametrization::kNatural:
      return GaussianFromNatural<T>(p1, p2, field2);
    case GaussianParametrization::kMeanCovariance:
      if (!IsNearlySymmetric(p2)) {
        return absl::InvalidArgumentError(
            absl::StrCat(field2, " is not symmetric"));
      }
      return FromMeanAndCovariance<T>(p1, Symmetrize(p2), field2, "");
    case GaussianParametrization::kExpectation: {
      if (!IsNearlySymmetric(p2)) {
        return absl::InvalidArgumentError(
            absl::StrCat(field2, " is not symmetric"));
      }
      GMatrix<T> cov = Symmetrize(p2);
      cov.noalias() -= p1 * p1.transpose();
      return FromMeanAndCovariance<T>(p1, std::move(cov), field2,
                                      " after subtracting m m^T");
    }
    case GaussianParametrization::kMeanCholesky: {
      const Eigen::Index n = p2.rows();
      for (Eigen::Index j = 1; j < n; ++j) {
        for (Eigen::Index i = 0; i < j; ++i) {
          if (p2(i, j) != T(0)) {
            return absl::InvalidArgumentError(absl::StrCat(
                field2, " has nonzero entries above the diagonal (entry [", i,
                ", ", j, "]); a Cholesky factor is lower triangular"));
          }
        }
      }
      for (Eigen::Index k = 0; k < n; ++k) {
        // A negative diagonal still gives a PD LLᵀ, but not the unique factor
        // we return, so deltas would jump; require the canonical form.
        if (!(p2(k, k) > T(0))) {
          return NotPd(field2, absl::StrCat(": Cholesky diagonal entry ", k,
                                            " is not positive"));
        }
      }
      GaussianForms<T> q;
      q.chol = p2;
      q.cov = OuterFromCholesky(q.chol);
      q.precision = InverseFromCholesky(q.chol);
      q.theta1 = q.precision * p1;
      if (!q.precision.allFinite() || !q.theta1.allFinite()) {
        return NotPd(field2, " (too ill-conditioned to invert)");
      }
      q.mean = p1;
      return q;
    }
  }
  return absl::InvalidArgumentError("unknown Gaussian parametrization");
}

template <typename T>
GaussianParams<T> GaussianToParams(const GaussianForms<T>& q,
                                   GaussianParametrization p) {
  switch (p) {
    case GaussianParametrization::kNatural:
      return {q.theta1, q.precision * T(-0.5)};
    case GaussianParametrization::kExpectation:
      return {q.mean, q.cov + q.mean * q.mean.transpose()};
    case GaussianParametrization::kMeanCovariance:
      return {q.mean, q.cov};
    case GaussianParametrization::kMeanCholesky:
      return {q.mean, q.chol};
  }
  return {};
}

#define NATGRAD_INSTANTIATE(T)                                               \
  template bool IsNearlySymmetric<T>(const GMatrix<T>&);                     \
  template GMatrix<T> Symmetrize<T>(const GMatrix<T>&);                      \
  template GMatrix<T> LowerHalfDiagonal<T>(const GMatrix<T>&);               \
  template absl::StatusOr<GaussianForms<T>> GaussianFromNatural<T>(          \
      const GVector<T>&, const GMatrix<T>&, absl::string_view);              \
  template absl::StatusOr<GaussianForms<T>> GaussianFromParams<T>(           \
      GaussianParametrization, const GVector<T>&, const GMatrix<T>&,         \
      absl::string_view);                                                    \
  template GaussianParams<T> GaussianToParams<T>(const GaussianForms<T>&,    \
                                                 GaussianParametrization);
NATGRAD_INSTANTIATE(float)
NATGRAD_INSTANTIATE(double)
#undef NATGRAD_INSTANTIATE

}  // namespace natgrad::core
