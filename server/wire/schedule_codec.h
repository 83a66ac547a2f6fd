// natgrad.v1.Schedule -> core::Schedule.
#ifndef NATGRAD_SERVER_WIRE_SCHEDULE_CODEC_H_
#define NATGRAD_SERVER_WIRE_SCHEDULE_CODEC_H_

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "natgrad/v1/schedule.pb.h"
#include "server/core/schedule.h"

namespace natgrad::wire {

// An unset schedule (no kind) yields ConstantSchedule(default_value); errors
// are INVALID_ARGUMENT prefixed with `field`.
absl::StatusOr<core::SchedulePtr> ScheduleFromProto(
    const natgrad::v1::Schedule& schedule, double default_value,
    absl::string_view field);

}  // namespace natgrad::wire

#endif  // NATGRAD_SERVER_WIRE_SCHEDULE_CODEC_H_
