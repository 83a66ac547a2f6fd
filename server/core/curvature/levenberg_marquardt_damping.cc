#include "server/core/curvature/levenberg_marquardt_damping.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "absl/strings/str_cat.h"

namespace natgrad::core {
namespace {

absl::Status Invalid(absl::string_view field, double value,
                     absl::string_view want) {
  return absl::InvalidArgumentError(absl::StrCat(
      "adaptive_damping.", field, " is ", value, ", want ", want));
}

}  // namespace

absl::StatusOr<LevenbergMarquardtDamping> LevenbergMarquardtDamping::Create(
    const LevenbergMarquardtOptions& options) {
  LevenbergMarquardtOptions o = options;
  if (o.interval == 0) o.interval = 5;
  if (o.decay == 0) o.decay = 0.95;
  if (o.min_damping == 0) o.min_damping = 1e-8;
  if (o.max_damping == 0) o.max_damping = 1e3;
  if (o.interval < 0) return Invalid("interval", o.interval, ">= 0");
  if (!(o.decay > 0 && o.decay < 1)) return Invalid("decay", o.decay, "in (0, 1)");
  if (!(std::isfinite(o.min_damping) && o.min_damping > 0)) {
    return Invalid("min_damping", o.min_damping, "> 0");
  }
  if (!(std::isfinite(o.max_damping) && o.max_damping >= o.min_damping)) {
    return Invalid("max_damping", o.max_damping,
                   absl::StrCat(">= min_damping (", o.min_damping, ")"));
  }
  if (!(std::isfinite(o.initial_damping) && o.initial_damping > 0)) {
    return Invalid("initial_damping", o.initial_damping, "> 0");
  }
  return LevenbergMarquardtDamping(o);
}

LevenbergMarquardtDamping::LevenbergMarquardtDamping(
    const LevenbergMarquardtOptions& options)
    : options_(options),
      omega_(std::pow(options.decay, static_cast<double>(options.interval))),
      damping_(std::clamp(options.initial_damping, options.min_damping,
                          options.max_damping)) {}

double LevenbergMarquardtDamping::BeginStep(int64_t step,
                                            std::optional<double> loss) {
  current_step_ = step;
  current_loss_ = loss;
  // Only a predicted decrease can be judged (a zero gradient predicts 0).
  if (JudgesAt(step) && loss) {
    const double actual = *loss - measured_loss_;
    // A non-finite loss after the update: the model was badly wrong.
    const double rho = std::isfinite(actual)
                           ? actual / measured_change_
                           : -std::numeric_limits<double>::infinity();
    if (rho > 0.75) {
      damping_ *= omega_;
    } else if (rho < 0.25) {
      damping_ /= omega_;
    }
    damping_ = std::clamp(damping_, options_.min_damping, options_.max_damping);
    last_rho_ = rho;
  }
  measured_step_ = 0;
  return damping_;
}

void LevenbergMarquardtDamping::EndStep(int64_t step, double predicted_change) {
  if (step == current_step_ && step % options_.interval == 0 &&
      current_loss_ && std::isfinite(*current_loss_) &&
      std::isfinite(predicted_change)) {
    measured_step_ = step;
    measured_loss_ = *current_loss_;
    measured_change_ = predicted_change;
  }
  current_loss_.reset();
}

std::map<std::string, double> LevenbergMarquardtDamping::ExportState() const {
  std::map<std::string, double> s = {
      {"damping", damping_},
      {"measured_step", static_cast<double>(measured_step_)},
      {"measured_loss", measured_loss_},
      {"measured_change", measured_change_}};
  if (last_rho_ && std::isfinite(*last_rho_)) s["last_rho"] = *last_rho_;
  return s;
}

absl::Status LevenbergMarquardtDamping::ImportState(
    const std::map<std::string, double>& state) {
  for (const auto& [key, value] : state) {
    if (key != "damping" && key != "measured_step" && key != "measured_loss" &&
        key != "measured_change" && key != "last_rho") {
      return absl::InvalidArgumentError(
          absl::StrCat("adaptive damping state: unknown scalar \"", key, "\""));
    }
    if (!std::isfinite(value)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "adaptive damping state: \"", key, "\" is ", value));
    }
  }
  for (const char* key :
       {"damping", "measured_step", "measured_loss", "measured_change"}) {
    if (!state.contains(key)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "adaptive damping state: \"", key, "\" is missing"));
    }
  }
  const double damping = state.at("damping");
  const double step = state.at("measured_step");
  if (damping < options_.min_damping || damping > options_.max_damping) {
    return absl::InvalidArgumentError(absl::StrCat(
        "adaptive damping state: damping ", damping, " is outside [",
        options_.min_damping, ", ", options_.max_damping, "]"));
  }
  if (step < 0 || step != std::floor(step) || step > 9007199254740992.0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "adaptive damping state: measured_step ", step,
        " is not a step number"));
  }
  damping_ = damping;
  measured_step_ = static_cast<int64_t>(step);
  measured_loss_ = state.at("measured_loss");
  measured_change_ = state.at("measured_change");
  last_rho_.reset();
  if (auto it = state.find("last_rho"); it != state.end()) {
    last_rho_ = it->second;
  }
  current_step_ = 0;
  current_loss_.reset();
  return absl::OkStatus();
}

}  // namespace natgrad::core
