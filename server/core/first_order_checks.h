// Checks shared by the first-order blocks (internal to first_order/).
#ifndef NATGRAD_SERVER_CORE_FIRST_ORDER_CHECKS_H_
#define NATGRAD_SERVER_CORE_FIRST_ORDER_CHECKS_H_

#include <cstdint>
#include <initializer_list>
#include <string>

#include "Eigen/Core"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "server/core/block.h"
#include "server/core/block_error.h"
#include "server/core/schedule.h"

namespace natgrad::core::first_order_internal {

// rows, cols > 0 and rows * cols representable.
absl::Status CheckShape(absl::string_view kind, MatrixShape shape);

// The step input a first-order block accepts: a finite gradient of the block's
// shape, optional finite params of the same shape, no curvature inputs, and
// a 1-based step.
absl::Status CheckStepInput(const std::string& block, MatrixShape shape,
                            const DenseStepInput& input,
                            const StepContext& context);

// schedule(t), refused unless finite and >= 0 (a negative learning rate or
// decay is a misconfigured schedule, not a request).
absl::StatusOr<double> NonNegativeValue(const Schedule& schedule, int64_t t,
                                        const std::string& block,
                                        absl::string_view param);

// The step's learning rate: the input's override when set, else the schedule.
absl::StatusOr<double> LearningRate(const Schedule& schedule, int64_t t,
                                    const std::string& block,
                                    const DenseStepInput& input);

// CheckCommittable's message for a non-finite value (blocks that check
// finiteness in their own pass give the same one).
inline constexpr absl::string_view kNonFiniteUpdate =
    "would be non-finite (Inf or NaN); step rejected, nothing changed";

// An update or new state a block may commit: every value finite and, when
// the client works in float32 (`reply`), within float32's range, so neither
// the client's parameters nor a checkpoint ever holds Inf or NaN.
template <typename Derived>
absl::Status CheckCommittable(const std::string& block, absl::string_view field,
                              DType reply, const Eigen::MatrixBase<Derived>& m) {
  if (m.size() == 0) return absl::OkStatus();
  if (!m.allFinite()) {
    return InvalidBlockField(block, field, kNonFiniteUpdate);
  }
  if (reply == DType::kFloat32 &&
      static_cast<double>(m.cwiseAbs().maxCoeff()) > 3.4028234663852886e38) {
    return InvalidBlockField(block, field,
                             "would overflow float32; step rejected, nothing changed");
  }
  return absl::OkStatus();
}

// The state tensor `name` must exist with the block's shape and be finite.
absl::StatusOr<const Eigen::MatrixXd*> StateTensor(const BlockState& state,
                                                   absl::string_view name,
                                                   MatrixShape shape);

// The "step" scalar: a finite non-negative integer.
absl::StatusOr<int64_t> StateStep(const BlockState& state);

// Every tensor/scalar name in `state` is one of `allowed`.
absl::Status CheckNoUnknownNames(
    const BlockState& state, std::initializer_list<absl::string_view> allowed);

}  // namespace natgrad::core::first_order_internal

#endif  // NATGRAD_SERVER_CORE_FIRST_ORDER_CHECKS_H_
