#include "server/blocks/shampoo/math/shampoo_block.h"

#include <cmath>
#include <cstdint>
#include <future>
#include <limits>
#include <map>
#include <memory>
#include <string>
#include <utility>

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

// Above this a single factor would not fit any sane memory budget; blocking
// keeps every factor at most max_preconditioner_dim on a side.
constexpr int64_t kMaxPreconditionerDimLimit = 8192;

using mb::SatAdd;
using mb::SatMul;

int64_t InverseRoot(const ShampooOptions& o) {
  return o.inverse_root_override > 0 ? o.inverse_root_override : 4;
}

}  // namespace

template <typename Scalar>
std::vector<std::pair<int64_t, int64_t>> ShampooBlock<Scalar>::Tiles(int64_t size,
                                                                     int64_t max_dim) {
  // Equal blocks of max_dim, the remainder last (Distributed Shampoo's split).
  std::vector<std::pair<int64_t, int64_t>> out;
  for (int64_t begin = 0; begin < size; begin += max_dim) {
    out.emplace_back(begin, std::min(max_dim, size - begin));
  }
  return out;
}

MatrixShape ShampooViewShape(MatrixShape shape, const ShampooOptions& o) {
  return mb::ViewShape(shape, o.view_rows);
}

int64_t ShampooMergedRows(const std::vector<int64_t>& tensor_shape, int64_t max_dim) {
  return mb::MergedViewRows(tensor_shape, max_dim);
}

template <typename Scalar>
typename ShampooBlock<Scalar>::Matrix ShampooBlock<Scalar>::ToView(const Matrix& x) const {
  return mb::Reshape<Scalar>(x, shape_, view_);
}

template <typename Scalar>
typename ShampooBlock<Scalar>::Matrix ShampooBlock<Scalar>::FromView(const Matrix& x) const {
  return mb::Reshape<Scalar>(x, view_, shape_);
}

template <typename Scalar>
class ShampooBlock<Scalar>::Update final : public PendingBlockUpdate {
 public:
  Update(ShampooBlock* block, Matrix delta, Matrix momentum, Matrix second_moment,
         std::vector<Matrix> left, std::vector<Matrix> right,
         std::vector<Matrix> left_root, std::vector<Matrix> right_root, bool refreshed,
         std::map<std::string, double> hyperparameters)
      : block_(block),
        delta_(std::move(delta)),
        momentum_(std::move(momentum)),
        second_moment_(std::move(second_moment)),
        left_(std::move(left)),
        right_(std::move(right)),
        left_root_(std::move(left_root)),
        right_root_(std::move(right_root)),
        refreshed_(refreshed),
        hyperparameters_(std::move(hyperparameters)) {}

  BlockStepOutput Commit(double /*first-order: not KL-clipped*/) override {
    block_->momentum_ = std::move(momentum_);
    block_->second_moment_ = std::move(second_moment_);
    block_->left_ = std::move(left_);
    block_->right_ = std::move(right_);
    if (refreshed_) {
      block_->left_root_ = std::move(left_root_);
      block_->right_root_ = std::move(right_root_);
    }
    ++block_->step_;
    return mb::FirstOrderOutput(delta_, std::move(hyperparameters_));
  }

 private:
  ShampooBlock* block_;
  Matrix delta_, momentum_, second_moment_;
  std::vector<Matrix> left_, right_, left_root_, right_root_;
  bool refreshed_;
  std::map<std::string, double> hyperparameters_;
};

template <typename Scalar>
ShampooBlock<Scalar>::ShampooBlock(std::string name, MatrixShape shape,
                                   ShampooOptions options)
    : ParameterBlock(std::move(name)),
      shape_(shape),
      view_(ShampooViewShape(shape, options)),
      options_(std::move(options)),
      momentum_(Matrix::Zero(view_.rows, view_.cols)) {
  if (HasSecondMoment()) second_moment_ = Matrix::Zero(view_.rows, view_.cols);
  if (diagonal()) return;
  for (auto [r0, rn] : Tiles(view_.rows, options_.max_preconditioner_dim)) {
    for (auto [c0, cn] : Tiles(view_.cols, options_.max_preconditioner_dim)) {
      tiles_.push_back({r0, rn, c0, cn});
      left_.push_back(Matrix::Zero(rn, rn));
      right_.push_back(Matrix::Zero(cn, cn));
    }
  }
}

absl::Status ValidateShampooOptions(MatrixShape shape, const ShampooOptions& o) {
  if (absl::Status s = fo::CheckShape("shampoo", shape); !s.ok()) return s;
  if (absl::Status s = mb::CheckViewRows("shampoo", shape, o.view_rows); !s.ok()) return s;
  if (absl::Status s = mb::CheckUnitInterval("shampoo", {{"beta1", o.beta1},
                                                         {"beta2", o.beta2},
                                                         {"grafting_beta2", o.grafting_beta2}});
      !s.ok()) {
    return s;
  }
  if (absl::Status s = mb::CheckPositiveFinite(
          "shampoo", {{"epsilon", o.epsilon}, {"grafting_epsilon", o.grafting_epsilon}});
      !s.ok()) {
    return s;
  }
  for (auto [param, value] : {std::pair{"precondition_frequency", o.precondition_frequency},
                              std::pair{"start_preconditioning_step",
                                        o.start_preconditioning_step}}) {
    if (absl::Status s = mb::CheckAtLeastOne("shampoo", param, value); !s.ok()) return s;
  }
  if (absl::Status s = mb::CheckInRange("shampoo", "max_preconditioner_dim",
                                        o.max_preconditioner_dim, 1, kMaxPreconditionerDimLimit);
      !s.ok()) {
    return s;
  }
  return mb::CheckInRange("shampoo", "inverse_root_override", o.inverse_root_override, 0, 64);
}

int64_t EstimateShampooStateBytes(MatrixShape parameter_shape, const ShampooOptions& o,
                                  int64_t element_bytes) {
  const MatrixShape shape = ShampooViewShape(parameter_shape, o);
  const int64_t elements = SatMul(shape.rows, shape.cols);
  // momentum and second_moment.
  int64_t total = SatMul(2, elements);
  if (shape.rows > 1 && shape.cols > 1 && o.max_preconditioner_dim > 0) {
    const int64_t d = o.max_preconditioner_dim;
    const int64_t row_tiles = (shape.rows + d - 1) / d, col_tiles = (shape.cols + d - 1) / d;
    // Each tile holds a factor and a root per side; sum over tiles of rn^2 is
    // at most row_tiles * min(rows, d)^2 per column tile.
    const int64_t rn = std::min(shape.rows, d), cn = std::min(shape.cols, d);
    const int64_t per_tile = SatMul(2, SatAdd(SatMul(rn, rn), SatMul(cn, cn)));
    total = SatAdd(total, SatMul(SatMul(row_tiles, col_tiles), per_tile));
  }
  return SatMul(total, element_bytes);
}

template <typename Scalar>
absl::StatusOr<std::unique_ptr<ShampooBlock<Scalar>>> ShampooBlock<Scalar>::Create(
    std::string name, MatrixShape shape, const ShampooOptions& options) {
  if (absl::Status s = ValidateShampooOptions(shape, options); !s.ok()) return s;
  ShampooOptions resolved = options;
  if (resolved.learning_rate == nullptr) resolved.learning_rate = ConstantSchedule(1e-3);
  if (resolved.weight_decay == nullptr) resolved.weight_decay = ConstantSchedule(0.0);
  return std::unique_ptr<ShampooBlock>(
      new ShampooBlock(std::move(name), shape, std::move(resolved)));
}

template <typename Scalar>
bool ShampooBlock<Scalar>::PreconditionsNextStep() const {
  return !diagonal() && step_ + 1 >= options_.start_preconditioning_step;
}

template <typename Scalar>
bool ShampooBlock<Scalar>::RefreshesNextStep() const {
  const int64_t n = step_ + 1;
  return PreconditionsNextStep() &&
         (left_root_.empty() ||
          (n - options_.start_preconditioning_step) % options_.precondition_frequency == 0);
}

template <typename Scalar>
absl::StatusOr<std::unique_ptr<PendingBlockUpdate>> ShampooBlock<Scalar>::Propose(
    const BlockStepInput& step_input, const StepContext& context) {
  absl::StatusOr<const DenseStepInput*> in = InputOf<DenseStepInput>(step_input);
  if (!in.ok()) return in.status();
  const DenseStepInput& input = **in;
  absl::StatusOr<mb::DenseStepRates> rates = mb::CheckDenseStep(
      name(), shape_, input, context, *options_.learning_rate, *options_.weight_decay);
  if (!rates.ok()) return rates.status();
  const double lr = rates->learning_rate, wd = rates->weight_decay;
  const ShampooOptions& o = options_;
  const int64_t n = step_ + 1;
  const bool precondition = PreconditionsNextStep();
  const bool refresh = RefreshesNextStep();
  if (refresh && context.engine == nullptr) {
    return InvalidBlockField(name(), "", "has no inversion engine in the step context");
  }
  // Bias corrections in double from the block's own step count.
  auto correction = [&](double beta) {
    return o.bias_correction ? 1.0 - std::pow(beta, static_cast<double>(n)) : 1.0;
  };

  const Matrix g = ToView(input.gradient.template ToMatrix<Scalar>());
  Matrix m = Scalar(o.beta1) * momentum_ + Scalar(1 - o.beta1) * g;
  const Matrix m_hat = m / Scalar(correction(o.beta1));

  Matrix v;
  Matrix graft;  // the grafted method's direction (or the diagonal one)
  if (diagonal()) {
    v = Scalar(o.beta2) * second_moment_ + Scalar(1 - o.beta2) * g.array().square().matrix();
    const Scalar c2 = Scalar(correction(o.beta2));
    graft = (m_hat.array() * (v.array() / c2 + Scalar(o.epsilon)).rsqrt()).matrix();
  } else if (o.grafting == ShampooGrafting::kAdam) {
    v = Scalar(o.grafting_beta2) * second_moment_ +
        Scalar(1 - o.grafting_beta2) * g.array().square().matrix();
    const Scalar c2 = Scalar(std::sqrt(correction(o.grafting_beta2)));
    graft = (m_hat.array() / (v.array().sqrt() / c2 + Scalar(o.grafting_epsilon))).matrix();
  } else {
    graft = m_hat;
  }

  std::vector<Matrix> left(tiles_.size()), right(tiles_.size());
  for (size_t k = 0; k < tiles_.size(); ++k) {
    const Tile& tl = tiles_[k];
    const auto gt = g.block(tl.row0, tl.col0, tl.rows, tl.cols);
    left[k] = mb::LeftFactorEma(left_[k], gt, o.beta2);
    right[k] = mb::RightFactorEma(right_[k], gt, o.beta2);
  }

  std::vector<Matrix> left_root, right_root;
  if (refresh) {
    // Submit every factor first so the engine can batch them (a blocked
    // layer gives many same-size jobs), then wait.
    const Scalar c2 = Scalar(correction(o.beta2));
    std::vector<engine::DecompositionFuture<Scalar>> futures;
    futures.reserve(2 * tiles_.size());
    for (size_t k = 0; k < tiles_.size(); ++k) {
      futures.push_back(context.engine->Submit(Matrix(left[k] / c2), engine::DecompositionKind::kEigh));
      futures.push_back(context.engine->Submit(Matrix(right[k] / c2), engine::DecompositionKind::kEigh));
    }
    const double exponent = -1.0 / static_cast<double>(InverseRoot(o));
    std::vector<Matrix> roots;
    roots.reserve(futures.size());
    for (size_t i = 0; i < futures.size(); ++i) {
      WaitForEngine(futures[i]);
      absl::StatusOr<engine::Decomposition<Scalar>> d = futures[i].get();
      const int64_t dim = (i % 2 == 0) ? tiles_[i / 2].rows : tiles_[i / 2].cols;
      if (!d.ok() || d->eigenvalues.size() != dim || d->matrix.rows() != dim ||
          d->matrix.cols() != dim) {
        return InvalidBlockField(
            name(), "gradient",
            absl::StrCat("gives a ", i % 2 == 0 ? "left" : "right", " factor of tile ", i / 2,
                         " the engine could not decompose",
                         d.ok() ? "" : absl::StrCat(": ", d.status().message())));
      }
      const auto scale = (d->eigenvalues.array().max(Scalar(0)) + Scalar(o.epsilon))
                             .pow(Scalar(exponent))
                             .matrix();
      roots.push_back(d->matrix * scale.asDiagonal() * d->matrix.transpose());
    }
    for (size_t k = 0; k < tiles_.size(); ++k) {
      left_root.push_back(std::move(roots[2 * k]));
      right_root.push_back(std::move(roots[2 * k + 1]));
    }
  }

  Matrix direction;
  if (!precondition) {
    direction = std::move(graft);
  } else {
    const std::vector<Matrix>& lr_roots = refresh ? left_root : left_root_;
    const std::vector<Matrix>& rr_roots = refresh ? right_root : right_root_;
    direction.resize(view_.rows, view_.cols);
    for (size_t k = 0; k < tiles_.size(); ++k) {
      const Tile& tl = tiles_[k];
      Matrix p = lr_roots[k] * m_hat.block(tl.row0, tl.col0, tl.rows, tl.cols) * rr_roots[k];
      if (o.grafting != ShampooGrafting::kNone) {
        const Scalar pn = p.norm();
        const Scalar an = graft.block(tl.row0, tl.col0, tl.rows, tl.cols).norm();
        p *= pn > Scalar(0) ? an / pn : Scalar(0);
      }
      direction.block(tl.row0, tl.col0, tl.rows, tl.cols) = p;
    }
  }
  Matrix delta = FromView(Scalar(-lr) * direction);
  if (wd > 0) delta -= Scalar(lr * wd) * input.params->template ToMatrix<Scalar>();

  // Finite inputs can still overflow (G G^T, or a double gradient beyond
  // float's range); refuse rather than poison the state.
  bool finite = delta.allFinite() && m.allFinite() && (v.size() == 0 || v.allFinite());
  for (size_t k = 0; finite && k < tiles_.size(); ++k) {
    finite = left[k].allFinite() && right[k].allFinite() &&
             (!refresh || (left_root[k].allFinite() && right_root[k].allFinite()));
  }
  if (!finite) {
    return InvalidBlockField(name(), "gradient",
                             "gives an update that overflows to non-finite values");
  }
  std::map<std::string, double> hyper = {{"learning_rate", lr},
                                         {"weight_decay", wd},
                                         {"beta1", o.beta1},
                                         {"beta2", o.beta2},
                                         {"preconditioned", precondition ? 1.0 : 0.0},
                                         {"refreshed", refresh ? 1.0 : 0.0}};
  return std::make_unique<Update>(this, std::move(delta), std::move(m), std::move(v),
                                  std::move(left), std::move(right), std::move(left_root),
                                  std::move(right_root), refresh, std::move(hyper));
}

template <typename Scalar>
BlockState ShampooBlock<Scalar>::ExportState() const {
  BlockState state;
  state.scalars["step"] = static_cast<double>(step_);
  state.tensors["momentum"] = momentum_.template cast<double>();
  if (HasSecondMoment()) state.tensors["second_moment"] = second_moment_.template cast<double>();
  for (size_t k = 0; k < tiles_.size(); ++k) {
    state.tensors[absl::StrCat("left_factor.", k)] = left_[k].template cast<double>();
    state.tensors[absl::StrCat("right_factor.", k)] = right_[k].template cast<double>();
    if (!left_root_.empty()) {
      state.tensors[absl::StrCat("left_root.", k)] = left_root_[k].template cast<double>();
      state.tensors[absl::StrCat("right_root.", k)] = right_root_[k].template cast<double>();
    }
  }
  return state;
}

template <typename Scalar>
absl::Status ShampooBlock<Scalar>::ImportState(const BlockState& state) {
  // Every name must be one this block exports.
  std::map<std::string, MatrixShape> want = {{"momentum", view_}};
  if (HasSecondMoment()) want["second_moment"] = view_;
  for (size_t k = 0; k < tiles_.size(); ++k) {
    want[absl::StrCat("left_factor.", k)] = {tiles_[k].rows, tiles_[k].rows};
    want[absl::StrCat("right_factor.", k)] = {tiles_[k].cols, tiles_[k].cols};
  }
  const bool has_roots = !tiles_.empty() && state.tensors.count("left_root.0") > 0;
  for (size_t k = 0; has_roots && k < tiles_.size(); ++k) {
    want[absl::StrCat("left_root.", k)] = {tiles_[k].rows, tiles_[k].rows};
    want[absl::StrCat("right_root.", k)] = {tiles_[k].cols, tiles_[k].cols};
  }
  if (absl::Status s = mb::RefuseUnknownScalars(name(), "shampoo", state); !s.ok()) return s;
  if (absl::Status s =
          mb::RefuseUnknownTensors(name(), state, want, "(its tiles or grafting differ)");
      !s.ok()) {
    return s;
  }
  absl::StatusOr<int64_t> step = fo::StateStep(state);
  if (!step.ok()) return mb::StateError(name(), "scalar \"step\"", step.status().message());
  absl::StatusOr<std::map<std::string, Matrix>> read = mb::ReadStateTensors<Scalar>(
      name(), state, want,
      [](const std::string& key, const Eigen::MatrixXd&, const Matrix& cast) -> std::string {
        return key == "second_moment" && cast.minCoeff() < 0 ? "must be >= 0 everywhere" : "";
      });
  if (!read.ok()) return read.status();
  std::map<std::string, Matrix>& got = *read;
  step_ = *step;
  momentum_ = std::move(got["momentum"]);
  if (HasSecondMoment()) second_moment_ = std::move(got["second_moment"]);
  left_root_.clear();
  right_root_.clear();
  for (size_t k = 0; k < tiles_.size(); ++k) {
    left_[k] = std::move(got[absl::StrCat("left_factor.", k)]);
    right_[k] = std::move(got[absl::StrCat("right_factor.", k)]);
    if (has_roots) {
      left_root_.push_back(std::move(got[absl::StrCat("left_root.", k)]));
      right_root_.push_back(std::move(got[absl::StrCat("right_root.", k)]));
    }
  }
  return absl::OkStatus();
}

template <typename Scalar>
int64_t ShampooBlock<Scalar>::StateBytes() const {
  int64_t elements = momentum_.size() + second_moment_.size();
  for (size_t k = 0; k < tiles_.size(); ++k) {
    elements += left_[k].size() + right_[k].size();
    if (!left_root_.empty()) elements += left_root_[k].size() + right_root_[k].size();
  }
  return elements * static_cast<int64_t>(sizeof(Scalar));
}

template class ShampooBlock<float>;
template class ShampooBlock<double>;

absl::StatusOr<std::unique_ptr<ParameterBlock>> NewShampooBlock(
    std::string name, MatrixShape shape, const ShampooOptions& options, Precision precision) {
  return mb::NewBlockOfPrecision<ShampooBlock>(std::move(name), shape, options, precision);
}

}  // namespace natgrad::core
