#include "server/blocks/sgd/math/sgd_block.h"

#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "server/core/block_error.h"
#include "server/core/first_order_checks.h"

namespace natgrad::core {

namespace fo = first_order_internal;

namespace {

// -lr * g straight from the received row-major bytes into the reply's, in
// one pass, with the finiteness of the result checked chunk by chunk while
// it is still in cache. The general path copies g into a column-major
// matrix, computes the delta into another, and copies it back out row-major
// (payload_bench: 46 ms of server compute for a 64 MiB step). Elementwise,
// so the bytes are exactly those of that path.
template <typename Scalar>
DenseTensor ScaledGradient(const DenseTensor& g, Scalar a, bool* finite) {
  using Vector = Eigen::Array<Scalar, Eigen::Dynamic, 1>;
  DenseTensor out = DenseTensor::Zeros<Scalar>({g.rows(), g.cols()});
  const Scalar* src = reinterpret_cast<const Scalar*>(g.data());
  Scalar* dst = out.MutableData<Scalar>();
  constexpr int64_t kChunk = 8192;  // 32-64 KiB: checked while in L1/L2
  *finite = true;
  for (int64_t at = 0, n = g.size(); at < n; at += kChunk) {
    const int64_t len = std::min(kChunk, n - at);
    Eigen::Map<Vector> d(dst + at, len);
    d = a * Eigen::Map<const Vector>(src + at, len);
    *finite = *finite && d.allFinite();
  }
  return out;
}

template <typename Scalar>
constexpr DType kDTypeOf = sizeof(Scalar) == 4 ? DType::kFloat32 : DType::kFloat64;

}  // namespace

template <typename Scalar>
class SgdBlock<Scalar>::Update final : public PendingBlockUpdate {
 public:
  Update(SgdBlock* block, Matrix delta, std::optional<Matrix> buffer,
         std::map<std::string, double> hyperparameters)
      : block_(block),
        delta_(std::move(delta)),
        buffer_(std::move(buffer)),
        hyperparameters_(std::move(hyperparameters)) {}
  // The delta already in its reply form (the one-pass path).
  Update(SgdBlock* block, DenseTensor delta, std::map<std::string, double> hyperparameters)
      : block_(block),
        delta_tensor_(std::move(delta)),
        hyperparameters_(std::move(hyperparameters)) {}

  BlockStepOutput Commit(double /*kl_scale: first-order blocks are not
                                 KL-clipped*/) override {
    if (buffer_.has_value()) block_->buffer_ = std::move(*buffer_);
    ++block_->step_;
    BlockStepOutput out;
    out.delta = delta_tensor_.has_value() ? *std::move(delta_tensor_)
                                          : DenseTensor::FromMatrix(delta_);
    out.hyperparameters = std::move(hyperparameters_);
    return out;
  }

 private:
  SgdBlock* block_;
  Matrix delta_;
  std::optional<DenseTensor> delta_tensor_;
  std::optional<Matrix> buffer_;
  std::map<std::string, double> hyperparameters_;
};

template <typename Scalar>
absl::StatusOr<std::unique_ptr<SgdBlock<Scalar>>> SgdBlock<Scalar>::Create(
    std::string name, MatrixShape shape, const SgdOptions& options) {
  if (absl::Status s = fo::CheckShape("sgd", shape); !s.ok()) return s;
  if (options.nesterov && options.momentum == nullptr) {
    return absl::InvalidArgumentError(
        "sgd block: nesterov requires a momentum schedule");
  }
  SgdOptions resolved = options;
  if (resolved.learning_rate == nullptr) {
    resolved.learning_rate = ConstantSchedule(1e-2);
  }
  if (resolved.weight_decay == nullptr) {
    resolved.weight_decay = ConstantSchedule(0.0);
  }
  return std::unique_ptr<SgdBlock>(
      new SgdBlock(std::move(name), shape, std::move(resolved)));
}

template <typename Scalar>
absl::StatusOr<std::unique_ptr<PendingBlockUpdate>> SgdBlock<Scalar>::Propose(
    const BlockStepInput& step_input, const StepContext& context) {
  absl::StatusOr<const DenseStepInput*> in = InputOf<DenseStepInput>(step_input);
  if (!in.ok()) return in.status();
  const DenseStepInput& input = **in;
  if (absl::Status s = fo::CheckStepInput(name(), shape_, input, context);
      !s.ok()) {
    return s;
  }
  const int64_t t = context.step;
  absl::StatusOr<double> lr =
      fo::LearningRate(*options_.learning_rate, t, name(), input);
  if (!lr.ok()) return lr.status();
  absl::StatusOr<double> wd =
      fo::NonNegativeValue(*options_.weight_decay, t, name(), "weight_decay");
  if (!wd.ok()) return wd.status();
  double mu = 0.0;
  if (options_.momentum != nullptr) {
    absl::StatusOr<double> m =
        fo::NonNegativeValue(*options_.momentum, t, name(), "momentum");
    if (!m.ok()) return m.status();
    mu = *m;
    // mu >= 1 makes the buffer grow without bound: refused at every step a
    // schedule reaches it (a constant one is refused by the config).
    if (mu >= 1) {
      return InvalidBlockField(name(), "momentum",
                               absl::StrCat("at step ", t, " must be < 1, schedule gives ", mu));
    }
  }
  if (*wd > 0 && !input.params.has_value()) {
    return InvalidBlockField(name(), "params",
                             "is required when weight_decay > 0");
  }

  std::map<std::string, double> hyper = {
      {"learning_rate", *lr}, {"momentum", mu}, {"weight_decay", *wd}};
  const DType reply = input.gradient.dtype();
  if (options_.momentum == nullptr && *wd == 0 && reply == kDTypeOf<Scalar>) {
    bool finite = false;
    DenseTensor delta = ScaledGradient<Scalar>(input.gradient, -Scalar(*lr), &finite);
    if (!finite) {
      return InvalidBlockField(name(), "delta", fo::kNonFiniteUpdate);
    }
    return std::make_unique<Update>(this, std::move(delta), std::move(hyper));
  }

  Matrix d = input.gradient.template ToMatrix<Scalar>();
  if (*wd > 0) d += Scalar(*wd) * input.params->template ToMatrix<Scalar>();
  std::optional<Matrix> buffer;
  Matrix delta;
  if (options_.momentum != nullptr) {
    buffer = buffer_.size() == 0 ? d : Matrix(Scalar(mu) * buffer_ + d);
    delta = options_.nesterov
                ? Matrix(-Scalar(*lr) * (d + Scalar(mu) * *buffer))
                : Matrix(-Scalar(*lr) * *buffer);
  } else {
    delta = -Scalar(*lr) * d;
  }
  // Finite inputs can still overflow (e.g. a double gradient beyond float's
  // range); refuse rather than poison the state.
  if (absl::Status s = fo::CheckCommittable(name(), "delta", reply, delta); !s.ok()) return s;
  if (buffer.has_value()) {
    if (absl::Status s = fo::CheckCommittable(name(), "momentum_buffer", DType::kFloat64, *buffer);
        !s.ok()) {
      return s;
    }
  }
  return std::make_unique<Update>(this, std::move(delta), std::move(buffer),
                                  std::move(hyper));
}

template <typename Scalar>
BlockState SgdBlock<Scalar>::ExportState() const {
  BlockState state;
  state.scalars["step"] = static_cast<double>(step_);
  if (buffer_.size() != 0) {
    state.tensors["momentum_buffer"] = buffer_.template cast<double>();
  }
  return state;
}

template <typename Scalar>
absl::Status SgdBlock<Scalar>::ImportState(const BlockState& state) {
  absl::Status names =
      options_.momentum != nullptr
          ? fo::CheckNoUnknownNames(state, {"step", "momentum_buffer"})
          : fo::CheckNoUnknownNames(state, {"step"});
  if (!names.ok()) return names;
  absl::StatusOr<int64_t> step = fo::StateStep(state);
  if (!step.ok()) return step.status();
  Matrix buffer;
  if (state.tensors.contains("momentum_buffer")) {
    absl::StatusOr<const Eigen::MatrixXd*> b =
        fo::StateTensor(state, "momentum_buffer", shape_);
    if (!b.ok()) return b.status();
    buffer = (*b)->template cast<Scalar>();
    if (!buffer.allFinite()) {
      return absl::InvalidArgumentError(
          "state tensor 'momentum_buffer' overflows this block's precision");
    }
  }
  step_ = *step;
  buffer_ = std::move(buffer);
  return absl::OkStatus();
}

template <typename Scalar>
int64_t SgdBlock<Scalar>::StateBytes() const {
  return static_cast<int64_t>(buffer_.size()) *
         static_cast<int64_t>(sizeof(Scalar));
}

template class SgdBlock<float>;
template class SgdBlock<double>;

absl::StatusOr<std::unique_ptr<ParameterBlock>> NewSgdBlock(
    std::string name, MatrixShape shape, const SgdOptions& options,
    Precision precision) {
  if (precision == Precision::kFloat64) {
    absl::StatusOr<std::unique_ptr<SgdBlock<double>>> b =
        SgdBlock<double>::Create(std::move(name), shape, options);
    if (!b.ok()) return b.status();
    return std::unique_ptr<ParameterBlock>(std::move(*b));
  }
  absl::StatusOr<std::unique_ptr<SgdBlock<float>>> b =
      SgdBlock<float>::Create(std::move(name), shape, options);
  if (!b.ok()) return b.status();
  return std::unique_ptr<ParameterBlock>(std::move(*b));
}

}  // namespace natgrad::core
