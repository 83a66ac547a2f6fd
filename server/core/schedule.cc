#include "server/core/schedule.h"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <numbers>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace natgrad::core {
namespace {

// ---- argument checks -------------------------------------------------------

absl::Status RequireFinite(absl::string_view schedule, absl::string_view param,
                           double v) {
  if (std::isfinite(v)) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat(schedule, ": ", param, " must be finite, got ", v));
}

absl::Status RequirePositive(absl::string_view schedule,
                             absl::string_view param, double v) {
  if (std::isfinite(v) && v > 0) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat(schedule, ": ", param, " must be positive, got ", v));
}

absl::Status RequirePositiveSteps(absl::string_view schedule,
                                  absl::string_view param, int64_t v) {
  if (v > 0) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat(schedule, ": ", param, " must be positive, got ", v));
}

absl::Status RequireStrictlyIncreasing(absl::string_view schedule,
                                       const std::vector<int64_t>& b) {
  for (size_t i = 1; i < b.size(); ++i) {
    if (b[i] <= b[i - 1]) {
      return absl::InvalidArgumentError(absl::StrCat(
          schedule, ": boundaries must be strictly increasing, boundaries[", i,
          "] = ", b[i], " <= boundaries[", i - 1, "] = ", b[i - 1]));
    }
  }
  return absl::OkStatus();
}

// min(t, steps) / steps, the progress fraction shared by the warm-up and
// decay schedules (1 at and after t = steps).
double Fraction(int64_t t, int64_t steps) {
  return static_cast<double>(std::min(t, steps)) / static_cast<double>(steps);
}

// ---- one class per schedule kind ------------------------------------------

class Constant final : public Schedule {
 public:
  explicit Constant(double value) : value_(value) {}
  double Value(int64_t) const override { return value_; }

 private:
  double value_;
};

class PiecewiseConstant final : public Schedule {
 public:
  PiecewiseConstant(std::vector<int64_t> boundaries, std::vector<double> values)
      : boundaries_(std::move(boundaries)), values_(std::move(values)) {}
  double Value(int64_t t) const override {
    // values[i] for boundaries[i-1] <= t < boundaries[i]: i is the number of
    // boundaries <= t.
    const auto i = std::upper_bound(boundaries_.begin(), boundaries_.end(), t) -
                   boundaries_.begin();
    return values_[static_cast<size_t>(i)];
  }

 private:
  std::vector<int64_t> boundaries_;
  std::vector<double> values_;
};

class LinearWarmup final : public Schedule {
 public:
  LinearWarmup(double start, double end, int64_t steps)
      : start_(start), end_(end), steps_(steps) {}
  double Value(int64_t t) const override {
    return start_ + (end_ - start_) * Fraction(t, steps_);
  }

 private:
  double start_, end_;
  int64_t steps_;
};

class CosineDecay final : public Schedule {
 public:
  CosineDecay(double init, int64_t steps, double alpha)
      : init_(init), steps_(steps), alpha_(alpha) {}
  double Value(int64_t t) const override {
    const double cosine =
        0.5 * (1.0 + std::cos(std::numbers::pi * Fraction(t, steps_)));
    return init_ * ((1.0 - alpha_) * cosine + alpha_);
  }

 private:
  double init_;
  int64_t steps_;
  double alpha_;
};

class ExponentialDecay final : public Schedule {
 public:
  ExponentialDecay(double init, double rate, int64_t steps, bool staircase)
      : init_(init), rate_(rate), steps_(steps), staircase_(staircase) {}
  double Value(int64_t t) const override {
    // Integer division is floor(t / steps) for t >= 0 (steps > 0).
    const double exponent =
        staircase_ ? static_cast<double>(t / steps_)
                   : static_cast<double>(t) / static_cast<double>(steps_);
    return init_ * std::pow(rate_, exponent);
  }

 private:
  double init_, rate_;
  int64_t steps_;
  bool staircase_;
};

class PolynomialDecay final : public Schedule {
 public:
  PolynomialDecay(double init, double end, double power, int64_t steps)
      : init_(init), end_(end), power_(power), steps_(steps) {}
  double Value(int64_t t) const override {
    return (init_ - end_) * std::pow(1.0 - Fraction(t, steps_), power_) + end_;
  }

 private:
  double init_, end_, power_;
  int64_t steps_;
};

class IncreasingRate final : public Schedule {
 public:
  IncreasingRate(double alpha, double beta) : alpha_(alpha), beta_(beta) {}
  double Value(int64_t t) const override {
    // -expm1 keeps 1 - exp(-beta t) accurate when beta t is tiny.
    return alpha_ * -std::expm1(-beta_ * static_cast<double>(t));
  }

 private:
  double alpha_, beta_;
};

class LogLinearWarmup final : public Schedule {
 public:
  LogLinearWarmup(double start, double end, int64_t steps)
      : log_start_(std::log10(start)),
        log_end_(std::log10(end)),
        steps_(steps) {}
  double Value(int64_t t) const override {
    const double k = static_cast<double>(std::min(t, steps_));
    const double big_k = static_cast<double>(steps_);
    return std::pow(10.0, ((big_k - k) * log_start_ + k * log_end_) / big_k);
  }

 private:
  double log_start_, log_end_;
  int64_t steps_;
};

class Joined final : public Schedule {
 public:
  Joined(std::vector<SchedulePtr> schedules, std::vector<int64_t> boundaries)
      : schedules_(std::move(schedules)), boundaries_(std::move(boundaries)) {}
  double Value(int64_t t) const override {
    // Schedule i covers boundaries[i-1] < t <= boundaries[i] and sees
    // t - boundaries[i-1], so every piece starts at its own step 1 (steps are
    // 1-based): warm-up over K steps peaks at t = K, decay starts at t = K+1.
    const auto i = std::lower_bound(boundaries_.begin(), boundaries_.end(), t) -
                   boundaries_.begin();
    const int64_t offset = i == 0 ? 0 : boundaries_[static_cast<size_t>(i - 1)];
    return schedules_[static_cast<size_t>(i)]->Value(t - offset);
  }

 private:
  std::vector<SchedulePtr> schedules_;
  std::vector<int64_t> boundaries_;
};

}  // namespace

SchedulePtr ConstantSchedule(double value) {
  return std::make_shared<Constant>(value);
}

absl::StatusOr<SchedulePtr> PiecewiseConstantSchedule(
    std::vector<int64_t> boundaries, std::vector<double> values) {
  constexpr absl::string_view kName = "piecewise_constant";
  if (values.size() != boundaries.size() + 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        kName, ": values must have one more entry than boundaries, got ",
        values.size(), " values and ", boundaries.size(), " boundaries"));
  }
  if (absl::Status s = RequireStrictlyIncreasing(kName, boundaries); !s.ok()) {
    return s;
  }
  for (size_t i = 0; i < values.size(); ++i) {
    if (!std::isfinite(values[i])) {
      return absl::InvalidArgumentError(absl::StrCat(
          kName, ": values[", i, "] must be finite, got ", values[i]));
    }
  }
  return std::make_shared<PiecewiseConstant>(std::move(boundaries),
                                             std::move(values));
}

absl::StatusOr<SchedulePtr> LinearWarmupSchedule(double start, double end,
                                                 int64_t steps) {
  constexpr absl::string_view kName = "linear_warmup";
  for (absl::Status s :
       {RequireFinite(kName, "start", start), RequireFinite(kName, "end", end),
        RequirePositiveSteps(kName, "steps", steps)}) {
    if (!s.ok()) return s;
  }
  return std::make_shared<LinearWarmup>(start, end, steps);
}

absl::StatusOr<SchedulePtr> CosineDecaySchedule(double init, int64_t steps,
                                                double alpha) {
  constexpr absl::string_view kName = "cosine_decay";
  for (absl::Status s : {RequireFinite(kName, "init", init),
                         RequirePositiveSteps(kName, "steps", steps),
                         RequireFinite(kName, "alpha", alpha)}) {
    if (!s.ok()) return s;
  }
  return std::make_shared<CosineDecay>(init, steps, alpha);
}

absl::StatusOr<SchedulePtr> ExponentialDecaySchedule(double init, double rate,
                                                     int64_t steps,
                                                     bool staircase) {
  constexpr absl::string_view kName = "exponential_decay";
  // rate <= 0 makes rate^(t/steps) NaN or degenerate (optax refuses 0 too).
  for (absl::Status s : {RequireFinite(kName, "init", init),
                         RequirePositive(kName, "rate", rate),
                         RequirePositiveSteps(kName, "steps", steps)}) {
    if (!s.ok()) return s;
  }
  return std::make_shared<ExponentialDecay>(init, rate, steps, staircase);
}

absl::StatusOr<SchedulePtr> PolynomialDecaySchedule(double init, double end,
                                                    double power,
                                                    int64_t steps) {
  constexpr absl::string_view kName = "polynomial_decay";
  // power <= 0 is no decay (0^0 = 1) or infinite at t = steps (0^-p).
  for (absl::Status s :
       {RequireFinite(kName, "init", init), RequireFinite(kName, "end", end),
        RequirePositive(kName, "power", power),
        RequirePositiveSteps(kName, "steps", steps)}) {
    if (!s.ok()) return s;
  }
  return std::make_shared<PolynomialDecay>(init, end, power, steps);
}

absl::StatusOr<SchedulePtr> IncreasingRateSchedule(double alpha, double beta) {
  constexpr absl::string_view kName = "increasing_rate";
  // beta <= 0 is a rate stuck at 0 or growing without bound.
  for (absl::Status s : {RequireFinite(kName, "alpha", alpha),
                         RequirePositive(kName, "beta", beta)}) {
    if (!s.ok()) return s;
  }
  return std::make_shared<IncreasingRate>(alpha, beta);
}

absl::StatusOr<SchedulePtr> LogLinearWarmupSchedule(double start, double end,
                                                    int64_t steps) {
  constexpr absl::string_view kName = "log_linear_warmup";
  // log10 needs positive endpoints.
  for (absl::Status s : {RequirePositive(kName, "start", start),
                         RequirePositive(kName, "end", end),
                         RequirePositiveSteps(kName, "steps", steps)}) {
    if (!s.ok()) return s;
  }
  return std::make_shared<LogLinearWarmup>(start, end, steps);
}

absl::StatusOr<SchedulePtr> JoinedSchedule(std::vector<SchedulePtr> schedules,
                                           std::vector<int64_t> boundaries) {
  constexpr absl::string_view kName = "joined";
  if (schedules.size() != boundaries.size() + 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        kName, ": schedules must have one more entry than boundaries, got ",
        schedules.size(), " schedules and ", boundaries.size(), " boundaries"));
  }
  for (size_t i = 0; i < schedules.size(); ++i) {
    if (schedules[i] == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat(kName, ": schedules[", i, "] is null"));
    }
  }
  if (!boundaries.empty() && boundaries[0] <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        kName,
        ": boundaries must be positive, boundaries[0] = ", boundaries[0]));
  }
  if (absl::Status s = RequireStrictlyIncreasing(kName, boundaries); !s.ok()) {
    return s;
  }
  return std::make_shared<Joined>(std::move(schedules), std::move(boundaries));
}

}  // namespace natgrad::core
