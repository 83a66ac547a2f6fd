// Options of an EKFAC block, mirroring natgrad.v1.EkfacConfig (docs/math.md,
// EKFAC). Zero / null fields mean "the default", as in the proto. The fields,
// defaults and their validation are kfac_dense's (KfacLayerOptions), for the
// same reasons (server/blocks/kfac_dense/math/README.md):
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
#include "server/blocks/kfac_dense/math/kfac_dense_options.h"
#include "server/core/block.h"
#include "server/core/schedule.h"

namespace natgrad::core {

inline constexpr double kEkfacDefaultLearningRate = kKfacDefaultLearningRate;
inline constexpr double kEkfacDefaultDamping = kKfacDefaultDamping;
inline constexpr double kEkfacDefaultEmaDecay = kKfacDefaultEmaDecay;
inline constexpr int64_t kEkfacDefaultInversePeriod = kKfacDefaultInversePeriod;
inline constexpr int64_t kEkfacMaxFactorDim = kKfacMaxFactorDim;

// Exactly kfac_dense's shared fields (kfac_dense_options.h): the layer, the
// schedules, ema_decay (factors and scaling alike), inverse_period
// (eigendecompose at step 1 and every step t with (t - 1) % inverse_period
// == 0) and locations.
struct EkfacOptions : KfacLayerOptions {};

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
