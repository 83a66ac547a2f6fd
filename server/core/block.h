// The interface every parameter-block kind implements (kfac-jax style: one
// block kind per class behind one interface). Pure math: no gRPC, no protobuf.
#ifndef NATGRAD_SERVER_CORE_BLOCK_H_
#define NATGRAD_SERVER_CORE_BLOCK_H_

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "Eigen/Core"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace natgrad::engine {
class InversionEngine;
}  // namespace natgrad::engine
namespace natgrad::linalg {
class ComputePool;
}  // namespace natgrad::linalg

namespace natgrad::core {

// Precision of a block's state and arithmetic (session option).
enum class Precision { kFloat32, kFloat64 };

// A parameter as the block sees it: rows x cols (a 1-D parameter of n values
// is n x 1; higher ranks are [shape[0], prod(rest)]).
struct MatrixShape {
  int64_t rows = 0;
  int64_t cols = 0;
};

// K-FAC curvature statistics for one step (DESIGN.md §4.1). Exactly one of
// the raw or reduced forms is set.
struct KfacStatisticsInput {
  enum class Form { kRaw, kReduced };
  Form form = Form::kRaw;
  // kRaw: per-example layer inputs (rows x d_in, without the bias column) and
  // per-example output gradients (rows x d_out).
  Eigen::MatrixXd activations;
  Eigen::MatrixXd output_gradients;
  // kReduced: A = a_bar^T a_bar / n (bias included) and G = g^T g / n.
  Eigen::MatrixXd a_factor;
  Eigen::MatrixXd g_factor;
  int64_t num_examples = 0;
};

// A Gaussian block's step input (DESIGN.md §4.2): one entry per copy.
struct GaussianStepInputData {
  enum class GradientSpace { kExpectation, kParametrization };
  std::vector<Eigen::VectorXd> param1;  // [copies][dim]
  std::vector<Eigen::MatrixXd> param2;  // [copies][dim x dim]
  std::vector<Eigen::VectorXd> grad1;
  std::vector<Eigen::MatrixXd> grad2;
  GradientSpace gradient_space = GradientSpace::kExpectation;
};

struct GaussianStepOutputData {
  std::vector<Eigen::VectorXd> param1;
  std::vector<Eigen::MatrixXd> param2;
  std::vector<Eigen::VectorXd> delta1;
  std::vector<Eigen::MatrixXd> delta2;
  std::vector<Eigen::VectorXd> direction1;  // empty unless requested
  std::vector<Eigen::MatrixXd> direction2;
  double gamma_used = 0;
  int halvings = 0;
};

// What the client sent for one block in one step, decoded and shape-checked
// against the wire format only; blocks validate the rest.
struct BlockStepInput {
  // dL/dW of the mean loss as a matrix (a 1-D parameter is n x 1; higher
  // ranks are flattened to [shape[0], prod(rest)]). Empty for Gaussian blocks.
  Eigen::MatrixXd gradient;
  std::optional<Eigen::MatrixXd> params;
  std::optional<KfacStatisticsInput> kfac;
  std::optional<GaussianStepInputData> gaussian;
};

// Step-wide facts every block sees.
struct StepContext {
  int64_t step = 0;  // 1-based
  std::optional<double> loss;
  // Session-wide damping from Levenberg-Marquardt adaptation; when set it
  // replaces the blocks' damping schedules.
  std::optional<double> damping_override;
  // Decompositions go through the server's engine; never null in a session.
  engine::InversionEngine* engine = nullptr;
  // Threads for the block math's data-parallel parts (large product panels,
  // per-copy work); nullptr runs them on the calling thread. The server's
  // one pool in a session (server/linalg/thread_policy.h).
  linalg::ComputePool* compute_pool = nullptr;
};

struct BlockStepOutput {
  Eigen::MatrixXd delta;  // the client does w += delta
  std::map<std::string, double> hyperparameters;
  std::optional<GaussianStepOutputData> gaussian;
  int64_t inversion_micros = 0;
};

// A block's whole optimizer state as named matrices and scalars, for
// checkpoints and export. Float32 state is widened to double, which is exact.
struct BlockState {
  std::map<std::string, Eigen::MatrixXd> tensors;
  std::map<std::string, double> scalars;
};

// The result of validating and computing one block's step without touching
// the block's state. Commit applies it; dropping it leaves the block as it was.
class PendingBlockUpdate {
 public:
  virtual ~PendingBlockUpdate() = default;

  // Whether this update takes part in the session's KL clipping (K-FAC).
  virtual bool clipped_by_kl() const { return false; }
  // lr^2 <V, grad> for the KL-clip sum (DESIGN.md §4.1); 0 when not clipped.
  virtual double KlTerm() const { return 0.0; }
  // Predicted change of the loss under the local quadratic model, for
  // Levenberg-Marquardt damping: grad.delta + 1/2 delta^T (F + lambda) delta,
  // evaluated for the update that Commit(kl_scale) makes. 0 when the block
  // has no curvature model.
  virtual double PredictedReduction(double kl_scale) const {
    (void)kl_scale;
    return 0.0;
  }

  // Applies the update to the block's state. Cannot fail.
  virtual BlockStepOutput Commit(double kl_scale) = 0;
};

class ParameterBlock {
 public:
  virtual ~ParameterBlock() = default;

  virtual absl::string_view kind() const = 0;
  const std::string& name() const { return name_; }

  // Validates `input` (errors are INVALID_ARGUMENT naming the field) and
  // computes the proposed update. Never changes the block.
  virtual absl::StatusOr<std::unique_ptr<PendingBlockUpdate>> Propose(
      const BlockStepInput& input, const StepContext& context) = 0;

  virtual BlockState ExportState() const = 0;
  // Replaces the state; validates shapes and finiteness first.
  virtual absl::Status ImportState(const BlockState& state) = 0;

  // Bytes of optimizer state held (factors, decompositions, buffers).
  virtual int64_t StateBytes() const = 0;

 protected:
  explicit ParameterBlock(std::string name) : name_(std::move(name)) {}

 private:
  std::string name_;
};

}  // namespace natgrad::core

#endif  // NATGRAD_SERVER_CORE_BLOCK_H_
