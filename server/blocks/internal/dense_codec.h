// Wire helpers the block kinds share (internal to server/blocks): the dense
// gradient/params part of a step, the delta of an update, config shapes and
// schedules, and size arithmetic that cannot overflow.
#ifndef NATGRAD_SERVER_BLOCKS_INTERNAL_DENSE_CODEC_H_
#define NATGRAD_SERVER_BLOCKS_INTERNAL_DENSE_CODEC_H_

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "natgrad/v1/schedule.pb.h"
#include "server/blocks/block_kind.h"
#include "server/core/block.h"
#include "server/core/block_error.h"
#include "server/core/schedule.h"

namespace natgrad::blocks::internal {

inline int64_t SaturatingAdd(int64_t a, int64_t b) {
  if (a > std::numeric_limits<int64_t>::max() - b) return std::numeric_limits<int64_t>::max();
  return a + b;
}

inline int64_t SaturatingMul(int64_t a, int64_t b) {
  if (a <= 0 || b <= 0) return 0;
  if (a > std::numeric_limits<int64_t>::max() / b) return std::numeric_limits<int64_t>::max();
  return a * b;
}

// Product of the dimensions, saturating (negative dimensions count as 0).
int64_t SaturatingElements(const std::vector<int64_t>& shape);

inline int64_t ElementBytes(natgrad::v1::DType state_dtype, int64_t fallback) {
  switch (state_dtype) {
    case natgrad::v1::FLOAT32:
      return 4;
    case natgrad::v1::FLOAT64:
      return 8;
    default:
      return fallback;
  }
}

core::Precision PrecisionOf(natgrad::v1::DType dtype, core::Precision fallback);

// The block's matrix view of its shape: [shape[0], prod(rest)], each
// dimension positive, at most 2^32 elements.
absl::StatusOr<core::MatrixShape> MatrixShapeOf(const std::vector<int64_t>& shape,
                                                const std::string& field);

// Null for an unset schedule (the core block applies its documented default).
absl::StatusOr<core::SchedulePtr> OptionalSchedule(const natgrad::v1::Schedule& proto,
                                                   const std::string& field);

// Where a hyperparameter can work: min <= value < below. Checked when the
// config arrives for the values a schedule fixes (constant, piecewise
// constant); the blocks check every other schedule's value at each step.
struct ValueRange {
  double min = 0;
  double below = std::numeric_limits<double>::infinity();
};
inline constexpr ValueRange kNonNegative{};
inline constexpr ValueRange kMomentumRange{0, 1};

absl::StatusOr<core::SchedulePtr> OptionalSchedule(const natgrad::v1::Schedule& proto,
                                                   const std::string& field,
                                                   ValueRange range);

// The name of a block in a step's error messages: block "NAME": FIELD.
std::string StepField(const natgrad::v1::BlockStep& step, absl::string_view field);

// gradient (required), params (optional, same shape) and learning_rate
// (optional, finite, >= 0); records the gradient's dtype and shape for the
// reply.
absl::StatusOr<core::DenseStepInput> DecodeDenseStep(natgrad::v1::BlockStep& step,
                                                     ReplyFormat* reply);

// INVALID_ARGUMENT when the step carries a part this kind does not take.
absl::Status RefuseParts(const natgrad::v1::BlockStep& step, absl::string_view kind,
                         bool kfac_allowed);

// The delta in the gradient's dtype and shape (its bytes moved out of
// `output` when the block's precision is the gradient's), plus the
// hyperparameters.
void EncodeDelta(core::BlockStepOutput& output, const ReplyFormat& reply,
                 natgrad::v1::BlockUpdate* update);

}  // namespace natgrad::blocks::internal

#endif  // NATGRAD_SERVER_BLOCKS_INTERNAL_DENSE_CODEC_H_
