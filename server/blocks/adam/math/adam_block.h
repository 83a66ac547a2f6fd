// Adam / AdamW, PyTorch's torch.optim.Adam and AdamW conventions
// (docs/math.md). With n the block's own committed-step count plus one:
//   g  = grad + wd * w                  (L2, only when not decoupled)
//   m  = b1 m + (1 - b1) g,  v = b2 v + (1 - b2) g^2
//   delta = -(lr / (1 - b1^n)) * m / (sqrt(v) / sqrt(1 - b2^n) + eps)
//           - lr * wd * w               (AdamW, only when decoupled)
// Schedules are evaluated at the session's 1-based step t.
#ifndef NATGRAD_SERVER_BLOCKS_ADAM_MATH_ADAM_BLOCK_H_
#define NATGRAD_SERVER_BLOCKS_ADAM_MATH_ADAM_BLOCK_H_

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

struct AdamOptions {
  // Null means the default: learning rate 1e-3.
  SchedulePtr learning_rate;
  // Null means 0. A positive value needs params in every step input.
  SchedulePtr weight_decay;
  // Taken as given: beta1, beta2 in [0, 1), epsilon > 0. (The wire's
  // "0 means default" is resolved before here.)
  double beta1 = 0.9;
  double beta2 = 0.999;
  double epsilon = 1e-8;
  // AdamW: decay w outside the adaptive scaling instead of adding wd * w to g.
  bool decoupled_weight_decay = false;
};

// Scalar (float or double) is the precision of the state and the arithmetic.
template <typename Scalar>
class AdamBlock final : public ParameterBlock {
 public:
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;

  static absl::StatusOr<std::unique_ptr<AdamBlock>> Create(
      std::string name, MatrixShape shape, const AdamOptions& options);

  absl::string_view kind() const override { return "adam"; }
  // The pending update refers to this block: commit or drop it before the
  // next Propose/ImportState or the block's destruction.
  absl::StatusOr<std::unique_ptr<PendingBlockUpdate>> Propose(
      const BlockStepInput& input, const StepContext& context) override;
  bool MayWaitForEngine(int64_t) const override { return false; }  // no decompositions
  // Tensors "exp_avg", "exp_avg_sq" (zeros before the first step) and
  // scalar "step" (committed steps, drives the bias correction).
  BlockState ExportState() const override;
  // All three are required; exp_avg_sq must be >= 0.
  absl::Status ImportState(const BlockState& state) override;
  int64_t StateBytes() const override;

 private:
  class Update;

  AdamBlock(std::string name, MatrixShape shape, AdamOptions options);

  MatrixShape shape_;
  AdamOptions options_;  // schedules are never null
  int64_t step_ = 0;
  Matrix exp_avg_;
  Matrix exp_avg_sq_;
};

extern template class AdamBlock<float>;
extern template class AdamBlock<double>;

// Checks shape and options without allocating any state.
absl::Status ValidateAdamOptions(MatrixShape shape, const AdamOptions& options);

// Validates shape and options (INVALID_ARGUMENT naming the field).
absl::StatusOr<std::unique_ptr<ParameterBlock>> NewAdamBlock(
    std::string name, MatrixShape shape, const AdamOptions& options,
    Precision precision);

}  // namespace natgrad::core

#endif  // NATGRAD_SERVER_BLOCKS_ADAM_MATH_ADAM_BLOCK_H_
