// K-FAC block for a dense layer or an unfolded convolution (docs/math.md;
// Martens & Grosse 2015, Grosse & Martens 2016, kfac-jax conventions).
//
// W is d_out x (d_in + has_bias), the bias being its last column. Per step:
//  1. statistics (every stats_period steps) are folded into zero-started,
//     bias-corrected EMA factors A (d_in+b square) and G (d_out square);
//  2. at step 1 and every inverse_period steps the engine decomposes them
//     (eigh for kEigenExact; Cholesky inverses of the pi-corrected damped
//     factors for kFactoredTikhonov); between refreshes the last decomposition
//     is reused (kfac-jax), so factored damping uses the lambda of the refresh;
//  3. V = preconditioned (grad + wd W); the session combines KlTerm()s of all
//     blocks into nu (kl_clipping.h); Commit(nu): m <- mu m + nu V, delta = -lr m.
//
// Convolutions (locations T > 1): the client sends unfolded patches, one row
// per (example, location), n*T rows. As kfac-jax's Conv2DTwoKroneckerFactored:
// A = sum_{i,t} abar abar^T / n (so the bias entry is T) and
// G = sum_{i,t} g g^T / (n T); A (x) G = T E_t[abar abar^T] (x) E_t[g g^T],
// the KFC approximation with spatially uncorrelated derivatives.
//
// Exported state (BlockState names):
//   tensors  a_ema, g_ema       EMA sums before bias correction (factor =
//                               x_ema / ema_weight)
//            momentum           m, d_out x (d_in+b)
//            a_eigenvectors, a_eigenvalues, g_eigenvectors, g_eigenvalues
//                               (kEigenExact) or a_damped_inverse,
//                               g_damped_inverse (kFactoredTikhonov): present
//                               iff decomposition_step > 0
//   scalars  ema_weight         1 - decay^k after k folds
//            stats_updates      k
//            last_step          last committed step (0: none)
//            decomposition_step step whose factors were decomposed (0: none)
//            decomposition_damping lambda baked into the damped inverses
// An async refresh still in flight is waited for by ExportState and
// exported as the installed decomposition.
#ifndef NATGRAD_SERVER_BLOCKS_KFAC_DENSE_MATH_KFAC_DENSE_BLOCK_H_
#define NATGRAD_SERVER_BLOCKS_KFAC_DENSE_MATH_KFAC_DENSE_BLOCK_H_

#include <future>
#include <memory>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "server/core/block.h"
#include "server/blocks/kfac_dense/math/kfac_dense_options.h"
#include "server/blocks/kfac_dense/math/kfac_step_checks.h"
#include "server/engine/inversion_engine.h"

namespace natgrad::core {

inline constexpr absl::string_view kKfacDenseKind = "kfac_dense";

// Validates the options (INVALID_ARGUMENT naming block and field) and makes a
// float or double block.
absl::StatusOr<std::unique_ptr<ParameterBlock>> NewKfacDenseBlock(
    std::string name, const KfacDenseOptions& options, Precision precision);

template <typename Scalar>
class KfacDensePendingUpdate;

// Instantiated for float and double in the .cc. A pending update holds
// everything it installs; Commit writes it into the block, so the block must
// outlive it and only the latest proposal may be committed (the session's
// protocol).
template <typename Scalar>
class KfacDenseBlock final : public ParameterBlock {
 public:
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;
  using Vector = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;

  // `options` must come from NormalizeKfacDenseOptions (the factory does it).
  KfacDenseBlock(std::string name, KfacDenseOptions options);

  absl::string_view kind() const override { return kKfacDenseKind; }
  absl::StatusOr<std::unique_ptr<PendingBlockUpdate>> Propose(
      const BlockStepInput& input, const StepContext& context) override;
  // A refresh step, the first decomposition, or a refresh in flight that
  // this step may install or wait for (PlanRefresh).
  bool MayWaitForEngine(int64_t step) const override {
    return IsInverseStep(step) || decomp_.step == 0 || in_flight_.has_value();
  }
  BlockState ExportState() const override;
  absl::Status ImportState(const BlockState& state) override;
  int64_t StateBytes() const override;

  const KfacDenseOptions& options() const { return options_; }
  // Whether step t folds statistics (then they are required).
  bool IsStatsStep(int64_t step) const;
  // Whether step t refreshes the decomposition.
  bool IsInverseStep(int64_t step) const;

 private:
  friend class KfacDensePendingUpdate<Scalar>;

  struct Decomp {
    int64_t step = 0;  // 0: none yet
    double damping = 0;
    Matrix a, g;       // eigenvectors or damped inverses
    Vector a_values, g_values;  // kEigenExact only
  };
  using Future =
      std::shared_future<absl::StatusOr<engine::Decomposition<Scalar>>>;
  // EMA sums of the factors (factor = sum / weight). Shared and immutable,
  // so a proposal that does not fold statistics holds them without a copy.
  struct Factors {
    std::shared_ptr<const Matrix> a_sum, g_sum;
    double weight = 0;     // 1 - decay^k after k folds
    int64_t updates = 0;   // k
  };
  struct Refresh {  // a refresh submitted to the engine (async: in flight)
    int64_t step = 0;
    double damping = 0;
    Future a, g;
    Factors factors;  // what was decomposed, for the PSD test (CheckPsd)
  };
  using Hyperparameters = kfac::StepHyperparameters;
  // What this step does to the decomposition.
  struct RefreshPlan {
    std::optional<Decomp> install;
    bool clear_in_flight = false;
    std::optional<Refresh> start_in_flight;
    int64_t inversion_micros = 0;
  };

  int64_t a_dim() const { return options_.d_in + (options_.has_bias ? 1 : 0); }
  int64_t g_dim() const { return options_.d_out; }
  absl::Status Invalid(absl::string_view field, absl::string_view what) const;

  // The three parts of a step:
  // 1. fold this step's statistics into new EMA factors (or share the
  //    current ones when the step does not fold);
  absl::StatusOr<Factors> FoldStatistics(const KfacStepInput& input, int64_t t,
                                         const StepContext& context) const;
  // 2. plan the decomposition: install a finished async refresh, submit a
  //    due one to the engine and wait for it unless it may run behind;
  absl::StatusOr<RefreshPlan> PlanRefresh(int64_t t, double lambda,
                                          const Factors& factors,
                                          const StepContext& context) const;
  // 3. precondition the gradient with the decomposition in use.
  absl::StatusOr<Matrix> Precondition(const Decomp& use, const Matrix& grad,
                                      double lambda, linalg::ComputePool* pool) const;

  absl::StatusOr<Hyperparameters> ResolveHyperparameters(
      int64_t t, const KfacStepInput& input, const StepContext& context) const;
  // The decomposition a refresh resolves to, checking the engine's output
  // and that the decomposed factors are PSD.
  absl::StatusOr<Decomp> Resolve(const Refresh& refresh) const;
  // The PSD test of the EMA factor where it is decomposed (each reduced
  // factor was already tested by CheckedFactor when it arrived; this guards
  // the EMA's rounding and the engine's answer). `result`
  // is the engine's answer for factor `which` ('A' or 'G') of `refresh`:
  //   eigen-exact: the eigenpairs the engine clamped to ~0 have Rayleigh
  //     quotients q^T F q equal to their true eigenvalues; one below
  //     -tol * scale means F is indefinite (costs d^2 k for k such pairs);
  //   factored Tikhonov: the Cholesky of the damped factor succeeding at the
  //     first attempt proves F + damping is PD, all the step needs; when the
  //     engine needed jitter or failed, a float64 Cholesky of F + tol * scale
  //     tells rounding from an indefinite F.
  // INVALID_ARGUMENT naming kfac.reduced.{a,g}_factor when indefinite.
  absl::Status CheckPsd(
      const Refresh& refresh, char which,
      const absl::StatusOr<engine::Decomposition<Scalar>>& result) const;

  KfacDenseOptions options_;
  Factors factors_;
  Matrix momentum_;
  int64_t last_step_ = 0;
  Decomp decomp_;
  std::optional<Refresh> in_flight_;
};

extern template class KfacDenseBlock<float>;
extern template class KfacDenseBlock<double>;

}  // namespace natgrad::core

#endif  // NATGRAD_SERVER_BLOCKS_KFAC_DENSE_MATH_KFAC_DENSE_BLOCK_H_
