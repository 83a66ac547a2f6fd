#include "server/core/gaussian/gaussian_gradient.h"

namespace natgrad::core {

template <typename T>
ExpectationGradient<T> ExpectationGradientFromMeanCovariance(
    const GaussianForms<T>& q, const GVector<T>& dm, const GMatrix<T>& ds) {
  ExpectationGradient<T> out;
  out.g2 = Symmetrize(ds);
  out.g1 = dm - T(2) * (out.g2 * q.mean);
  return out;
}

template <typename T>
ExpectationGradient<T> ExpectationGradientFrom(GaussianParametrization p,
                                               const GaussianForms<T>& q,
                                               const GVector<T>& g1,
                                               const GMatrix<T>& g2) {
  switch (p) {
    case GaussianParametrization::kExpectation:
      return {g1, Symmetrize(g2)};
    case GaussianParametrization::kMeanCovariance:
      return ExpectationGradientFromMeanCovariance(q, g1, g2);
    case GaussianParametrization::kMeanCholesky: {
      // Reverse mode of L = chol(S): dS-gradient L⁻ᵀ Φ(Lᵀ ∂L/∂L) L⁻¹.
      const auto lower = q.chol.template triangularView<Eigen::Lower>();
      GMatrix<T> x = LowerHalfDiagonal<T>(q.chol.transpose() * g2);
      lower.transpose().solveInPlace(x);       // L⁻ᵀ X
      GMatrix<T> xt = x.transpose();
      lower.transpose().solveInPlace(xt);      // (L⁻ᵀ X L⁻¹)ᵀ
      return ExpectationGradientFromMeanCovariance<T>(q, g1, xt);
    }
    case GaussianParametrization::kNatural: {
      const GVector<T> pa = q.precision * g1;
      const GMatrix<T> pb = q.precision * Symmetrize(g2);
      GMatrix<T> ds = T(0.5) * (pb * q.precision);
      ds.noalias() -= pa * q.theta1.transpose();  // symmetrised below
      return ExpectationGradientFromMeanCovariance<T>(q, pa, ds);
    }
  }
  return {};
}

#define NATGRAD_INSTANTIATE(T)                                                \
  template ExpectationGradient<T> ExpectationGradientFromMeanCovariance<T>(   \
      const GaussianForms<T>&, const GVector<T>&, const GMatrix<T>&);         \
  template ExpectationGradient<T> ExpectationGradientFrom<T>(                 \
      GaussianParametrization, const GaussianForms<T>&, const GVector<T>&,    \
      const GMatrix<T>&);
NATGRAD_INSTANTIATE(float)
NATGRAD_INSTANTIATE(double)
#undef NATGRAD_INSTANTIATE

}  // namespace natgrad::core
