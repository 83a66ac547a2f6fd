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
