// EKFAC block for a dense layer or an unfolded convolution: K-FAC's
// Kronecker-factored eigenbasis with a diagonal scaling re-estimated every
// step from the per-example gradients (George et al. 2018, "Fast
// Approximate Natural Gradient Descent in a Kronecker-factored Eigenbasis";
// docs/math.md).
//
// W is d_out x d_a, d_a = d_in + has_bias, the bias its last column. Each
// step takes the mean-loss gradient and raw statistics (n*T rows of layer
// inputs a, bias 1 appended here, and of per-example output gradients g, as
// kfac_dense's raw form) and:
//  1. folds A = sum abar abar^T / n and G = sum g g^T / (n T) into
//     zero-started, bias-corrected EMAs (kfac_dense's factors exactly);
//  2. at step 1 and every inverse_period steps eigendecomposes the two
//     factors through the engine (both submitted before waiting) into
//     U_A, U_G; the scaling's EMA restarts in the new basis;
//  3. estimates s_t = (1/n) sum_i (U_G^T G_i U_A)^2 with G_i example i's
//     gradient (sum over its T locations of g abar^T) and folds it into a
//     bias-corrected EMA s with the factors' decay;
//  4. V = U_G [(U_G^T (grad + wd W) U_A) / (s + lambda)] U_A^T; the session's
//     KL clip gives nu; Commit(nu): m <- mu m + nu V, delta = -lr m.
// Reduced statistics are refused: they no longer hold the per-example
// gradients the scaling is estimated from.
//
// Exported state (BlockState names):
//   tensors  a_ema, g_ema      EMA sums (factor = x_ema / ema_weight)
//            momentum          d_out x d_a
//            scaling_ema       EMA sum of s_t in the current basis (s =
//                              scaling_ema / scaling_weight), d_out x d_a
//            a_eigenvectors, g_eigenvectors   present iff basis_step > 0
//   scalars  ema_weight, stats_updates   1 - decay^k after k folds, k
//            scaling_weight, scaling_updates  the same since basis_step
//            last_step         last committed step (0: none)
//            basis_step        step whose factors gave the basis (0: none)
#ifndef NATGRAD_SERVER_BLOCKS_EKFAC_MATH_EKFAC_BLOCK_H_
#define NATGRAD_SERVER_BLOCKS_EKFAC_MATH_EKFAC_BLOCK_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "server/blocks/ekfac/math/ekfac_options.h"
#include "server/blocks/kfac_dense/math/kfac_step_checks.h"
#include "server/core/block.h"

namespace natgrad::core {

inline constexpr absl::string_view kEkfacKind = "ekfac";

// Validates the options (INVALID_ARGUMENT naming block and field) and makes a
// float or double block.
absl::StatusOr<std::unique_ptr<ParameterBlock>> NewEkfacBlock(
    std::string name, const EkfacOptions& options, Precision precision);

template <typename Scalar>
class EkfacPendingUpdate;

// Instantiated for float and double in the .cc. A pending update holds
// everything it installs; only the latest proposal may be committed.
template <typename Scalar>
class EkfacBlock final : public ParameterBlock {
 public:
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;

  // `options` must come from NormalizeEkfacOptions (the factory does it).
  EkfacBlock(std::string name, EkfacOptions options);

  absl::string_view kind() const override { return kEkfacKind; }
  absl::StatusOr<std::unique_ptr<PendingBlockUpdate>> Propose(
      const BlockStepInput& input, const StepContext& context) override;
  // Only steps that recompute the eigenbasis use the engine.
  bool MayWaitForEngine(int64_t step) const override { return RefreshesBasis(step); }
  BlockState ExportState() const override;
  absl::Status ImportState(const BlockState& state) override;
  int64_t StateBytes() const override;

  const EkfacOptions& options() const { return options_; }
  // Whether step t recomputes the eigenbasis.
  bool IsBasisStep(int64_t step) const;
  // A basis step, or the first basis.
  bool RefreshesBasis(int64_t step) const { return IsBasisStep(step) || state_.basis_step == 0; }

 private:
  friend class EkfacPendingUpdate<Scalar>;

  // Everything a step replaces; a pending update holds a whole copy.
  struct State {
    Matrix a_sum, g_sum;
    double weight = 0;
    int64_t updates = 0;
    // Null until basis_step > 0; shared, since most steps keep the basis.
    std::shared_ptr<const Matrix> u_a, u_g;
    int64_t basis_step = 0;
    Matrix s_sum;
    double s_weight = 0;
    int64_t s_updates = 0;
  };
  using Hyperparameters = kfac::StepHyperparameters;

  int64_t a_dim() const { return options_.d_in + (options_.has_bias ? 1 : 0); }
  int64_t g_dim() const { return options_.d_out; }
  absl::Status Invalid(absl::string_view field, absl::string_view what) const;
  absl::StatusOr<Hyperparameters> ResolveHyperparameters(
      int64_t t, const KfacStepInput& input, const StepContext& context) const;

  EkfacOptions options_;
  State state_;
  Matrix momentum_;
  int64_t last_step_ = 0;
};

extern template class EkfacBlock<float>;
extern template class EkfacBlock<double>;

}  // namespace natgrad::core

#endif  // NATGRAD_SERVER_BLOCKS_EKFAC_MATH_EKFAC_BLOCK_H_
