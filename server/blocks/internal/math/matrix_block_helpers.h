// Pieces shared by the math of the dense-gradient block kinds, mostly those
// that precondition a parameter's matrix view with Kronecker factors
// (shampoo, soap): the view of a reshaped parameter, the factor EMA, the
// step's checks and rates, option and state checks. Header only and pure
// (Eigen, Abseil, core types), so every kind's math target can use it
// without a new link and the math walls still hold.
#ifndef NATGRAD_SERVER_BLOCKS_INTERNAL_MATH_MATRIX_BLOCK_HELPERS_H_
#define NATGRAD_SERVER_BLOCKS_INTERNAL_MATH_MATRIX_BLOCK_HELPERS_H_

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "Eigen/Core"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "server/core/block.h"
#include "server/core/block_error.h"
#include "server/core/first_order_checks.h"
#include "server/core/schedule.h"

namespace natgrad::core::matrix_block_internal {

// Saturating, for state-size estimates of absurd configs.
inline int64_t SatAdd(int64_t a, int64_t b) {
  if (a > std::numeric_limits<int64_t>::max() - b) return std::numeric_limits<int64_t>::max();
  return a + b;
}
inline int64_t SatMul(int64_t a, int64_t b) {
  if (a <= 0 || b <= 0) return 0;
  if (a > std::numeric_limits<int64_t>::max() / b) return std::numeric_limits<int64_t>::max();
  return a * b;
}

// The matrix the block works on: [view_rows, values / view_rows], or the
// parameter's own shape when view_rows is 0 or already its rows.
inline MatrixShape ViewShape(MatrixShape shape, int64_t view_rows) {
  if (view_rows <= 0 || view_rows == shape.rows) return shape;
  return {view_rows, shape.rows * shape.cols / view_rows};
}

// The view_rows for a rank > 2 tensor: its dimensions merged greedily into
// groups of product <= max_dim (Distributed Shampoo's merge_small_dims,
// ones dropped); the first group's size when exactly two groups remain,
// else 0 (the default [shape[0], prod(rest)] view).
inline int64_t MergedViewRows(const std::vector<int64_t>& tensor_shape, int64_t max_dim) {
  if (tensor_shape.size() <= 2) return 0;
  std::vector<int64_t> merged;
  int64_t product = 1;
  for (int64_t d : tensor_shape) {
    if (d <= 0) return 0;
    if (product <= max_dim / d) {  // product * d <= max_dim without overflow
      product *= d;
    } else {
      if (product > 1) merged.push_back(product);
      product = d;
    }
  }
  if (product > 1) merged.push_back(product);
  return merged.size() == 2 ? merged[0] : 0;
}

// x (rows x cols of one shape) read in the wire's row-major order as a
// rows x cols matrix; x itself when it already has that many rows.
template <typename Scalar>
Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic> Reshape(
    const Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>& x, MatrixShape from,
    MatrixShape to) {
  if (to.rows == from.rows) return x;
  using RowMajor = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  RowMajor flat = x;
  return Eigen::Map<const RowMajor>(flat.data(), to.rows, to.cols);
}

// The factor EMAs: beta * old + (1 - beta) G G^T (left) or G^T G (right).
template <typename Matrix, typename Derived>
Matrix LeftFactorEma(const Matrix& old, const Eigen::MatrixBase<Derived>& g, double beta) {
  using Scalar = typename Matrix::Scalar;
  Matrix out = Scalar(beta) * old;
  out.noalias() += Scalar(1 - beta) * g * g.transpose();
  return out;
}
template <typename Matrix, typename Derived>
Matrix RightFactorEma(const Matrix& old, const Eigen::MatrixBase<Derived>& g, double beta) {
  using Scalar = typename Matrix::Scalar;
  Matrix out = Scalar(beta) * old;
  out.noalias() += Scalar(1 - beta) * g.transpose() * g;
  return out;
}

// Option checks; messages read "KIND.PARAM must ...". Written as !(in range)
// so NaN fails too.
inline absl::Status CheckViewRows(absl::string_view kind, MatrixShape shape, int64_t view_rows) {
  if (view_rows < 0 || (view_rows > 0 && (shape.rows * shape.cols) % view_rows != 0)) {
    return absl::InvalidArgumentError(
        absl::StrCat(kind, ".view_rows must be 0 or divide the parameter's ",
                     shape.rows * shape.cols, " values, got ", view_rows));
  }
  return absl::OkStatus();
}
inline absl::Status CheckUnitInterval(
    absl::string_view kind, std::initializer_list<std::pair<const char*, double>> params) {
  for (auto [param, value] : params) {
    if (!(value >= 0.0 && value < 1.0)) {
      return absl::InvalidArgumentError(
          absl::StrCat(kind, ".", param, " must be in [0, 1), got ", value));
    }
  }
  return absl::OkStatus();
}
inline absl::Status CheckPositiveFinite(
    absl::string_view kind, std::initializer_list<std::pair<const char*, double>> params) {
  for (auto [param, value] : params) {
    if (!(value > 0.0 && std::isfinite(value))) {
      return absl::InvalidArgumentError(
          absl::StrCat(kind, ".", param, " must be positive and finite, got ", value));
    }
  }
  return absl::OkStatus();
}
inline absl::Status CheckAtLeastOne(absl::string_view kind, absl::string_view param,
                                    int64_t value) {
  if (value < 1) {
    return absl::InvalidArgumentError(absl::StrCat(kind, ".", param, " must be >= 1, got ", value));
  }
  return absl::OkStatus();
}
inline absl::Status CheckInRange(absl::string_view kind, absl::string_view param, int64_t value,
                                 int64_t lo, int64_t hi) {
  if (value < lo || value > hi) {
    return absl::InvalidArgumentError(
        absl::StrCat(kind, ".", param, " must be in [", lo, ", ", hi, "], got ", value));
  }
  return absl::OkStatus();
}

// A dense first-order step's checked input (fo::CheckStepInput) and its
// rates: the learning rate (the input's override or the schedule) and the
// weight decay, both >= 0; params are required when the decay is positive.
struct DenseStepRates {
  double learning_rate;
  double weight_decay;
};
inline absl::StatusOr<DenseStepRates> CheckDenseStep(const std::string& block, MatrixShape shape,
                                                     const DenseStepInput& input,
                                                     const StepContext& context,
                                                     const Schedule& learning_rate,
                                                     const Schedule& weight_decay) {
  if (absl::Status s = first_order_internal::CheckStepInput(block, shape, input, context);
      !s.ok()) {
    return s;
  }
  const int64_t t = context.step;
  absl::StatusOr<double> lr = first_order_internal::LearningRate(learning_rate, t, block, input);
  if (!lr.ok()) return lr.status();
  absl::StatusOr<double> wd =
      first_order_internal::NonNegativeValue(weight_decay, t, block, "weight_decay");
  if (!wd.ok()) return wd.status();
  if (*wd > 0 && !input.params.has_value()) {
    return InvalidBlockField(block, "params", "is required when weight_decay > 0");
  }
  return DenseStepRates{*lr, *wd};
}

// What a first-order block's Commit returns: its delta in the block's
// precision and the step's hyperparameters.
template <typename Matrix>
BlockStepOutput FirstOrderOutput(const Matrix& delta,
                                 std::map<std::string, double> hyperparameters) {
  BlockStepOutput out;
  out.delta = DenseTensor::FromMatrix(delta);
  out.hyperparameters = std::move(hyperparameters);
  return out;
}

// A state error: `block "NAME": state FIELD WHAT`.
inline absl::Status StateError(absl::string_view block, absl::string_view field,
                               absl::string_view what) {
  return InvalidBlockField(block, absl::StrCat("state ", field), what);
}

// Refuses any scalar but "step".
inline absl::Status RefuseUnknownScalars(absl::string_view block, absl::string_view kind,
                                         const BlockState& state) {
  for (const auto& [key, value] : state.scalars) {
    if (key != "step") {
      return StateError(block, absl::StrCat("scalar \"", key, "\""),
                        absl::StrCat("is not a ", kind, " state name"));
    }
  }
  return absl::OkStatus();
}

// Refuses any tensor not in want; why says what may differ.
inline absl::Status RefuseUnknownTensors(absl::string_view block, const BlockState& state,
                                         const std::map<std::string, MatrixShape>& want,
                                         absl::string_view why) {
  for (const auto& [key, value] : state.tensors) {
    if (want.count(key) == 0) {
      return StateError(block, absl::StrCat("tensor \"", key, "\""),
                        absl::StrCat("is not a state tensor of this block ", why));
    }
  }
  return absl::OkStatus();
}

// Every tensor in want, of its shape, cast to Scalar and finite there. check
// (may be empty) adds a kind's own test of one tensor: it gets the key, the
// double tensor and the cast one and returns an empty string or the WHAT of
// its error. Keys are read in order, so the first bad one is reported.
template <typename Scalar, typename Check>
absl::StatusOr<std::map<std::string, Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>>>
ReadStateTensors(absl::string_view block, const BlockState& state,
                 const std::map<std::string, MatrixShape>& want, Check check) {
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;
  std::map<std::string, Matrix> got;
  for (const auto& [key, shape] : want) {
    const std::string field = absl::StrCat("tensor \"", key, "\"");
    absl::StatusOr<const Eigen::MatrixXd*> x = first_order_internal::StateTensor(state, key, shape);
    if (!x.ok()) return StateError(block, field, x.status().message());
    Matrix cast = (*x)->template cast<Scalar>();
    if (!cast.allFinite()) return StateError(block, field, "overflows this block's precision");
    if (std::string what = check(key, **x, cast); !what.empty()) {
      return StateError(block, field, what);
    }
    got[key] = std::move(cast);
  }
  return got;
}

// Block<float> or Block<double>::Create, as a ParameterBlock.
template <template <typename> class Block, typename Options>
absl::StatusOr<std::unique_ptr<ParameterBlock>> NewBlockOfPrecision(std::string name,
                                                                    MatrixShape shape,
                                                                    const Options& options,
                                                                    Precision precision) {
  if (precision == Precision::kFloat64) {
    auto b = Block<double>::Create(std::move(name), shape, options);
    if (!b.ok()) return b.status();
    return std::unique_ptr<ParameterBlock>(std::move(*b));
  }
  auto b = Block<float>::Create(std::move(name), shape, options);
  if (!b.ok()) return b.status();
  return std::unique_ptr<ParameterBlock>(std::move(*b));
}

}  // namespace natgrad::core::matrix_block_internal

#endif  // NATGRAD_SERVER_BLOCKS_INTERNAL_MATH_MATRIX_BLOCK_HELPERS_H_
