// The natural-gradient direction in the client's parametrisation ξ, in closed
// form: the forward-mode product (∂ξ/∂θ) v with v = ∂L/∂η (Salimbeni et al.
// 2018, eq. 7), i.e. F_ξ⁻¹ ∂L/∂ξ. It is the derivative of ξ along θ + t v, so
// the step θ − γv moves ξ by −γ·direction to first order.
//
// With v = (v1, V2), V2 symmetric, along θ + t v (P = −2θ2, S = P⁻¹, m = Sθ1):
//   natural      (v1, V2)
//   mean+cov     ṁ = S(v1 + 2 V2 m),  Ṡ = 2 S V2 S
//   expectation  (ṁ, Ṡ + ṁmᵀ + mṁᵀ)
//   mean+chol    (ṁ, L Φ(2 Lᵀ V2 L)),  Φ = lower triangle, diagonal halved
// With v from a (m, S) gradient (v1 = ∂L/∂m − 2Gm, V2 = G) these are the
// closed forms of docs/math.md: ṁ = S ∂L/∂m, Ṡ = 2SGS, L̇ = L Φ(2LᵀGL).
#ifndef NATGRAD_SERVER_BLOCKS_GAUSSIAN_MATH_NATURAL_GRADIENT_DIRECTION_H_
#define NATGRAD_SERVER_BLOCKS_GAUSSIAN_MATH_NATURAL_GRADIENT_DIRECTION_H_

#include "server/blocks/gaussian/math/gaussian_gradient.h"
#include "server/blocks/gaussian/math/gaussian_parametrization.h"

namespace natgrad::core {

template <typename T>
GaussianParams<T> NaturalGradientDirection(GaussianParametrization p,
                                           const GaussianForms<T>& q,
                                           const ExpectationGradient<T>& v);

}  // namespace natgrad::core

#endif  // NATGRAD_SERVER_BLOCKS_GAUSSIAN_MATH_NATURAL_GRADIENT_DIRECTION_H_
