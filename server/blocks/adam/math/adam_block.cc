#include "server/blocks/adam/math/adam_block.h"

#include <cmath>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "server/blocks/internal/math/matrix_block_helpers.h"
#include "server/core/block_error.h"
#include "server/core/first_order_checks.h"

namespace natgrad::core {

namespace fo = first_order_internal;
namespace mb = matrix_block_internal;

template <typename Scalar>
class AdamBlock<Scalar>::Update final : public PendingBlockUpdate {
 public:
  Update(AdamBlock* block, Matrix delta, Matrix exp_avg, Matrix exp_avg_sq,
         std::map<std::string, double> hyperparameters)
      : block_(block),
        delta_(std::move(delta)),
        exp_avg_(std::move(exp_avg)),
        exp_avg_sq_(std::move(exp_avg_sq)),
        hyperparameters_(std::move(hyperparameters)) {}

  BlockStepOutput Commit(double /*kl_scale: first-order blocks are not
                                 KL-clipped*/) override {
    block_->exp_avg_ = std::move(exp_avg_);
    block_->exp_avg_sq_ = std::move(exp_avg_sq_);
    ++block_->step_;
    return mb::FirstOrderOutput(delta_, std::move(hyperparameters_));
  }

 private:
  AdamBlock* block_;
  Matrix delta_;
  Matrix exp_avg_;
  Matrix exp_avg_sq_;
  std::map<std::string, double> hyperparameters_;
};

template <typename Scalar>
AdamBlock<Scalar>::AdamBlock(std::string name, MatrixShape shape,
                             AdamOptions options)
    : ParameterBlock(std::move(name)),
      shape_(shape),
      options_(std::move(options)),
      exp_avg_(Matrix::Zero(shape.rows, shape.cols)),
      exp_avg_sq_(Matrix::Zero(shape.rows, shape.cols)) {}

absl::Status ValidateAdamOptions(MatrixShape shape, const AdamOptions& options) {
  if (absl::Status s = fo::CheckShape("adam", shape); !s.ok()) return s;
  // Written as !(in range) so NaN fails too.
  for (auto [param, value] :
       {std::pair{"beta1", options.beta1}, std::pair{"beta2", options.beta2}}) {
    if (!(value >= 0.0 && value < 1.0)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "adam block: ", param, " must be in [0, 1), got ", value));
    }
  }
  if (!(options.epsilon > 0.0 && std::isfinite(options.epsilon))) {
    return absl::InvalidArgumentError(
        absl::StrCat("adam block: epsilon must be positive and finite, got ",
                     options.epsilon));
  }
  return absl::OkStatus();
}

template <typename Scalar>
absl::StatusOr<std::unique_ptr<AdamBlock<Scalar>>> AdamBlock<Scalar>::Create(
    std::string name, MatrixShape shape, const AdamOptions& options) {
  if (absl::Status s = ValidateAdamOptions(shape, options); !s.ok()) return s;
  AdamOptions resolved = options;
  if (resolved.learning_rate == nullptr) {
    resolved.learning_rate = ConstantSchedule(1e-3);
  }
  if (resolved.weight_decay == nullptr) {
    resolved.weight_decay = ConstantSchedule(0.0);
  }
  return std::unique_ptr<AdamBlock>(
      new AdamBlock(std::move(name), shape, std::move(resolved)));
}

template <typename Scalar>
absl::StatusOr<std::unique_ptr<PendingBlockUpdate>> AdamBlock<Scalar>::Propose(
    const BlockStepInput& step_input, const StepContext& context) {
  absl::StatusOr<const DenseStepInput*> in = InputOf<DenseStepInput>(step_input);
  if (!in.ok()) return in.status();
  const DenseStepInput& input = **in;
  absl::StatusOr<mb::DenseStepRates> rates = mb::CheckDenseStep(
      name(), shape_, input, context, *options_.learning_rate, *options_.weight_decay);
  if (!rates.ok()) return rates.status();
  const double lr = rates->learning_rate, wd = rates->weight_decay;
  const double b1 = options_.beta1, b2 = options_.beta2;

  Matrix g = input.gradient.template ToMatrix<Scalar>();
  Matrix w;
  if (wd > 0) w = input.params->template ToMatrix<Scalar>();
  if (wd > 0 && !options_.decoupled_weight_decay) g += Scalar(wd) * w;
  Matrix m = Scalar(b1) * exp_avg_ + Scalar(1 - b1) * g;
  Matrix v =
      Scalar(b2) * exp_avg_sq_ + Scalar(1 - b2) * g.array().square().matrix();
  // Bias corrections in double from the block's own step count, as PyTorch
  // does with its per-parameter step.
  const double n = static_cast<double>(step_ + 1);
  const double bias1 = 1 - std::pow(b1, n);
  const double bias2_sqrt = std::sqrt(1 - std::pow(b2, n));
  const Scalar step_size = Scalar(lr / bias1);
  Matrix delta =
      (-step_size * m.array() /
       (v.array().sqrt() / Scalar(bias2_sqrt) + Scalar(options_.epsilon)))
          .matrix();
  if (wd > 0 && options_.decoupled_weight_decay) {
    delta -= Scalar(lr * wd) * w;
  }
  // Finite inputs can still overflow (g^2, or a double gradient beyond
  // float's range); refuse rather than poison the state.
  for (auto [field, matrix, reply] :
       {std::tuple{"delta", &delta, input.gradient.dtype()},
        std::tuple{"exp_avg", &m, DType::kFloat64},
        std::tuple{"exp_avg_sq", &v, DType::kFloat64}}) {
    if (absl::Status s = fo::CheckCommittable(name(), field, reply, *matrix); !s.ok()) return s;
  }
  std::map<std::string, double> hyper = {{"learning_rate", lr},
                                         {"beta1", b1},
                                         {"beta2", b2},
                                         {"weight_decay", wd}};
  return std::make_unique<Update>(this, std::move(delta), std::move(m),
                                  std::move(v), std::move(hyper));
}

template <typename Scalar>
BlockState AdamBlock<Scalar>::ExportState() const {
  BlockState state;
  state.scalars["step"] = static_cast<double>(step_);
  state.tensors["exp_avg"] = exp_avg_.template cast<double>();
  state.tensors["exp_avg_sq"] = exp_avg_sq_.template cast<double>();
  return state;
}

template <typename Scalar>
absl::Status AdamBlock<Scalar>::ImportState(const BlockState& state) {
  if (absl::Status s =
          fo::CheckNoUnknownNames(state, {"step", "exp_avg", "exp_avg_sq"});
      !s.ok()) {
    return s;
  }
  absl::StatusOr<int64_t> step = fo::StateStep(state);
  if (!step.ok()) return step.status();
  absl::StatusOr<const Eigen::MatrixXd*> m =
      fo::StateTensor(state, "exp_avg", shape_);
  if (!m.ok()) return m.status();
  absl::StatusOr<const Eigen::MatrixXd*> v =
      fo::StateTensor(state, "exp_avg_sq", shape_);
  if (!v.ok()) return v.status();
  if ((**v).minCoeff() < 0) {
    return absl::InvalidArgumentError(
        "state tensor 'exp_avg_sq' must be >= 0 everywhere");
  }
  Matrix new_m = (*m)->template cast<Scalar>();
  Matrix new_v = (*v)->template cast<Scalar>();
  if (!new_m.allFinite() || !new_v.allFinite()) {
    return absl::InvalidArgumentError(
        "state tensors overflow this block's precision");
  }
  step_ = *step;
  exp_avg_ = std::move(new_m);
  exp_avg_sq_ = std::move(new_v);
  return absl::OkStatus();
}

template <typename Scalar>
int64_t AdamBlock<Scalar>::StateBytes() const {
  return static_cast<int64_t>(exp_avg_.size() + exp_avg_sq_.size()) *
         static_cast<int64_t>(sizeof(Scalar));
}

template class AdamBlock<float>;
template class AdamBlock<double>;

absl::StatusOr<std::unique_ptr<ParameterBlock>> NewAdamBlock(
    std::string name, MatrixShape shape, const AdamOptions& options,
    Precision precision) {
  return mb::NewBlockOfPrecision<AdamBlock>(std::move(name), shape, options, precision);
}

}  // namespace natgrad::core
