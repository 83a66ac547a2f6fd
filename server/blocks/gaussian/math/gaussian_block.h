// Gaussian natural-gradient block (docs/math.md; Salimbeni, Eleftheriadis &
// Hensman 2018, as GPflow's NaturalGradient and GPyTorch's NGD).
//
// The client owns q = N(m, S) (L independent copies of dimension M) and sends
// its current parameters with the gradient of the loss, either ∂L/∂η or
// ∂L/∂ξ in its own parametrisation ξ. The step is θ' = θ − γ ∂L/∂η, returned
// in ξ (new parameters, delta = new − old, optionally the direction
// (∂ξ/∂θ) ∂L/∂η). One γ is used for all copies.
//
// Safeguard: when −2θ2' is not positive definite for some copy (Cholesky
// fails, or the new point cannot be mapped back to ξ), γ is halved and the
// step retried, at most max_halvings times. If every try fails Propose
// returns INVALID_ARGUMENT (the rejection depends only on the request and the
// configured γ, not on server state; retrying it unchanged fails again) and
// the block is unchanged.
//
// Bad input (missing Gaussian input, wrong copies or shapes, non-finite
// values, a non-symmetric S/θ2/η2, a non-PD S/−2θ2/η2 − mmᵀ, a Cholesky factor
// with entries above the diagonal or a non-positive diagonal) is
// INVALID_ARGUMENT naming the block and field, e.g.
//   block "q_u": gaussian.param2[1] is not positive definite
//
// Decompositions are O(M³) Cholesky factorisations done inline (Eigen), not
// through the inversion engine: they are small, and the step needs them
// synchronously to run the safeguard.
//
// Compositional steps (GaussianStepInput::compositional; docs/math.md): the
// likelihood part of the gradient comes as samples ε_s (z_s = m + Lε_s with
// L = chol(S) whatever the parametrisation), ∇_z ℓ(z_s) and the likelihood
// Fisher F_s (full, diagonal or shared). The block forms
// u_s = (F_s + λ_z I)⁻¹ ∇_z ℓ(z_s), the (m, L)-gradient
// (mean_s u_s, tril(mean_s u_s ε_sᵀ)), converts it to ∂L/∂η as a mean+chol
// gradient at the current q, adds grad1/grad2 (the rest of the objective, in
// gradient_space) and steps as usual. F_s must be symmetric to
// kSymmetryRelTolerance (relative to max|F_s|; then symmetrised) and
// F_s + λ_z I positive definite (its Cholesky must succeed); otherwise
// INVALID_ARGUMENT naming the field, e.g.
//   block "q_u": gaussian.compositional.likelihood_fisher[0][3] + 0 I is not
//   positive definite
//
// State is only a step counter and the last γ used / halvings (the client
// owns the parameters): scalars "steps", "gamma_used", "halvings".
#ifndef NATGRAD_SERVER_BLOCKS_GAUSSIAN_MATH_GAUSSIAN_BLOCK_H_
#define NATGRAD_SERVER_BLOCKS_GAUSSIAN_MATH_GAUSSIAN_BLOCK_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "server/core/block.h"
#include "server/blocks/gaussian/math/gaussian_parametrization.h"
#include "server/core/schedule.h"

namespace natgrad::core {

inline constexpr absl::string_view kGaussianBlockKind = "gaussian";
inline constexpr int kDefaultMaxHalvings = 8;
inline constexpr int kMaxMaxHalvings = 64;

// Where the step is taken (docs/math.md). kTheta: θ' = θ − γ ∂L/∂η, mapped
// to the client's ξ (exact). kXi: ξ' = ξ − γ·(natural-gradient direction in
// ξ), GPflow's NaturalGradient with a non-natural xi_transform; identical to
// kTheta for natural parameters. Both keep the γ-halving safeguard.
enum class GaussianStepSpace { kTheta, kXi };

struct GaussianOptions {
  int64_t dim = 0;     // M, required (>= 1)
  int64_t copies = 1;  // L; 0 is read as 1 (the proto's convention)
  GaussianParametrization parametrization =
      GaussianParametrization::kMeanCovariance;
  // Step size γ(t), evaluated at StepContext::step. Null: constant 1, which
  // is GPflow's usual choice and lands on the optimum for conjugate models.
  SchedulePtr gamma;
  // -1 means the default (8); 0 disables the retries; at most 64.
  int max_halvings = kDefaultMaxHalvings;
  bool return_direction = false;
  GaussianStepSpace step_space = GaussianStepSpace::kTheta;
  // λ_z(t) >= 0 for compositional steps, u = (F + λ_z I)⁻¹ ∇_z ℓ. Null: 0.
  SchedulePtr likelihood_damping;
};

// Float64 by default; kFloat32 computes in float (inputs and outputs stay
// double in the interface structs).
absl::StatusOr<std::unique_ptr<ParameterBlock>> NewGaussianBlock(
    std::string name, const GaussianOptions& options,
    Precision precision = Precision::kFloat64);

}  // namespace natgrad::core

#endif  // NATGRAD_SERVER_BLOCKS_GAUSSIAN_MATH_GAUSSIAN_BLOCK_H_
