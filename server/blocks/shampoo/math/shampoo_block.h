// Shampoo with blocking and grafting, following Distributed Shampoo
// (Shi et al. 2023, arXiv:2309.06497) where it makes a choice; docs/math.md
// has the full statement. With n the block's own committed-step count plus
// one and t the session's step (schedules are evaluated at t):
//   m = b1 m + (1 - b1) g                       ("filtered gradient")
//   for each tile (i, j) of at most max_preconditioner_dim per side:
//     L_ij = b2 L_ij + (1 - b2) G_ij G_ij^T,  R_ij = b2 R_ij + (1 - b2) G_ij^T G_ij
//   on refresh steps: X^-1/r = Q diag((s + eps)^-1/r) Q^T from the engine's
//     kEigh of X_hat (X / (1 - b2^n) with bias correction), r = 4 unless
//     overridden (eps added to the eigenvalues: Distributed Shampoo's
//     "epsilon added to the factor before the root" convention)
//   P_ij = L_ij^-1/r M_ij R_ij^-1/r,  M = m_hat (m / (1 - b1^n) with bias correction)
//   grafting: P_ij *= ||A_ij|| / ||P_ij||, A = the grafted method's direction
//   delta = -lr * P - lr * wd * w                (decoupled weight decay)
// Before start_preconditioning_step the direction is A alone. The matrix is
// the parameter re-read as options.view_rows rows when set (the kind sets it
// from Distributed Shampoo's merge of small dimensions for rank > 2). A parameter
// with one row or one column uses the diagonal (AdaGrad-style EMA)
// preconditioner M (v_hat + eps)^-1/2 instead, v = b2 v + (1 - b2) g^2.
#ifndef NATGRAD_SERVER_BLOCKS_SHAMPOO_MATH_SHAMPOO_BLOCK_H_
#define NATGRAD_SERVER_BLOCKS_SHAMPOO_MATH_SHAMPOO_BLOCK_H_

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "Eigen/Core"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "server/core/block.h"
#include "server/core/schedule.h"

namespace natgrad::core {

enum class ShampooGrafting { kAdam, kSgd, kNone };

struct ShampooOptions {
  // Null means the default: learning rate 1e-3.
  SchedulePtr learning_rate;
  // Decoupled (AdamW-style); null means 0. A positive value needs params.
  SchedulePtr weight_decay;
  // Constants, taken as given: beta1, beta2 in [0, 1); epsilon > 0.
  double beta1 = 0.9;
  double beta2 = 0.999;
  double epsilon = 1e-12;
  bool bias_correction = false;
  int64_t precondition_frequency = 1;
  int64_t start_preconditioning_step = 1;
  int64_t max_preconditioner_dim = 1024;
  // r in X^(-1/r); 0 means 2 * order with order 2 (a matrix): r = 4.
  int64_t inverse_root_override = 0;
  ShampooGrafting grafting = ShampooGrafting::kAdam;
  // The matrix the factors precondition: the parameter's row-major values
  // re-read as view_rows x (rows * cols / view_rows); 0 keeps rows x cols.
  // The kind sets it for rank > 2 tensors (ShampooMergedRows).
  int64_t view_rows = 0;
  // The Adam graft's second moment (bias-corrected with bias_correction).
  double grafting_beta2 = 0.999;
  double grafting_epsilon = 1e-8;
};

// Scalar (float or double) is the precision of the state and the arithmetic.
template <typename Scalar>
class ShampooBlock final : public ParameterBlock {
 public:
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;

  static absl::StatusOr<std::unique_ptr<ShampooBlock>> Create(
      std::string name, MatrixShape shape, const ShampooOptions& options);

  absl::string_view kind() const override { return "shampoo"; }
  // The pending update refers to this block: commit or drop it before the
  // next Propose/ImportState or the block's destruction. Refresh steps
  // submit every tile's two factors to context.engine before waiting on any.
  absl::StatusOr<std::unique_ptr<PendingBlockUpdate>> Propose(
      const BlockStepInput& input, const StepContext& context) override;
  // Only refresh steps use the engine (the step counted by the block).
  bool MayWaitForEngine(int64_t) const override { return RefreshesNextStep(); }
  // Scalar "step"; tensors "momentum", "second_moment" (the Adam graft's or
  // the diagonal preconditioner's; absent with SGD/no grafting on a matrix),
  // and per tile k (row-major over tiles) "left_factor.k", "right_factor.k",
  // plus "left_root.k", "right_root.k" once a refresh has happened.
  BlockState ExportState() const override;
  absl::Status ImportState(const BlockState& state) override;
  int64_t StateBytes() const override;

  // Tile boundaries along one dimension (tests and the kind's estimate).
  static std::vector<std::pair<int64_t, int64_t>> Tiles(int64_t size, int64_t max_dim);
  bool diagonal() const { return view_.rows == 1 || view_.cols == 1; }

 private:
  class Update;
  struct Tile {
    int64_t row0, rows, col0, cols;
  };

  ShampooBlock(std::string name, MatrixShape shape, ShampooOptions options);
  // Whether the next Propose preconditions, and whether it recomputes the
  // roots.
  bool PreconditionsNextStep() const;
  bool RefreshesNextStep() const;
  bool HasSecondMoment() const {
    return diagonal() || options_.grafting == ShampooGrafting::kAdam;
  }

  // The parameter's view of its values in the row-major order of the wire.
  Matrix ToView(const Matrix& x) const;
  Matrix FromView(const Matrix& x) const;

  MatrixShape shape_;  // as the step input comes
  MatrixShape view_;   // as the factors see it
  ShampooOptions options_;  // schedules are never null
  std::vector<Tile> tiles_;  // empty for a diagonal block
  int64_t step_ = 0;
  Matrix momentum_;
  Matrix second_moment_;  // empty unless HasSecondMoment()
  std::vector<Matrix> left_, right_;
  // Empty until the first refresh.
  std::vector<Matrix> left_root_, right_root_;
};

extern template class ShampooBlock<float>;
extern template class ShampooBlock<double>;

// The preconditioned matrix's shape for `shape` and options.view_rows.
MatrixShape ShampooViewShape(MatrixShape shape, const ShampooOptions& options);

// Distributed Shampoo's merge of small dimensions for a tensor of rank > 2:
// consecutive dimensions are multiplied together while the product stays at
// most max_dim (dimensions of 1 dropped). When that leaves exactly two
// groups, the first group's product (the view's rows); else 0 (the default
// [shape[0], prod(rest)] view).
int64_t ShampooMergedRows(const std::vector<int64_t>& tensor_shape, int64_t max_dim);

// Checks shape and options without allocating any state.
absl::Status ValidateShampooOptions(MatrixShape shape, const ShampooOptions& options);

// Upper bound of the state bytes for a parameter of `shape` (saturating).
int64_t EstimateShampooStateBytes(MatrixShape shape, const ShampooOptions& options,
                                  int64_t element_bytes);

absl::StatusOr<std::unique_ptr<ParameterBlock>> NewShampooBlock(
    std::string name, MatrixShape shape, const ShampooOptions& options,
    Precision precision);

}  // namespace natgrad::core

#endif  // NATGRAD_SERVER_BLOCKS_SHAMPOO_MATH_SHAMPOO_BLOCK_H_
