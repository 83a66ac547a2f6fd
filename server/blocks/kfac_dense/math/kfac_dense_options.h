// Options of a K-FAC dense (or unfolded convolution) block, mirroring
// natgrad.v1.KfacDenseConfig (docs/math.md). Zero / null fields mean "the
// default", exactly as in the proto, so the service can copy fields across.
//
// Defaults (see server/blocks/kfac_dense/math/README.md for the reasoning):
//   learning_rate  0.1    KAISA's KFACPreconditioner default (kfac-jax has none)
//   damping        1e-3   KAISA; also the usual kfac-jax starting value
//   momentum       0      an unset proto schedule reads as "none"
//   weight_decay   0      idem
//   damping_mode   kFactoredTikhonov (the proto's UNSPECIFIED)
//   ema_decay      0.95   both kfac-jax and KAISA
//   inverse_period 5      kfac-jax (KAISA refreshes every step): the engine's
//                         decompositions are the server's shared bottleneck
//   stats_period   1      both anchors
//   locations      1      dense layer
//   async_inversion false
//   max_staleness  inverse_period (when async_inversion; must be <= it)
#ifndef NATGRAD_SERVER_BLOCKS_KFAC_DENSE_MATH_KFAC_DENSE_OPTIONS_H_
#define NATGRAD_SERVER_BLOCKS_KFAC_DENSE_MATH_KFAC_DENSE_OPTIONS_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "server/core/block.h"
#include "server/core/schedule.h"

namespace natgrad::core {

enum class KfacDampingMode {
  // V = (G + sqrt(lambda)/pi I)^-1 grad (A + pi sqrt(lambda) I)^-1.
  kFactoredTikhonov,
  // V = Q_G [(Q_G^T grad Q_A) / (s_G s_A^T + lambda)] Q_A^T.
  kEigenExact,
};

inline constexpr double kKfacDefaultLearningRate = 0.1;
inline constexpr double kKfacDefaultDamping = 1e-3;
inline constexpr double kKfacDefaultEmaDecay = 0.95;
inline constexpr int64_t kKfacDefaultInversePeriod = 5;
// Largest d_in + has_bias or d_out accepted: a 65536^2 float64 factor is
// already 32 GiB, so anything larger is a typo or an attack.
inline constexpr int64_t kKfacMaxFactorDim = 65536;

// The fields K-FAC and EKFAC share (the layer, the schedules, the factor
// EMA, the refresh period and the convolution locations), with the same
// defaults and validation (NormalizeKfacLayerOptions).
struct KfacLayerOptions {
  int64_t d_in = 0;
  int64_t d_out = 0;
  bool has_bias = false;
  SchedulePtr learning_rate;  // null: constant kKfacDefaultLearningRate
  SchedulePtr damping;        // null: constant kKfacDefaultDamping
  SchedulePtr momentum;       // null: 0
  SchedulePtr weight_decay;   // null: 0
  double ema_decay = kKfacDefaultEmaDecay;  // in (0, 1); 0: default
  // Decompose at step 1 and at every step t with (t - 1) % inverse_period == 0.
  int64_t inverse_period = kKfacDefaultInversePeriod;  // 0: default
  // Spatial locations T per example for unfolded convolutions; 0 or 1: dense.
  int64_t locations = 1;
};

// Validates the shared fields of `o` in place (INVALID_ARGUMENT naming the
// block and the field "<kind>.<option>") and fills in their defaults.
absl::Status NormalizeKfacLayerOptions(absl::string_view kind,
                                       absl::string_view block_name,
                                       KfacLayerOptions& o);

struct KfacDenseOptions : KfacLayerOptions {
  KfacDampingMode damping_mode = KfacDampingMode::kFactoredTikhonov;
  // Fold statistics at every step t with (t - 1) % stats_period == 0.
  int64_t stats_period = 1;  // 0: 1
  bool async_inversion = false;
  // Async only: how many steps, counting the refresh step, may still use the
  // previous decomposition while the engine computes the new one. 0: default
  // (inverse_period); ignored without async_inversion.
  int64_t max_staleness = 0;
};

// Validates `options` (INVALID_ARGUMENT naming the block and the field) and
// returns a copy with every default filled in: schedules non-null, periods
// and locations >= 1, max_staleness resolved (0 when not async).
absl::StatusOr<KfacDenseOptions> NormalizeKfacDenseOptions(
    absl::string_view block_name, const KfacDenseOptions& options);

// Bytes of state a block with these (normalized) options will hold at most:
// EMA factors, decompositions, momentum and one in-flight async refresh.
// Lets the session check its memory budget before creating the block.
int64_t KfacDenseStateBytes(const KfacDenseOptions& options,
                            Precision precision);

}  // namespace natgrad::core

#endif  // NATGRAD_SERVER_BLOCKS_KFAC_DENSE_MATH_KFAC_DENSE_OPTIONS_H_
