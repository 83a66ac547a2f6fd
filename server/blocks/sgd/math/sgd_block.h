// SGD with optional (Nesterov) momentum and L2 weight decay, PyTorch's
// torch.optim.SGD conventions (dampening 0) (docs/math.md):
//   d   = g + wd * w
//   buf = d on the first step, else mu * buf + d
//   delta = -lr * (nesterov ? d + mu * buf : buf)     (-lr * d without
//   momentum)
// Schedules are evaluated at the session's 1-based step t.
#ifndef NATGRAD_SERVER_BLOCKS_SGD_MATH_SGD_BLOCK_H_
#define NATGRAD_SERVER_BLOCKS_SGD_MATH_SGD_BLOCK_H_

#include <cstdint>
#include <memory>
#include <string>
#include <utility>

#include "Eigen/Core"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "server/core/block.h"
#include "server/core/schedule.h"

namespace natgrad::core {

struct SgdOptions {
  // Null means the default: learning rate 1e-2.
  SchedulePtr learning_rate;
  // Null means no momentum (and no momentum buffer held). When set, a buffer
  // is kept from the first step on, even at steps where the value is 0.
  SchedulePtr momentum;
  // Null means 0. A positive value needs params in every step input.
  SchedulePtr weight_decay;
  // Requires a momentum schedule (as PyTorch does).
  bool nesterov = false;
};

// Scalar (float or double) is the precision of the state and the arithmetic.
// Use NewSgdBlock; SgdBlock<Scalar> is public for tests and benchmarks.
template <typename Scalar>
class SgdBlock final : public ParameterBlock {
 public:
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;

  static absl::StatusOr<std::unique_ptr<SgdBlock>> Create(
      std::string name, MatrixShape shape, const SgdOptions& options);

  absl::string_view kind() const override { return "sgd"; }
  // The pending update refers to this block: commit or drop it before the
  // next Propose/ImportState or the block's destruction.
  absl::StatusOr<std::unique_ptr<PendingBlockUpdate>> Propose(
      const BlockStepInput& input, const StepContext& context) override;
  bool MayWaitForEngine(int64_t) const override { return false; }  // no decompositions
  // Scalar "step" (committed steps); tensor "momentum_buffer" once a step
  // with momentum has been committed.
  BlockState ExportState() const override;
  // "momentum_buffer" may be absent (the next step starts it afresh); it is
  // refused when the block has no momentum schedule.
  absl::Status ImportState(const BlockState& state) override;
  int64_t StateBytes() const override;

 private:
  class Update;

  SgdBlock(std::string name, MatrixShape shape, SgdOptions options)
      : ParameterBlock(std::move(name)),
        shape_(shape),
        options_(std::move(options)) {}

  MatrixShape shape_;
  SgdOptions options_;  // learning_rate and weight_decay are never null
  int64_t step_ = 0;
  Matrix buffer_;  // empty until the first committed step with momentum
};

extern template class SgdBlock<float>;
extern template class SgdBlock<double>;

// Validates shape and options (INVALID_ARGUMENT naming the field).
absl::StatusOr<std::unique_ptr<ParameterBlock>> NewSgdBlock(
    std::string name, MatrixShape shape, const SgdOptions& options,
    Precision precision);

}  // namespace natgrad::core

#endif  // NATGRAD_SERVER_BLOCKS_SGD_MATH_SGD_BLOCK_H_
