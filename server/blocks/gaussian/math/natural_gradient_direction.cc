#include "server/blocks/gaussian/math/natural_gradient_direction.h"

#include "server/blocks/gaussian/math/gaussian_linalg.h"

namespace natgrad::core {

template <typename T>
GaussianParams<T> NaturalGradientDirection(GaussianParametrization p,
                                           const GaussianForms<T>& q,
                                           const ExpectationGradient<T>& v) {
  if (p == GaussianParametrization::kNatural) return {v.g1, v.g2};
  const GVector<T> dm = q.cov * (v.g1 + T(2) * (v.g2 * q.mean));
  if (p == GaussianParametrization::kMeanCholesky) {
    GMatrix<T> inner = v.g2;
    gaussian_linalg::LowerTriangularMultiply<T>(q.chol, /*left=*/false,
                                                /*trans=*/false, &inner);  // V L
    gaussian_linalg::LowerTriangularMultiply<T>(q.chol, true, true,
                                                &inner);  // Lᵀ V L
    GMatrix<T> out = LowerHalfDiagonal<T>(T(2) * inner);
    gaussian_linalg::LowerTriangularMultiply<T>(q.chol, true, false, &out);
    return {dm, std::move(out)};
  }
  GMatrix<T> ds = gaussian_linalg::SymmetricTimes<T>(
      q.cov, gaussian_linalg::TimesSymmetric<T>(v.g2, q.cov));
  ds *= T(2);
  ds = Symmetrize<T>(ds);  // rounding only
  if (p == GaussianParametrization::kExpectation) {
    ds.noalias() += dm * q.mean.transpose();
    ds.noalias() += q.mean * dm.transpose();
  }
  return {dm, std::move(ds)};
}

template GaussianParams<float> NaturalGradientDirection<float>(
    GaussianParametrization, const GaussianForms<float>&,
    const ExpectationGradient<float>&);
template GaussianParams<double> NaturalGradientDirection<double>(
    GaussianParametrization, const GaussianForms<double>&,
    const ExpectationGradient<double>&);

}  // namespace natgrad::core
