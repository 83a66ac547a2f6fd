// Scalar hyperparameter schedules of the step number t (docs/math.md),
// optax-style: small immutable value functions that compose. Steps are
// numbered from 1; Value(t) is what step t uses.
#ifndef NATGRAD_SERVER_CORE_SCHEDULE_H_
#define NATGRAD_SERVER_CORE_SCHEDULE_H_

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"

namespace natgrad::core {

class Schedule {
 public:
  virtual ~Schedule() = default;
  virtual double Value(int64_t t) const = 0;
};

using SchedulePtr = std::shared_ptr<const Schedule>;

// Each factory validates its arguments (INVALID_ARGUMENT on nonsense such as
// a non-positive period or a log-warm-up from a non-positive value).
SchedulePtr ConstantSchedule(double value);
absl::StatusOr<SchedulePtr> PiecewiseConstantSchedule(
    std::vector<int64_t> boundaries, std::vector<double> values);
absl::StatusOr<SchedulePtr> LinearWarmupSchedule(double start, double end,
                                                 int64_t steps);
absl::StatusOr<SchedulePtr> CosineDecaySchedule(double init, int64_t steps,
                                                double alpha);
absl::StatusOr<SchedulePtr> ExponentialDecaySchedule(double init, double rate,
                                                     int64_t steps,
                                                     bool staircase);
absl::StatusOr<SchedulePtr> PolynomialDecaySchedule(double init, double end,
                                                    double power,
                                                    int64_t steps);
absl::StatusOr<SchedulePtr> IncreasingRateSchedule(double alpha, double beta);
absl::StatusOr<SchedulePtr> LogLinearWarmupSchedule(double start, double end,
                                                    int64_t steps);
// schedules[0] for t <= boundaries[0]; schedules[i] for
// boundaries[i-1] < t <= boundaries[i], evaluated at t - boundaries[i-1], so
// every piece starts at its own step 1 (a K-step warm-up peaks at t = K).
absl::StatusOr<SchedulePtr> JoinedSchedule(std::vector<SchedulePtr> schedules,
                                           std::vector<int64_t> boundaries);

}  // namespace natgrad::core

#endif  // NATGRAD_SERVER_CORE_SCHEDULE_H_
