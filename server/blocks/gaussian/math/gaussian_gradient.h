// The client's gradient of the loss, in its parametrisation, turned into
// ∂L/∂η (docs/math.md). ∂L/∂η is the natural gradient with respect to θ,
// so the step is θ' = θ − γ ∂L/∂η.
//
// Matrix gradients follow the autodiff convention: ∂L/∂X treats all n² entries
// as free. For the symmetric S, θ2, η2 only the symmetric part counts and it
// is taken here; skipping that is a silent factor-of-two error on the
// off-diagonals. For L only the lower triangle counts (Φ drops the rest).
#ifndef NATGRAD_SERVER_BLOCKS_GAUSSIAN_MATH_GAUSSIAN_GRADIENT_H_
#define NATGRAD_SERVER_BLOCKS_GAUSSIAN_MATH_GAUSSIAN_GRADIENT_H_

#include "server/blocks/gaussian/math/gaussian_parametrization.h"

namespace natgrad::core {

// (∂L/∂η1, ∂L/∂η2), the second part exactly symmetric.
template <typename T>
struct ExpectationGradient {
  GVector<T> g1;
  GMatrix<T> g2;
};

// From (∂L/∂m, ∂L/∂S): ∂L/∂η1 = ∂L/∂m − 2Gm, ∂L/∂η2 = G, G = sym(∂L/∂S).
template <typename T>
ExpectationGradient<T> ExpectationGradientFromMeanCovariance(
    const GaussianForms<T>& q, const GVector<T>& dm, const GMatrix<T>& ds);

// From (g1, g2) = ∂L/∂ξ in parametrisation `p` at q:
//   expectation  (g1, sym g2)
//   mean+cov     as above
//   mean+chol    G = sym(L⁻ᵀ Φ(Lᵀ g2) L⁻¹), then as mean+cov
//   natural      ∂L/∂m = P g1, G = ½ P B P − sym(P g1 θ1ᵀ), B = sym g2, then
//                as mean+cov (chain rule through m = Sθ1, S = −½θ2⁻¹)
template <typename T>
ExpectationGradient<T> ExpectationGradientFrom(GaussianParametrization p,
                                               const GaussianForms<T>& q,
                                               const GVector<T>& g1,
                                               const GMatrix<T>& g2);

}  // namespace natgrad::core

#endif  // NATGRAD_SERVER_BLOCKS_GAUSSIAN_MATH_GAUSSIAN_GRADIENT_H_
