#include "server/blocks/kfac_dense/math/kfac_dense_options.h"

#include <cmath>
#include <memory>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace natgrad::core {
namespace {

// A private constant schedule so that defaults do not depend on schedule.cc.
class FixedSchedule final : public Schedule {
 public:
  explicit FixedSchedule(double value) : value_(value) {}
  double Value(int64_t) const override { return value_; }

 private:
  double value_;
};

absl::Status Invalid(absl::string_view kind, absl::string_view block,
                     absl::string_view field, absl::string_view what) {
  return absl::InvalidArgumentError(
      absl::StrCat("block \"", block, "\": ", kind, ".", field, " ", what));
}

}  // namespace

absl::Status NormalizeKfacLayerOptions(absl::string_view kind,
                                       absl::string_view block_name,
                                       KfacLayerOptions& o) {
  if (o.d_in <= 0 || o.d_in + 1 > kKfacMaxFactorDim) {
    return Invalid(kind, block_name, "d_in",
                   absl::StrCat("is ", o.d_in, ", want 1..",
                                kKfacMaxFactorDim - 1));
  }
  if (o.d_out <= 0 || o.d_out > kKfacMaxFactorDim) {
    return Invalid(kind, block_name, "d_out",
                   absl::StrCat("is ", o.d_out, ", want 1..",
                                kKfacMaxFactorDim));
  }
  if (o.ema_decay == 0) o.ema_decay = kKfacDefaultEmaDecay;
  // 1 would never forget the zero start and the bias correction divides by 0.
  if (!(o.ema_decay > 0 && o.ema_decay < 1)) {
    return Invalid(kind, block_name, "ema_decay",
                   absl::StrCat("is ", o.ema_decay, ", want in (0, 1)"));
  }
  if (o.inverse_period == 0) o.inverse_period = kKfacDefaultInversePeriod;
  if (o.inverse_period < 0) {
    return Invalid(kind, block_name, "inverse_period",
                   absl::StrCat("is ", o.inverse_period, ", want >= 0"));
  }
  if (o.locations == 0) o.locations = 1;
  if (o.locations < 0) {
    return Invalid(kind, block_name, "locations",
                   absl::StrCat("is ", o.locations, ", want >= 0"));
  }
  if (!o.learning_rate) {
    o.learning_rate = std::make_shared<FixedSchedule>(kKfacDefaultLearningRate);
  }
  if (!o.damping) {
    o.damping = std::make_shared<FixedSchedule>(kKfacDefaultDamping);
  }
  if (!o.momentum) o.momentum = std::make_shared<FixedSchedule>(0.0);
  if (!o.weight_decay) o.weight_decay = std::make_shared<FixedSchedule>(0.0);
  return absl::OkStatus();
}

absl::StatusOr<KfacDenseOptions> NormalizeKfacDenseOptions(
    absl::string_view block_name, const KfacDenseOptions& options) {
  constexpr absl::string_view kKind = "kfac_dense";
  KfacDenseOptions o = options;
  if (absl::Status s = NormalizeKfacLayerOptions(kKind, block_name, o); !s.ok()) {
    return s;
  }
  if (o.damping_mode != KfacDampingMode::kFactoredTikhonov &&
      o.damping_mode != KfacDampingMode::kEigenExact) {
    return Invalid(kKind, block_name, "damping_mode",
                   absl::StrCat("is ", static_cast<int>(o.damping_mode),
                                ", not a known mode"));
  }
  if (o.stats_period == 0) o.stats_period = 1;
  if (o.stats_period < 0) {
    return Invalid(kKind, block_name, "stats_period",
                   absl::StrCat("is ", o.stats_period, ", want >= 0"));
  }
  if (o.max_staleness < 0) {
    return Invalid(kKind, block_name, "max_staleness",
                   absl::StrCat("is ", o.max_staleness, ", want >= 0"));
  }
  if (!o.async_inversion) {
    o.max_staleness = 0;
  } else {
    if (o.max_staleness == 0) o.max_staleness = o.inverse_period;
    // At most one refresh in flight: the next refresh step waits anyway.
    if (o.max_staleness > o.inverse_period) {
      return Invalid(kKind, block_name, "max_staleness",
                     absl::StrCat("is ", o.max_staleness,
                                  ", want <= inverse_period (",
                                  o.inverse_period, ")"));
    }
  }
  return o;
}

int64_t KfacDenseStateBytes(const KfacDenseOptions& options,
                            Precision precision) {
  const int64_t a = options.d_in + (options.has_bias ? 1 : 0);
  const int64_t g = options.d_out;
  const int64_t scalar = precision == Precision::kFloat32 ? 4 : 8;
  // EMA factors + momentum, then the installed and one in-flight
  // decomposition (eigen mode also keeps the eigenvalues); an async refresh
  // also keeps the factors it decomposed (for the PSD test).
  const int64_t decomposition = a * a + g * g + a + g;
  const int64_t held = options.async_inversion ? a * a + g * g : 0;
  return scalar * (a * a + g * g + g * a + 2 * decomposition + held);
}

}  // namespace natgrad::core
