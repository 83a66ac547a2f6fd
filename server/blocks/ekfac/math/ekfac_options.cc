#include "server/blocks/ekfac/math/ekfac_options.h"

#include <algorithm>
#include <limits>
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

absl::Status Invalid(absl::string_view block, absl::string_view field,
                     absl::string_view what) {
  return absl::InvalidArgumentError(
      absl::StrCat("block \"", block, "\": ekfac.", field, " ", what));
}

int64_t Add(int64_t a, int64_t b) {
  return a > std::numeric_limits<int64_t>::max() - b
             ? std::numeric_limits<int64_t>::max()
             : a + b;
}

int64_t Mul(int64_t a, int64_t b) {
  if (a <= 0 || b <= 0) return 0;
  return a > std::numeric_limits<int64_t>::max() / b
             ? std::numeric_limits<int64_t>::max()
             : a * b;
}

}  // namespace

absl::StatusOr<EkfacOptions> NormalizeEkfacOptions(absl::string_view block_name,
                                                   const EkfacOptions& options) {
  EkfacOptions o = options;
  if (o.d_in <= 0 || o.d_in + 1 > kEkfacMaxFactorDim) {
    return Invalid(block_name, "d_in",
                   absl::StrCat("is ", o.d_in, ", want 1..", kEkfacMaxFactorDim - 1));
  }
  if (o.d_out <= 0 || o.d_out > kEkfacMaxFactorDim) {
    return Invalid(block_name, "d_out",
                   absl::StrCat("is ", o.d_out, ", want 1..", kEkfacMaxFactorDim));
  }
  if (o.ema_decay == 0) o.ema_decay = kEkfacDefaultEmaDecay;
  // 1 would never forget the zero start and the bias correction divides by 0.
  if (!(o.ema_decay > 0 && o.ema_decay < 1)) {
    return Invalid(block_name, "ema_decay",
                   absl::StrCat("is ", o.ema_decay, ", want in (0, 1)"));
  }
  if (o.inverse_period == 0) o.inverse_period = kEkfacDefaultInversePeriod;
  if (o.inverse_period < 0) {
    return Invalid(block_name, "inverse_period",
                   absl::StrCat("is ", o.inverse_period, ", want >= 0"));
  }
  if (o.locations == 0) o.locations = 1;
  if (o.locations < 0) {
    return Invalid(block_name, "locations",
                   absl::StrCat("is ", o.locations, ", want >= 0"));
  }
  if (!o.learning_rate) {
    o.learning_rate = std::make_shared<FixedSchedule>(kEkfacDefaultLearningRate);
  }
  if (!o.damping) o.damping = std::make_shared<FixedSchedule>(kEkfacDefaultDamping);
  if (!o.momentum) o.momentum = std::make_shared<FixedSchedule>(0.0);
  if (!o.weight_decay) o.weight_decay = std::make_shared<FixedSchedule>(0.0);
  return o;
}

int64_t EkfacStateBytes(const EkfacOptions& options, Precision precision) {
  const int64_t a = Add(std::max<int64_t>(options.d_in, 0), options.has_bias ? 1 : 0);
  const int64_t g = std::max<int64_t>(options.d_out, 0);
  const int64_t scalar = precision == Precision::kFloat32 ? 4 : 8;
  // A, G and their eigenvectors (2 a^2 + 2 g^2), scaling and momentum (2 g a).
  const int64_t squares = Add(Mul(a, a), Mul(g, g));
  return Mul(scalar, Add(Mul(2, squares), Mul(2, Mul(g, a))));
}

}  // namespace natgrad::core
