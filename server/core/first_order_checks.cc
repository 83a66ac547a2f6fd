#include "server/core/first_order_checks.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

#include "absl/strings/str_cat.h"
#include "server/core/block_error.h"

namespace natgrad::core::first_order_internal {
namespace {

std::string ShapeString(int64_t rows, int64_t cols) {
  return absl::StrCat(rows, "x", cols);
}

absl::Status CheckMatrix(absl::string_view field, const std::string& block,
                         MatrixShape shape, const DenseTensor& m) {
  if (m.rows() != shape.rows || m.cols() != shape.cols) {
    return InvalidBlockField(
        block, field,
        absl::StrCat("has shape ", ShapeString(m.rows(), m.cols()), ", want ",
                     ShapeString(shape.rows, shape.cols)));
  }
  // No second scan of a received tensor: decoding checked it once.
  if (!m.AllFinite()) {
    return InvalidBlockField(block, field, "contains non-finite values");
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status CheckShape(absl::string_view kind, MatrixShape shape) {
  if (shape.rows <= 0 || shape.cols <= 0 ||
      shape.rows > std::numeric_limits<Eigen::Index>::max() / shape.cols) {
    return absl::InvalidArgumentError(
        absl::StrCat(kind, " block: shape must be positive, got ",
                     ShapeString(shape.rows, shape.cols)));
  }
  return absl::OkStatus();
}

absl::Status CheckStepInput(const std::string& block, MatrixShape shape,
                            const DenseStepInput& input,
                            const StepContext& context) {
  if (context.step < 1) {
    return InvalidBlockField(block, "step",
                             absl::StrCat("is ", context.step, ", want >= 1"));
  }
  if (absl::Status s = CheckMatrix("gradient", block, shape, input.gradient);
      !s.ok()) {
    return s;
  }
  if (input.params.has_value()) {
    return CheckMatrix("params", block, shape, *input.params);
  }
  return absl::OkStatus();
}

absl::StatusOr<double> NonNegativeValue(const Schedule& schedule, int64_t t,
                                        const std::string& block,
                                        absl::string_view param) {
  const double v = schedule.Value(t);
  if (!std::isfinite(v) || v < 0) {
    return InvalidBlockField(
        block, param,
        absl::StrCat("at step ", t, " must be finite and >= 0, schedule gives ", v));
  }
  return v;
}

absl::StatusOr<double> LearningRate(const Schedule& schedule, int64_t t,
                                    const std::string& block,
                                    const DenseStepInput& input) {
  if (!input.learning_rate.has_value()) {
    return NonNegativeValue(schedule, t, block, "learning_rate");
  }
  const double v = *input.learning_rate;
  if (!std::isfinite(v) || v < 0) {
    return InvalidBlockField(
        block, "learning_rate",
        absl::StrCat("at step ", t, " must be finite and >= 0, the step sets ", v));
  }
  return v;
}

absl::StatusOr<const Eigen::MatrixXd*> StateTensor(const BlockState& state,
                                                   absl::string_view name,
                                                   MatrixShape shape) {
  auto it = state.tensors.find(std::string(name));
  if (it == state.tensors.end()) {
    return absl::InvalidArgumentError(
        absl::StrCat("state tensor '", name, "' is missing"));
  }
  const Eigen::MatrixXd& m = it->second;
  if (m.rows() != shape.rows || m.cols() != shape.cols) {
    return absl::InvalidArgumentError(absl::StrCat(
        "state tensor '", name, "' has shape ", ShapeString(m.rows(), m.cols()),
        ", expected ", ShapeString(shape.rows, shape.cols)));
  }
  if (!m.allFinite()) {
    return absl::InvalidArgumentError(
        absl::StrCat("state tensor '", name, "' contains non-finite values"));
  }
  return &m;
}

absl::StatusOr<int64_t> StateStep(const BlockState& state) {
  auto it = state.scalars.find("step");
  if (it == state.scalars.end()) {
    return absl::InvalidArgumentError("state scalar 'step' is missing");
  }
  const double v = it->second;
  // 2^53: beyond it doubles no longer hold every integer.
  if (!std::isfinite(v) || v < 0 || v != std::floor(v) ||
      v > 9007199254740992.0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "state scalar 'step' must be a non-negative integer, got ", v));
  }
  return static_cast<int64_t>(v);
}

absl::Status CheckNoUnknownNames(
    const BlockState& state, std::initializer_list<absl::string_view> allowed) {
  auto known = [&](const std::string& name) {
    return std::find(allowed.begin(), allowed.end(), name) != allowed.end();
  };
  for (const auto& [name, unused] : state.tensors) {
    if (!known(name)) {
      return absl::InvalidArgumentError(
          absl::StrCat("unexpected state tensor '", name, "'"));
    }
  }
  for (const auto& [name, unused] : state.scalars) {
    if (!known(name)) {
      return absl::InvalidArgumentError(
          absl::StrCat("unexpected state scalar '", name, "'"));
    }
  }
  return absl::OkStatus();
}

}  // namespace natgrad::core::first_order_internal
