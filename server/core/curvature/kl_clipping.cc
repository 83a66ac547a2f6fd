#include "server/core/curvature/kl_clipping.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"

namespace natgrad::core {

absl::Status ValidateKlClipKappa(double kappa) {
  if (std::isfinite(kappa) && kappa > 0) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat("kl_clip.kappa is ", kappa, ", want > 0"));
}

double KlClipScale(double kl_sum, double kappa) {
  if (kl_sum == 0) return 1.0;
  if (!std::isfinite(kl_sum)) return 0.0;
  return std::min(1.0, std::sqrt(kappa / std::abs(kl_sum)));
}

double KlClipSum(
    const std::vector<std::unique_ptr<PendingBlockUpdate>>& updates) {
  double sum = 0;
  for (const auto& u : updates) {
    if (u && u->curvature()) sum += u->curvature()->KlTerm();
  }
  return sum;
}

double PredictedReductionSum(
    const std::vector<std::unique_ptr<PendingBlockUpdate>>& updates, double scale) {
  double sum = 0;
  for (const auto& u : updates) {
    if (u && u->curvature()) sum += u->curvature()->PredictedReduction(scale);
  }
  return sum;
}

}  // namespace natgrad::core
