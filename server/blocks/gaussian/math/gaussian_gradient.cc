#include "server/blocks/gaussian/math/gaussian_gradient.h"

#include "server/blocks/gaussian/math/gaussian_linalg.h"

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
      GMatrix<T> x = g2;
      gaussian_linalg::LowerTriangularMultiply<T>(q.chol, /*left=*/true,
                                                  /*trans=*/true, &x);  // Lᵀ g2
      x = LowerHalfDiagonal<T>(x);
      gaussian_linalg::LowerTriangularSolve<T>(q.chol, true, true, &x);  // L⁻ᵀ X
      gaussian_linalg::LowerTriangularSolve<T>(q.chol, false, false,
                                               &x);  // L⁻ᵀ X L⁻¹
      // Only its symmetric part is used; sym(Y) = sym(Yᵀ).
      const GMatrix<T>& xt = x;
      return ExpectationGradientFromMeanCovariance<T>(q, g1, xt);
    }
    case GaussianParametrization::kNatural: {
      const GVector<T> pa = q.precision * g1;
      const GMatrix<T> pb =
          gaussian_linalg::SymmetricTimes<T>(q.precision, Symmetrize(g2));
      GMatrix<T> ds = gaussian_linalg::TimesSymmetric<T>(pb, q.precision);
      ds *= T(0.5);
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
