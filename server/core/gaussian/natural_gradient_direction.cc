#include "server/core/gaussian/natural_gradient_direction.h"

namespace natgrad::core {

template <typename T>
GaussianParams<T> NaturalGradientDirection(GaussianParametrization p,
                                           const GaussianForms<T>& q,
                                           const ExpectationGradient<T>& v) {
  if (p == GaussianParametrization::kNatural) return {v.g1, v.g2};
  const GVector<T> dm = q.cov * (v.g1 + T(2) * (v.g2 * q.mean));
  if (p == GaussianParametrization::kMeanCholesky) {
    const GMatrix<T> vl = v.g2 * q.chol;
    GMatrix<T> inner = T(2) * (q.chol.transpose() * vl);
    return {dm, q.chol * LowerHalfDiagonal<T>(inner)};
  }
  GMatrix<T> ds = T(2) * (q.cov * v.g2 * q.cov);
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
