// Diagonal (mean-field) Gaussian natural-gradient blocks: q = N(m, diag(s)),
// `copies` independent copies of dimension `dim`, every element on its own,
// so a block can hold a whole weight tensor of a network (millions of
// elements) at memory bandwidth: elementwise passes, no dim x dim anywhere.
//
// Parametrisations (per element; the client holds [copies, dim] tensors):
//   natural      θ1 = m / s, θ2 = −1 / (2s)
//   expectation  η1 = m,     η2 = s + m²
//   mean+var     (m, s)
//   mean+logstd  (m, ρ), s = exp(2ρ)
// Step: θ' = θ − γ ∂L/∂η (∂L/∂η is the natural gradient in θ), mapped back.
// Gradients in the client's parametrisation are converted per element:
//   mean+var     ∂L/∂η1 = ∂L/∂m − 2m ∂L/∂s,  ∂L/∂η2 = ∂L/∂s
//   mean+logstd  as mean+var with ∂L/∂s = ∂L/∂ρ / (2s)
//   natural      ∂L/∂m = g1 / s, ∂L/∂s = g2 / (2s²) − m g1 / s², then as mean+var
// The natural-gradient direction in the client's parametrisation (on
// request) is ξ̇ = (∂ξ/∂θ) ∂L/∂η: ṁ = s v1 + 2ms v2, ṡ = 2s² v2 (mean+var),
// ρ̇ = ṡ / (2s), (ṁ, ṡ + 2mṁ) (expectation), v itself (natural).
// step_space kXi instead steps the client's parametrisation along that
// direction, ξ' = ξ − γ ξ̇ (GPflow's NaturalGradient with a non-natural
// xi_transform; the same as kTheta for natural parameters).
// Safeguard: when some element's θ2' is not negative (s' not positive), γ is
// halved, at most max_halvings times; if every try fails the step is refused.
//
// These are the full-covariance block's formulas (server/blocks/gaussian/math)
// restricted to diagonal S, which the tests check.
#ifndef NATGRAD_SERVER_BLOCKS_GAUSSIAN_DIAG_MATH_GAUSSIAN_DIAG_BLOCK_H_
#define NATGRAD_SERVER_BLOCKS_GAUSSIAN_DIAG_MATH_GAUSSIAN_DIAG_BLOCK_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "server/core/block.h"
#include "server/core/schedule.h"

namespace natgrad::core {

inline constexpr absl::string_view kGaussianDiagBlockKind = "gaussian_diag";

enum class GaussianDiagParametrization { kNatural, kExpectation, kMeanVariance, kMeanLogStd };
// As the full block's GaussianStepSpace.
enum class GaussianDiagStepSpace { kTheta, kXi };

struct GaussianDiagOptions {
  int64_t dim = 0;
  int64_t copies = 1;
  GaussianDiagParametrization parametrization = GaussianDiagParametrization::kMeanVariance;
  SchedulePtr gamma;         // null: constant 1
  int max_halvings = 8;      // 0: no retries; at most 64
  bool return_direction = false;
  GaussianDiagStepSpace step_space = GaussianDiagStepSpace::kTheta;
};

// Validates (INVALID_ARGUMENT naming block and field) without allocating.
absl::Status ValidateGaussianDiagOptions(absl::string_view name, const GaussianDiagOptions& o);

absl::StatusOr<std::unique_ptr<ParameterBlock>> NewGaussianDiagBlock(
    std::string name, const GaussianDiagOptions& options, Precision precision);

}  // namespace natgrad::core

#endif  // NATGRAD_SERVER_BLOCKS_GAUSSIAN_DIAG_MATH_GAUSSIAN_DIAG_BLOCK_H_
