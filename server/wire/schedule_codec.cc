#include "server/wire/schedule_codec.h"

#include <cmath>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "google/protobuf/descriptor.h"
#include "google/protobuf/message.h"

namespace natgrad::wire {
namespace {

// Every double of a schedule (at any depth, any kind) must be finite: a NaN
// start or rate would otherwise reach a block's state at some later step.
// Walked by reflection so a new schedule kind is covered without a change.
std::string FirstNonFinite(const google::protobuf::Message& m, const std::string& path) {
  using FD = google::protobuf::FieldDescriptor;
  const google::protobuf::Reflection* r = m.GetReflection();
  std::vector<const FD*> fields;
  r->ListFields(m, &fields);
  for (const FD* f : fields) {
    const std::string here = absl::StrCat(path, ".", f->name());
    if (f->cpp_type() == FD::CPPTYPE_DOUBLE || f->cpp_type() == FD::CPPTYPE_FLOAT) {
      const bool dbl = f->cpp_type() == FD::CPPTYPE_DOUBLE;
      if (f->is_repeated()) {
        for (int i = 0; i < r->FieldSize(m, f); ++i) {
          const double v = dbl ? r->GetRepeatedDouble(m, f, i) : r->GetRepeatedFloat(m, f, i);
          if (!std::isfinite(v)) return absl::StrCat(here, "[", i, "]");
        }
      } else {
        const double v = dbl ? r->GetDouble(m, f) : r->GetFloat(m, f);
        if (!std::isfinite(v)) return here;
      }
    } else if (f->cpp_type() == FD::CPPTYPE_MESSAGE) {
      if (f->is_repeated()) {
        for (int i = 0; i < r->FieldSize(m, f); ++i) {
          std::string bad = FirstNonFinite(r->GetRepeatedMessage(m, f, i),
                                           absl::StrCat(here, "[", i, "]"));
          if (!bad.empty()) return bad;
        }
      } else {
        std::string bad = FirstNonFinite(r->GetMessage(m, f), here);
        if (!bad.empty()) return bad;
      }
    }
  }
  return "";
}

absl::StatusOr<core::SchedulePtr> Build(const natgrad::v1::Schedule& s,
                                        double default_value,
                                        const std::string& field, int depth) {
  // Joined schedules nest; bound the depth so a hostile config cannot
  // overflow the stack.
  if (depth > 8) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ": schedules nested more than 8 deep"));
  }
  using K = natgrad::v1::Schedule;
  switch (s.kind_case()) {
    case K::KIND_NOT_SET:
      return core::ConstantSchedule(default_value);
    case K::kConstant:
      if (!std::isfinite(s.constant().value())) {
        return absl::InvalidArgumentError(
            absl::StrCat(field, ".constant.value: must be finite"));
      }
      return core::ConstantSchedule(s.constant().value());
    case K::kPiecewiseConstant:
      return core::PiecewiseConstantSchedule(
          {s.piecewise_constant().boundaries().begin(),
           s.piecewise_constant().boundaries().end()},
          {s.piecewise_constant().values().begin(),
           s.piecewise_constant().values().end()});
    case K::kLinearWarmup:
      return core::LinearWarmupSchedule(s.linear_warmup().start(),
                                        s.linear_warmup().end(),
                                        s.linear_warmup().steps());
    case K::kCosineDecay:
      return core::CosineDecaySchedule(s.cosine_decay().init(),
                                       s.cosine_decay().steps(),
                                       s.cosine_decay().alpha());
    case K::kExponentialDecay:
      return core::ExponentialDecaySchedule(
          s.exponential_decay().init(), s.exponential_decay().rate(),
          s.exponential_decay().steps(), s.exponential_decay().staircase());
    case K::kPolynomialDecay:
      return core::PolynomialDecaySchedule(
          s.polynomial_decay().init(), s.polynomial_decay().end(),
          s.polynomial_decay().power(), s.polynomial_decay().steps());
    case K::kIncreasingRate:
      return core::IncreasingRateSchedule(s.increasing_rate().alpha(),
                                          s.increasing_rate().beta());
    case K::kLogLinearWarmup:
      return core::LogLinearWarmupSchedule(s.log_linear_warmup().start(),
                                           s.log_linear_warmup().end(),
                                           s.log_linear_warmup().steps());
    case K::kJoined: {
      std::vector<core::SchedulePtr> parts;
      for (int i = 0; i < s.joined().schedules_size(); ++i) {
        auto part = Build(s.joined().schedules(i), default_value,
                          absl::StrCat(field, ".joined.schedules[", i, "]"),
                          depth + 1);
        if (!part.ok()) return part.status();
        parts.push_back(*std::move(part));
      }
      return core::JoinedSchedule(
          std::move(parts),
          {s.joined().boundaries().begin(), s.joined().boundaries().end()});
    }
  }
  return absl::InvalidArgumentError(absl::StrCat(field, ": unknown kind"));
}

}  // namespace

absl::StatusOr<core::SchedulePtr> ScheduleFromProto(
    const natgrad::v1::Schedule& schedule, double default_value,
    absl::string_view field) {
  const std::string f(field);
  auto built = Build(schedule, default_value, f, 0);
  if (built.ok()) {
    // After Build, which bounds the nesting depth of this walk.
    if (std::string bad = FirstNonFinite(schedule, f); !bad.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(bad, ": must be finite"));
    }
  }
  if (!built.ok() && !absl::StartsWith(built.status().message(), f)) {
    return absl::InvalidArgumentError(
        absl::StrCat(f, ": ", built.status().message()));
  }
  return built;
}

}  // namespace natgrad::wire
