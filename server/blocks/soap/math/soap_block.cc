#include "server/blocks/soap/math/soap_block.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <future>
#include <limits>
#include <map>
#include <memory>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

#include "Eigen/QR"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "server/blocks/internal/math/matrix_block_helpers.h"
#include "server/core/block_error.h"
#include "server/core/engine_wait.h"
#include "server/core/first_order_checks.h"
#include "server/engine/inversion_engine.h"

namespace natgrad::core {

namespace fo = first_order_internal;
namespace mb = matrix_block_internal;

namespace {

// A side larger than this would hold two dense d x d matrices of several
// GiB; the reference's own default (10000) is below it.
constexpr int64_t kMaxPrecondDimLimit = 65536;

using mb::SatAdd;
using mb::SatMul;

bool SideOn(int64_t dim, const SoapOptions& o) { return !o.vector && dim <= o.max_precond_dim; }

// The columns of q ordered by diag(q^T f q) descending (the reference's
// argsort of the estimated eigenvalues); stable so ties keep their order.
template <typename Matrix>
std::vector<int64_t> DescendingOrder(const Matrix& f, const Matrix& q) {
  const auto est = (q.transpose() * f * q).diagonal().eval();
  std::vector<int64_t> idx(est.size());
  std::iota(idx.begin(), idx.end(), 0);
  std::stable_sort(idx.begin(), idx.end(), [&](int64_t a, int64_t b) { return est(a) > est(b); });
  return idx;
}

}  // namespace

MatrixShape SoapViewShape(MatrixShape shape, const SoapOptions& o) {
  return mb::ViewShape(shape, o.view_rows);
}

template <typename Scalar>
typename SoapBlock<Scalar>::Matrix SoapBlock<Scalar>::ToView(const Matrix& x) const {
  return mb::Reshape<Scalar>(x, shape_, view_);
}

template <typename Scalar>
typename SoapBlock<Scalar>::Matrix SoapBlock<Scalar>::FromView(const Matrix& x) const {
  return mb::Reshape<Scalar>(x, view_, shape_);
}

template <typename Scalar>
typename SoapBlock<Scalar>::Matrix SoapBlock<Scalar>::Project(const Matrix& x, const Matrix& ql,
                                                              const Matrix& qr) const {
  Matrix y = left_on_ ? Matrix(ql.transpose() * x) : x;
  return right_on_ ? Matrix(y * qr) : y;
}

template <typename Scalar>
typename SoapBlock<Scalar>::Matrix SoapBlock<Scalar>::ProjectBack(const Matrix& x, const Matrix& ql,
                                                                  const Matrix& qr) const {
  Matrix y = left_on_ ? Matrix(ql * x) : x;
  return right_on_ ? Matrix(y * qr.transpose()) : y;
}

template <typename Scalar>
class SoapBlock<Scalar>::Update final : public PendingBlockUpdate {
 public:
  Update(SoapBlock* block, Matrix delta, Matrix exp_avg, Matrix exp_avg_sq, Matrix left,
         Matrix right, Matrix left_basis, Matrix right_basis,
         std::map<std::string, double> hyperparameters)
      : block_(block),
        delta_(std::move(delta)),
        exp_avg_(std::move(exp_avg)),
        exp_avg_sq_(std::move(exp_avg_sq)),
        left_(std::move(left)),
        right_(std::move(right)),
        left_basis_(std::move(left_basis)),
        right_basis_(std::move(right_basis)),
        hyperparameters_(std::move(hyperparameters)) {}

  BlockStepOutput Commit(double /*first-order: not KL-clipped*/) override {
    block_->exp_avg_ = std::move(exp_avg_);
    block_->exp_avg_sq_ = std::move(exp_avg_sq_);
    block_->left_ = std::move(left_);
    block_->right_ = std::move(right_);
    block_->left_basis_ = std::move(left_basis_);
    block_->right_basis_ = std::move(right_basis_);
    ++block_->step_;
    return mb::FirstOrderOutput(delta_, std::move(hyperparameters_));
  }

 private:
  SoapBlock* block_;
  Matrix delta_, exp_avg_, exp_avg_sq_, left_, right_, left_basis_, right_basis_;
  std::map<std::string, double> hyperparameters_;
};

template <typename Scalar>
SoapBlock<Scalar>::SoapBlock(std::string name, MatrixShape shape, SoapOptions options)
    : ParameterBlock(std::move(name)),
      shape_(shape),
      view_(SoapViewShape(shape, options)),
      options_(std::move(options)),
      left_on_(SideOn(view_.rows, options_)),
      right_on_(SideOn(view_.cols, options_)),
      exp_avg_(Matrix::Zero(view_.rows, view_.cols)),
      exp_avg_sq_(Matrix::Zero(view_.rows, view_.cols)) {
  if (left_on_) left_ = Matrix::Zero(view_.rows, view_.rows);
  if (right_on_) right_ = Matrix::Zero(view_.cols, view_.cols);
}

absl::Status ValidateSoapOptions(MatrixShape shape, const SoapOptions& o) {
  if (absl::Status s = fo::CheckShape("soap", shape); !s.ok()) return s;
  if (absl::Status s = mb::CheckViewRows("soap", shape, o.view_rows); !s.ok()) return s;
  if (absl::Status s = mb::CheckUnitInterval(
          "soap", {{"beta1", o.beta1}, {"beta2", o.beta2}, {"shampoo_beta", o.shampoo_beta}});
      !s.ok()) {
    return s;
  }
  if (absl::Status s = mb::CheckPositiveFinite("soap", {{"epsilon", o.epsilon}}); !s.ok()) return s;
  if (absl::Status s = mb::CheckAtLeastOne("soap", "precondition_frequency",
                                           o.precondition_frequency);
      !s.ok()) {
    return s;
  }
  return mb::CheckInRange("soap", "max_precond_dim", o.max_precond_dim, 1, kMaxPrecondDimLimit);
}

int64_t EstimateSoapStateBytes(MatrixShape parameter_shape, const SoapOptions& o,
                               int64_t element_bytes) {
  const MatrixShape shape = SoapViewShape(parameter_shape, o);
  // exp_avg and exp_avg_sq, then a factor and a basis per preconditioned side.
  int64_t total = SatMul(2, SatMul(shape.rows, shape.cols));
  for (int64_t d : {shape.rows, shape.cols}) {
    if (SideOn(d, o)) total = SatAdd(total, SatMul(2, SatMul(d, d)));
  }
  return SatMul(total, element_bytes);
}

template <typename Scalar>
absl::StatusOr<std::unique_ptr<SoapBlock<Scalar>>> SoapBlock<Scalar>::Create(
    std::string name, MatrixShape shape, const SoapOptions& options) {
  if (absl::Status s = ValidateSoapOptions(shape, options); !s.ok()) return s;
  SoapOptions resolved = options;
  if (resolved.learning_rate == nullptr) resolved.learning_rate = ConstantSchedule(3e-3);
  if (resolved.weight_decay == nullptr) resolved.weight_decay = ConstantSchedule(0.01);
  return std::unique_ptr<SoapBlock>(new SoapBlock(std::move(name), shape, std::move(resolved)));
}

template <typename Scalar>
bool SoapBlock<Scalar>::RefreshesNextStep() const {
  // step_: the reference's state["step"] after its increment (first step: 0).
  return step_ != 0 && step_ % options_.precondition_frequency == 0;
}

template <typename Scalar>
bool SoapBlock<Scalar>::UsesEngineNextStep() const {
  return (left_on_ || right_on_) &&
         (step_ == 0 || (RefreshesNextStep() && options_.refresh == SoapRefresh::kEigh));
}

template <typename Scalar>
absl::StatusOr<std::unique_ptr<PendingBlockUpdate>> SoapBlock<Scalar>::Propose(
    const BlockStepInput& step_input, const StepContext& context) {
  absl::StatusOr<const DenseStepInput*> in = InputOf<DenseStepInput>(step_input);
  if (!in.ok()) return in.status();
  const DenseStepInput& input = **in;
  absl::StatusOr<mb::DenseStepRates> rates = mb::CheckDenseStep(
      name(), shape_, input, context, *options_.learning_rate, *options_.weight_decay);
  if (!rates.ok()) return rates.status();
  const double lr = rates->learning_rate, wd = rates->weight_decay;
  const SoapOptions& o = options_;
  const bool first = step_ == 0;
  // k: the reference's state["step"] after its increment (first step: 0).
  const int64_t k = step_;
  const bool refresh = RefreshesNextStep();
  const bool use_engine = UsesEngineNextStep();
  if (use_engine && context.engine == nullptr) {
    return InvalidBlockField(name(), "", "has no inversion engine in the step context");
  }

  const Matrix g = ToView(input.gradient.template ToMatrix<Scalar>());
  Matrix left, right;
  if (left_on_) left = mb::LeftFactorEma(left_, g, o.shampoo_beta);
  if (right_on_) right = mb::RightFactorEma(right_, g, o.shampoo_beta);

  Matrix m = exp_avg_, v = exp_avg_sq_;
  Matrix delta = Matrix::Zero(shape_.rows, shape_.cols);
  Matrix ql = left_basis_, qr = right_basis_;
  if (!first) {
    const Matrix gp = Project(g, ql, qr);
    m = Scalar(o.beta1) * m + Scalar(1 - o.beta1) * gp;
    v = Scalar(o.beta2) * v + Scalar(1 - o.beta2) * gp.array().square().matrix();
    const Matrix normalized = (m.array() / (v.array().sqrt() + Scalar(o.epsilon))).matrix();
    double step_size = lr;
    if (o.bias_correction) {
      const double kd = static_cast<double>(k);
      step_size *= std::sqrt(1.0 - std::pow(o.beta2, kd)) / (1.0 - std::pow(o.beta1, kd));
    }
    delta = FromView(Scalar(-step_size) * ProjectBack(normalized, ql, qr));
    // The reference decays the parameter after the step: p -= lr wd p.
    if (wd > 0) {
      delta -= Scalar(lr * wd) * (input.params->template ToMatrix<Scalar>() + delta);
    }
  }

  // New bases: both sides of the first step or a kEigh refresh through the
  // engine (submitted together so they batch), a kPowerQr refresh here.
  std::vector<std::pair<bool, engine::DecompositionFuture<Scalar>>> futures;
  if (refresh) {
    // m goes back to the original space for the basis change; v is only
    // permuted with the sorted columns (both as the reference).
    const Matrix m_orig = ProjectBack(m, ql, qr);
    if (left_on_) {
      const std::vector<int64_t> idx = DescendingOrder(left, ql);
      Matrix sorted(ql.rows(), ql.cols()), vs(v.rows(), v.cols());
      for (size_t i = 0; i < idx.size(); ++i) {
        sorted.col(i) = ql.col(idx[i]);
        vs.row(i) = v.row(idx[i]);
      }
      v = std::move(vs);
      ql = std::move(sorted);
    }
    if (right_on_) {
      const std::vector<int64_t> idx = DescendingOrder(right, qr);
      Matrix sorted(qr.rows(), qr.cols()), vs(v.rows(), v.cols());
      for (size_t i = 0; i < idx.size(); ++i) {
        sorted.col(i) = qr.col(idx[i]);
        vs.col(i) = v.col(idx[i]);
      }
      v = std::move(vs);
      qr = std::move(sorted);
    }
    if (o.refresh == SoapRefresh::kPowerQr) {
      // The engine decomposes only symmetric PSD matrices; L Q is neither, so
      // its (cheap, Householder) QR stays here.
      if (left_on_) ql = Eigen::HouseholderQR<Matrix>(Matrix(left * ql)).householderQ();
      if (right_on_) qr = Eigen::HouseholderQR<Matrix>(Matrix(right * qr)).householderQ();
    }
    m = m_orig;  // re-projected below, once the new bases are known
  }
  if (use_engine) {
    if (left_on_)
      futures.emplace_back(true, context.engine->Submit(left, engine::DecompositionKind::kEigh));
    if (right_on_)
      futures.emplace_back(false, context.engine->Submit(right, engine::DecompositionKind::kEigh));
    for (auto& [is_left, future] : futures) {
      WaitForEngine(future);
      absl::StatusOr<engine::Decomposition<Scalar>> d = future.get();
      const int64_t dim = is_left ? view_.rows : view_.cols;
      if (!d.ok() || d->matrix.rows() != dim || d->matrix.cols() != dim) {
        return InvalidBlockField(
            name(), "gradient",
            absl::StrCat("gives a ", is_left ? "left" : "right",
                         " factor the engine could not decompose",
                         d.ok() ? "" : absl::StrCat(": ", d.status().message())));
      }
      // The engine's eigenvalues ascend; the reference flips to descending.
      (is_left ? ql : qr) = d->matrix.rowwise().reverse();
    }
  }
  if (refresh) m = Project(m, ql, qr);

  // Finite inputs can still overflow (G G^T, or a double gradient beyond
  // float's range); refuse rather than poison the state.
  const bool finite = delta.allFinite() && m.allFinite() && v.allFinite() && left.allFinite() &&
                      right.allFinite() && ql.allFinite() && qr.allFinite();
  if (!finite) {
    return InvalidBlockField(name(), "gradient",
                             "gives an update that overflows to non-finite values");
  }
  std::map<std::string, double> hyper = {{"learning_rate", lr},
                                         {"weight_decay", wd},
                                         {"beta1", o.beta1},
                                         {"beta2", o.beta2},
                                         {"shampoo_beta", o.shampoo_beta},
                                         {"preconditioned", first ? 0.0 : 1.0},
                                         {"refreshed", (first || refresh) ? 1.0 : 0.0}};
  return std::make_unique<Update>(this, std::move(delta), std::move(m), std::move(v),
                                  std::move(left), std::move(right), std::move(ql), std::move(qr),
                                  std::move(hyper));
}

template <typename Scalar>
BlockState SoapBlock<Scalar>::ExportState() const {
  BlockState state;
  state.scalars["step"] = static_cast<double>(step_);
  state.tensors["exp_avg"] = exp_avg_.template cast<double>();
  state.tensors["exp_avg_sq"] = exp_avg_sq_.template cast<double>();
  if (left_on_) state.tensors["left_factor"] = left_.template cast<double>();
  if (right_on_) state.tensors["right_factor"] = right_.template cast<double>();
  if (step_ > 0 && left_on_) state.tensors["left_basis"] = left_basis_.template cast<double>();
  if (step_ > 0 && right_on_) state.tensors["right_basis"] = right_basis_.template cast<double>();
  return state;
}

template <typename Scalar>
absl::Status SoapBlock<Scalar>::ImportState(const BlockState& state) {
  if (absl::Status s = mb::RefuseUnknownScalars(name(), "soap", state); !s.ok()) return s;
  absl::StatusOr<int64_t> step = fo::StateStep(state);
  if (!step.ok()) return mb::StateError(name(), "scalar \"step\"", step.status().message());
  // Every name must be one this block exports at that step.
  std::map<std::string, MatrixShape> want = {{"exp_avg", view_}, {"exp_avg_sq", view_}};
  if (left_on_) want["left_factor"] = {view_.rows, view_.rows};
  if (right_on_) want["right_factor"] = {view_.cols, view_.cols};
  if (*step > 0 && left_on_) want["left_basis"] = {view_.rows, view_.rows};
  if (*step > 0 && right_on_) want["right_basis"] = {view_.cols, view_.cols};
  if (absl::Status s = mb::RefuseUnknownTensors(
          name(), state, want, "at this step (its shape, max_precond_dim or step differ)");
      !s.ok()) {
    return s;
  }
  absl::StatusOr<std::map<std::string, Matrix>> read = mb::ReadStateTensors<Scalar>(
      name(), state, want,
      [](const std::string& key, const Eigen::MatrixXd& x, const Matrix& cast) -> std::string {
        if (key == "exp_avg_sq" && cast.minCoeff() < 0) return "must be >= 0 everywhere";
        if (key == "left_basis" || key == "right_basis") {
          // Loose enough for a float32 basis read into float64.
          const Eigen::MatrixXd gram = x.transpose() * x;
          if ((gram - Eigen::MatrixXd::Identity(gram.rows(), gram.cols())).cwiseAbs().maxCoeff() >
              1e-3) {
            return "must be orthogonal";
          }
        }
        return "";
      });
  if (!read.ok()) return read.status();
  std::map<std::string, Matrix>& got = *read;
  step_ = *step;
  exp_avg_ = std::move(got["exp_avg"]);
  exp_avg_sq_ = std::move(got["exp_avg_sq"]);
  left_ = left_on_ ? std::move(got["left_factor"]) : Matrix();
  right_ = right_on_ ? std::move(got["right_factor"]) : Matrix();
  left_basis_ = (step_ > 0 && left_on_) ? std::move(got["left_basis"]) : Matrix();
  right_basis_ = (step_ > 0 && right_on_) ? std::move(got["right_basis"]) : Matrix();
  return absl::OkStatus();
}

template <typename Scalar>
int64_t SoapBlock<Scalar>::StateBytes() const {
  const int64_t elements = exp_avg_.size() + exp_avg_sq_.size() + left_.size() + right_.size() +
                           left_basis_.size() + right_basis_.size();
  return elements * static_cast<int64_t>(sizeof(Scalar));
}

template class SoapBlock<float>;
template class SoapBlock<double>;

absl::StatusOr<std::unique_ptr<ParameterBlock>> NewSoapBlock(std::string name, MatrixShape shape,
                                                             const SoapOptions& options,
                                                             Precision precision) {
  return mb::NewBlockOfPrecision<SoapBlock>(std::move(name), shape, options, precision);
}

}  // namespace natgrad::core
