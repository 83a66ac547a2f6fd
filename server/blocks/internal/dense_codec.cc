#include "server/blocks/internal/dense_codec.h"

#include <cmath>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "server/wire/schedule_codec.h"
#include "server/wire/tensor_codec.h"

namespace natgrad::blocks::internal {

int64_t SaturatingElements(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n = SaturatingMul(n, std::max<int64_t>(d, 0));
  return n;
}

core::Precision PrecisionOf(natgrad::v1::DType dtype, core::Precision fallback) {
  switch (dtype) {
    case natgrad::v1::FLOAT32:
      return core::Precision::kFloat32;
    case natgrad::v1::FLOAT64:
      return core::Precision::kFloat64;
    default:
      return fallback;
  }
}

absl::StatusOr<core::MatrixShape> MatrixShapeOf(const std::vector<int64_t>& shape,
                                                const std::string& field) {
  if (shape.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(field, ".shape: required"));
  }
  int64_t cols = 1;
  for (size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] <= 0 || shape[i] > (int64_t{1} << 31)) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, ".shape: dimensions must be positive, got [",
                       absl::StrJoin(shape, ", "), "]"));
    }
    if (i > 0) cols = SaturatingMul(cols, shape[i]);
  }
  if (SaturatingMul(shape[0], cols) > (int64_t{1} << 32)) {
    return absl::InvalidArgumentError(absl::StrCat(field, ".shape: too many elements"));
  }
  return core::MatrixShape{shape[0], shape.size() == 1 ? 1 : cols};
}

absl::StatusOr<core::SchedulePtr> OptionalSchedule(const natgrad::v1::Schedule& proto,
                                                   const std::string& field) {
  if (proto.kind_case() == natgrad::v1::Schedule::KIND_NOT_SET) return core::SchedulePtr();
  return wire::ScheduleFromProto(proto, 0.0, field);
}

absl::StatusOr<core::SchedulePtr> OptionalSchedule(const natgrad::v1::Schedule& proto,
                                                   const std::string& field,
                                                   ValueRange range) {
  std::vector<double> fixed;
  std::string where;
  if (proto.has_constant()) {
    fixed = {proto.constant().value()};
    where = ".constant.value";
  } else if (proto.has_piecewise_constant()) {
    fixed = {proto.piecewise_constant().values().begin(),
             proto.piecewise_constant().values().end()};
    where = ".piecewise_constant.values";
  }
  for (double v : fixed) {
    // Written as !(valid) so NaN fails too.
    if (!(v >= range.min && v < range.below)) {
      return absl::InvalidArgumentError(absl::StrCat(
          field, where, ": is ", v, ", want >= ", range.min,
          std::isfinite(range.below) ? absl::StrCat(" and < ", range.below) : ""));
    }
  }
  return OptionalSchedule(proto, field);
}

std::string StepField(const natgrad::v1::BlockStep& step, absl::string_view field) {
  return absl::StrCat("block ", core::QuotedBlockName(step.name()), ": ", field);
}

absl::Status RefuseParts(const natgrad::v1::BlockStep& step, absl::string_view kind,
                         bool kfac_allowed) {
  if (step.has_gaussian()) {
    return absl::InvalidArgumentError(absl::StrCat(
        StepField(step, "gaussian"), " is only for gaussian blocks (this one is ", kind, ")"));
  }
  if (!kfac_allowed && step.has_kfac()) {
    return absl::InvalidArgumentError(absl::StrCat(
        StepField(step, "kfac"), " (curvature statistics) is only for kfac_dense blocks",
        " (this one is ", kind, ")"));
  }
  return absl::OkStatus();
}

absl::StatusOr<core::DenseStepInput> DecodeDenseStep(natgrad::v1::BlockStep& step,
                                                     ReplyFormat* reply) {
  if (!step.has_gradient()) {
    return absl::InvalidArgumentError(StepField(step, "gradient is required"));
  }
  core::DenseStepInput in;
  reply->dtype = step.gradient().dtype();
  reply->shapes = {{step.gradient().shape().begin(), step.gradient().shape().end()}};
  absl::StatusOr<core::DenseTensor> gradient =
      wire::TakeTensor(step.mutable_gradient(), StepField(step, "gradient"));
  if (!gradient.ok()) return gradient.status();
  in.gradient = *std::move(gradient);
  if (step.has_params()) {
    const std::vector<int64_t> shape(step.params().shape().begin(),
                                     step.params().shape().end());
    if (shape != reply->shapes[0]) {
      return absl::InvalidArgumentError(absl::StrCat(
          StepField(step, "params"), " has shape [", absl::StrJoin(shape, ", "),
          "], want the gradient's [", absl::StrJoin(reply->shapes[0], ", "), "]"));
    }
    absl::StatusOr<core::DenseTensor> params =
        wire::TakeTensor(step.mutable_params(), StepField(step, "params"));
    if (!params.ok()) return params.status();
    in.params = *std::move(params);
  }
  if (step.has_learning_rate()) {
    if (!std::isfinite(step.learning_rate()) || step.learning_rate() < 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          StepField(step, "learning_rate"), " must be finite and >= 0, got ",
          step.learning_rate()));
    }
    in.learning_rate = step.learning_rate();
  }
  return in;
}

void EncodeDelta(core::BlockStepOutput& output, const ReplyFormat& reply,
                 natgrad::v1::BlockUpdate* update) {
  if (!output.delta.empty()) {
    wire::EncodeTensor(std::move(output.delta), reply.dtype,
                       reply.shapes.empty() ? std::vector<int64_t>{} : reply.shapes[0],
                       update->mutable_delta());
  }
  for (const auto& [k, v] : output.hyperparameters) {
    (*update->mutable_hyperparameters())[k] = v;
  }
}

}  // namespace natgrad::blocks::internal
