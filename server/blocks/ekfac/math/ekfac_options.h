// Options of an EKFAC block, mirroring natgrad.v1.EkfacConfig (docs/math.md,
// EKFAC). Zero / null fields mean "the default", as in the proto. The
// defaults are kfac_dense's, for the same reasons
// (server/blocks/kfac_dense/math/README.md):
//   learning_rate  0.1    damping 1e-3    momentum 0    weight_decay 0
//   ema_decay      0.95   (factors and scaling alike)
//   inverse_period 5      locations 1 (dense layer)
// kfac_dense's stats_period, damping_mode and async_inversion have no
// counterpart: the scaling is re-estimated from raw statistics at every step,
// and the damping is always added to the scaling in the eigenbasis.
#ifndef NATGRAD_SERVER_BLOCKS_EKFAC_MATH_EKFAC_OPTIONS_H_
#define NATGRAD_SERVER_BLOCKS_EKFAC_MATH_EKFAC_OPTIONS_H_

#include <cstdint>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "server/core/block.h"
#include "server/core/schedule.h"

namespace natgrad::core {

inline constexpr double kEkfacDefaultLearningRate = 0.1;
inline constexpr double kEkfacDefaultDamping = 1e-3;
inline constexpr double kEkfacDefaultEmaDecay = 0.95;
inline constexpr int64_t kEkfacDefaultInversePeriod = 5;
// Largest d_in + has_bias or d_out (as kfac_dense: a 65536^2 float64 factor
// is already 32 GiB).
inline constexpr int64_t kEkfacMaxFactorDim = 65536;

struct EkfacOptions {
  int64_t d_in = 0;
  int64_t d_out = 0;
  bool has_bias = false;
  SchedulePtr learning_rate;  // null: constant kEkfacDefaultLearningRate
  SchedulePtr damping;        // null: constant kEkfacDefaultDamping
  SchedulePtr momentum;       // null: 0
  SchedulePtr weight_decay;   // null: 0
  double ema_decay = kEkfacDefaultEmaDecay;  // in (0, 1); 0: default
  // Eigendecompose at step 1 and at every step t with
  // (t - 1) % inverse_period == 0.
  int64_t inverse_period = kEkfacDefaultInversePeriod;  // 0: default
  // Spatial locations T per example for unfolded convolutions; 0 or 1: dense.
  int64_t locations = 1;
};

// Validates `options` (INVALID_ARGUMENT naming the block and the field
// "ekfac.<option>") and returns a copy with every default filled in.
absl::StatusOr<EkfacOptions> NormalizeEkfacOptions(absl::string_view block_name,
                                                   const EkfacOptions& options);

// Bytes of state a block with these (normalized) options holds: the EMA
// factors, their eigenvectors, the scaling and momentum. Saturates at
// INT64_MAX.
int64_t EkfacStateBytes(const EkfacOptions& options, Precision precision);

}  // namespace natgrad::core

#endif  // NATGRAD_SERVER_BLOCKS_EKFAC_MATH_EKFAC_OPTIONS_H_
