// KL clipping, a session-wide transform over the blocks' curvature models
// (Ba, Grosse & Martens 2017; KAISA's kl_clip): the session sums
// lr^2 <V, grad> over the pending updates that have a CurvatureModel and
// commits each of them with the same nu = min(1, sqrt(kappa / |sum|)).
#ifndef NATGRAD_SERVER_CORE_CURVATURE_KL_CLIPPING_H_
#define NATGRAD_SERVER_CORE_CURVATURE_KL_CLIPPING_H_

#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "server/core/block.h"

namespace natgrad::core {

inline constexpr double kDefaultKlClipKappa = 1e-3;  // KAISA

// INVALID_ARGUMENT unless kappa is finite and > 0.
absl::Status ValidateKlClipKappa(double kappa);

// nu = min(1, sqrt(kappa / |kl_sum|)); 1 when kl_sum is 0 (nothing to clip);
// 0 when kl_sum is not finite (an unbounded step is dropped, not taken).
double KlClipScale(double kl_sum, double kappa);

// Sum of KlTerm() over the updates that have a curvature model (null
// entries, blocks left out of the step, are skipped).
double KlClipSum(const std::vector<std::unique_ptr<PendingBlockUpdate>>& updates);

// Sum of PredictedReduction(scale) over the same updates (for
// Levenberg-Marquardt damping).
double PredictedReductionSum(
    const std::vector<std::unique_ptr<PendingBlockUpdate>>& updates, double scale);

}  // namespace natgrad::core

#endif  // NATGRAD_SERVER_CORE_CURVATURE_KL_CLIPPING_H_
