// The interface every parameter-block kind implements (kfac-jax style: one
// block kind per class behind one interface). Pure math: no gRPC, no
// protobuf. Each kind takes its own input type and may return its own output
// type (the variants below); a kind is added by one alternative here plus its
// directory under server/blocks/ (docs/architecture.md).
#ifndef NATGRAD_SERVER_CORE_BLOCK_H_
#define NATGRAD_SERVER_CORE_BLOCK_H_

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <variant>
#include <vector>

#include "Eigen/Core"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "server/core/dense_tensor.h"

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

// What a first-order block (sgd, adam) takes for one step: dL/dW of the mean
// loss as a matrix of the block's shape, and W itself when weight decay needs it.
struct DenseStepInput {
  DenseTensor gradient;
  std::optional<DenseTensor> params;
  // Replaces the learning-rate schedule for this step (client-side scheduler).
  std::optional<double> learning_rate;
};

// K-FAC curvature statistics for one step (docs/architecture.md, K-FAC).
// Exactly one of the raw or reduced forms is set.
struct KfacStatisticsInput {
  enum class Form { kRaw, kReduced };
  Form form = Form::kRaw;
  // kRaw: per-example layer inputs (rows x d_in, without the bias column) and
  // per-example output gradients (rows x d_out).
  DenseTensor activations;
  DenseTensor output_gradients;
  // kReduced: A = a_bar^T a_bar / n (bias included) and G = g^T g / (n T).
  DenseTensor a_factor;
  DenseTensor g_factor;
  int64_t num_examples = 0;
  // kRaw: spatial locations of this step (rows = n*T); 0: the block's own.
  int64_t locations = 0;
};

// A K-FAC block's step: the dense parts plus the layer statistics (required
// on statistics steps).
struct KfacStepInput : DenseStepInput {
  std::optional<KfacStatisticsInput> kfac;
};

// The likelihood part of a full Gaussian block's gradient from
// reparameterised samples z_s = m + L eps_s (docs/math.md, "Compositional
// gradients"): one entry per copy.
struct GaussianCompositionalInput {
  enum class FisherForm { kFull, kDiagonal, kShared };
  FisherForm fisher_form = FisherForm::kFull;
  std::vector<Eigen::MatrixXd> samples;               // [copies][S x dim], eps_s as rows
  std::vector<Eigen::MatrixXd> likelihood_gradients;  // [copies][S x dim]
  // Per copy: kFull (S*dim) x dim, F_s in rows s*dim .. s*dim+dim-1;
  // kDiagonal S x dim; kShared dim x dim.
  std::vector<Eigen::MatrixXd> likelihood_fisher;
};

// A Gaussian block's step input: one entry per copy.
struct GaussianStepInput {
  enum class GradientSpace { kExpectation, kParametrization };
  std::vector<Eigen::VectorXd> param1;  // [copies][dim]
  std::vector<Eigen::MatrixXd> param2;  // [copies][dim x dim]
  // With `compositional`, the gradient of the rest of the objective.
  std::vector<Eigen::VectorXd> grad1;
  std::vector<Eigen::MatrixXd> grad2;
  GradientSpace gradient_space = GradientSpace::kExpectation;
  std::optional<GaussianCompositionalInput> compositional;
};

// A diagonal (mean-field) Gaussian block's step input: four [copies, dim]
// tensors, read elementwise in the block's precision.
struct GaussianDiagStepInput {
  DenseTensor param1, param2, grad1, grad2;
  GaussianStepInput::GradientSpace gradient_space =
      GaussianStepInput::GradientSpace::kExpectation;
};

// What one block receives in one step, by kind.
using BlockStepInput =
    std::variant<DenseStepInput, KfacStepInput, GaussianStepInput, GaussianDiagStepInput>;

struct GaussianStepOutput {
  std::vector<Eigen::VectorXd> param1;
  std::vector<Eigen::MatrixXd> param2;
  std::vector<Eigen::VectorXd> delta1;
  std::vector<Eigen::MatrixXd> delta2;
  std::vector<Eigen::VectorXd> direction1;  // empty unless requested
  std::vector<Eigen::MatrixXd> direction2;
  double gamma_used = 0;
  int halvings = 0;
};

// The diagonal Gaussian's results, [copies, dim] each in the block's
// precision (direction tensors empty unless requested).
struct GaussianDiagStepOutput {
  DenseTensor param1, param2, delta1, delta2, direction1, direction2;
  double gamma_used = 0;
  int halvings = 0;
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
  // The client does w += delta. [rows, cols] row-major in the block's own
  // precision (DenseTensor::FromMatrix), so a float32 block's delta reaches the
  // wire bytes without a float64 detour. Empty for kinds whose result is not a
  // delta of the block's shape (gaussian: see kind_output).
  DenseTensor delta;
  std::map<std::string, double> hyperparameters;
  // Kind-specific results beyond the delta.
  std::variant<std::monostate, GaussianStepOutput, GaussianDiagStepOutput> kind_output;
  int64_t inversion_micros = 0;
};

// A block's whole optimizer state as named matrices and scalars, for
// checkpoints and export. Float32 state is widened to double, which is exact.
struct BlockState {
  std::map<std::string, Eigen::MatrixXd> tensors;
  std::map<std::string, double> scalars;
};

// The narrow view of a proposed update that session-wide curvature
// transforms (KL clipping, Levenberg-Marquardt damping) need. Blocks with a
// local quadratic model of the loss implement it.
class CurvatureModel {
 public:
  virtual ~CurvatureModel() = default;
  // lr^2 <V, grad>, this update's term in the KL-clip sum.
  virtual double KlTerm() const = 0;
  // grad.delta + 1/2 delta^T (F + lambda) delta for the update that
  // Commit(scale) makes.
  virtual double PredictedReduction(double scale) const = 0;
};

// The result of validating and computing one block's step without touching
// the block's state; it holds everything Commit installs. Commit applies it;
// dropping it leaves the block as it was.
class PendingBlockUpdate {
 public:
  virtual ~PendingBlockUpdate() = default;

  // Non-null when the update takes part in the session's curvature
  // transforms; valid until Commit.
  virtual const CurvatureModel* curvature() const { return nullptr; }

  // Applies the update, scaled by `scale` (KL clipping's nu; 1 for blocks
  // without a curvature model). Cannot fail.
  virtual BlockStepOutput Commit(double scale) = 0;
};

class ParameterBlock {
 public:
  virtual ~ParameterBlock() = default;

  virtual absl::string_view kind() const = 0;
  const std::string& name() const { return name_; }

  // Validates `input` (INVALID_ARGUMENT naming block and field, block_error.h)
  // and computes the proposed update. Never changes the block.
  virtual absl::StatusOr<std::unique_ptr<PendingBlockUpdate>> Propose(
      const BlockStepInput& input, const StepContext& context) = 0;
  // Whether Propose at `step` may block on the inversion engine. A session
  // proposes the blocks that will not side by side on the compute pool, and
  // those that may on the step's own thread, whose engine waits give its
  // worker slot to another step (engine_wait.h); a pool thread would just
  // block. True unless a kind knows better.
  virtual bool MayWaitForEngine(int64_t step) const { return true; }

  virtual BlockState ExportState() const = 0;
  // Replaces the state; validates shapes and finiteness first.
  virtual absl::Status ImportState(const BlockState& state) = 0;

  // Bytes of optimizer state held (factors, decompositions, buffers).
  virtual int64_t StateBytes() const = 0;

 protected:
  explicit ParameterBlock(std::string name) : name_(std::move(name)) {}

  // The input alternative this kind takes, or an error naming the kind.
  template <typename Input>
  absl::StatusOr<const Input*> InputOf(const BlockStepInput& input) const {
    if (const Input* in = std::get_if<Input>(&input)) return in;
    return absl::InvalidArgumentError(absl::StrCat(
        "block \"", name_, "\": the step input is not for a ", kind(), " block"));
  }

 private:
  std::string name_;
};

}  // namespace natgrad::core

#endif  // NATGRAD_SERVER_CORE_BLOCK_H_
