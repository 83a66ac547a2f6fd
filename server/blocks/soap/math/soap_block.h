// SOAP: Adam in the eigenbasis of Shampoo's preconditioner (Vyas et al.
// 2024, arXiv:2409.11321), following the authors' reference implementation
// (github.com/nikhilvyas/SOAP, soap.py) step for step; docs/math.md has the
// statement. For the matrix G (the parameter's view, as shampoo's):
//   first Propose: L = (1 - bs) G G^T, R = (1 - bs) G^T G, Q_L, Q_R = their
//     eigenvectors (engine kEigh) in descending eigenvalue order; the delta is
//     zero (the reference never preconditions with the gradient that built
//     the basis, and skips weight decay on that step too).
//   every later Propose, k = the number of those (1, 2, ...):
//     g' = Q_L^T G Q_R
//     m = b1 m + (1 - b1) g'          (m lives in the current eigenbasis)
//     v = b2 v + (1 - b2) g'^2
//     N = Q_L (m / (sqrt(v) + eps)) Q_R^T
//     s = lr sqrt(1 - b2^k) / (1 - b1^k)    (lr alone without bias correction)
//     delta = -s N - lr wd (W - s N)   (the reference decays the already
//                                       updated parameter)
//     L = bs L + (1 - bs) G G^T, R likewise
//     when k % precondition_frequency == 0, per side: sort the columns of Q
//       by diag(Q^T L Q) descending and permute v's rows (left) / columns
//       (right) alike, then Q = qr(L Q).Q (kPowerQr, the reference) or the
//       descending eigenvectors of L from the engine (kEigh); m is re-expressed
//       in the new basis (Q_L'^T Q_L m Q_R^T Q_R'); v is only permuted.
// A side whose dimension exceeds max_precond_dim, and both sides of a 1-D
// parameter (options.vector), keep the identity: no factor, no rotation.
#ifndef NATGRAD_SERVER_BLOCKS_SOAP_MATH_SOAP_BLOCK_H_
#define NATGRAD_SERVER_BLOCKS_SOAP_MATH_SOAP_BLOCK_H_

#include <cstdint>
#include <memory>
#include <string>

#include "Eigen/Core"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "server/core/block.h"
#include "server/core/schedule.h"

namespace natgrad::core {

// How a refresh after the first recomputes the eigenbases.
enum class SoapRefresh {
  // One power-iteration step from the previous basis plus a QR (the reference).
  kPowerQr,
  // A full eigendecomposition through the engine.
  kEigh,
};

struct SoapOptions {
  // Null means the default: learning rate 3e-3.
  SchedulePtr learning_rate;
  // Decoupled; null means 0.01 (the reference's default). Positive needs params.
  SchedulePtr weight_decay;
  // Constants, taken as given: in [0, 1); epsilon > 0.
  double beta1 = 0.95;
  double beta2 = 0.95;
  // The factors' EMA (the reference's shampoo_beta; its -1 means beta2).
  double shampoo_beta = 0.95;
  double epsilon = 1e-8;
  bool bias_correction = true;
  int64_t precondition_frequency = 10;
  int64_t max_precond_dim = 10000;
  SoapRefresh refresh = SoapRefresh::kPowerQr;
  // A 1-D parameter: plain Adam (identity on both sides), as the reference
  // without precondition_1d.
  bool vector = false;
  // As ShampooOptions::view_rows: the matrix the factors see is the
  // parameter's row-major values re-read with view_rows rows; 0 keeps it.
  int64_t view_rows = 0;
};

template <typename Scalar>
class SoapBlock final : public ParameterBlock {
 public:
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;

  static absl::StatusOr<std::unique_ptr<SoapBlock>> Create(std::string name, MatrixShape shape,
                                                           const SoapOptions& options);

  absl::string_view kind() const override { return "soap"; }
  // The pending update refers to this block: commit or drop it before the
  // next Propose/ImportState or the block's destruction. The first step and
  // kEigh refreshes submit both sides to context.engine before waiting.
  absl::StatusOr<std::unique_ptr<PendingBlockUpdate>> Propose(const BlockStepInput& input,
                                                              const StepContext& context) override;
  // The first step and kEigh refreshes use the engine (steps counted by the
  // block).
  bool MayWaitForEngine(int64_t) const override { return UsesEngineNextStep(); }
  // Scalar "step" (Propose calls committed, the first included); tensors
  // "exp_avg" and "exp_avg_sq" (both in the eigenbasis), and per
  // preconditioned side "left_factor"/"right_factor" and, once step >= 1,
  // "left_basis"/"right_basis".
  BlockState ExportState() const override;
  absl::Status ImportState(const BlockState& state) override;
  int64_t StateBytes() const override;

  bool left_preconditioned() const { return left_on_; }
  bool right_preconditioned() const { return right_on_; }

 private:
  class Update;

  SoapBlock(std::string name, MatrixShape shape, SoapOptions options);
  // Whether the next Propose refreshes the bases (any way), and whether it
  // submits decompositions to the engine (the first step, kEigh refreshes).
  bool RefreshesNextStep() const;
  bool UsesEngineNextStep() const;
  Matrix ToView(const Matrix& x) const;
  Matrix FromView(const Matrix& x) const;
  // Q_L^T x Q_R and its inverse Q_L x Q_R^T (identity sides skipped).
  Matrix Project(const Matrix& x, const Matrix& ql, const Matrix& qr) const;
  Matrix ProjectBack(const Matrix& x, const Matrix& ql, const Matrix& qr) const;

  MatrixShape shape_;    // as the step input comes
  MatrixShape view_;     // as the factors see it
  SoapOptions options_;  // schedules are never null
  bool left_on_, right_on_;
  int64_t step_ = 0;
  Matrix exp_avg_, exp_avg_sq_;
  Matrix left_, right_;              // empty on an identity side
  Matrix left_basis_, right_basis_;  // empty on an identity side or before step 1
};

extern template class SoapBlock<float>;
extern template class SoapBlock<double>;

MatrixShape SoapViewShape(MatrixShape shape, const SoapOptions& options);

// Checks shape and options without allocating any state.
absl::Status ValidateSoapOptions(MatrixShape shape, const SoapOptions& options);

// Upper bound of the state bytes for a parameter of `shape` (saturating).
int64_t EstimateSoapStateBytes(MatrixShape shape, const SoapOptions& options,
                               int64_t element_bytes);

absl::StatusOr<std::unique_ptr<ParameterBlock>> NewSoapBlock(std::string name, MatrixShape shape,
                                                             const SoapOptions& options,
                                                             Precision precision);

}  // namespace natgrad::core

#endif  // NATGRAD_SERVER_BLOCKS_SOAP_MATH_SOAP_BLOCK_H_
