// The wire side kfac_dense and ekfac share: raw K-FAC statistics
// (natgrad.v1.RawKfacStatistics) into core::KfacStatisticsInput, and the
// config fields both kinds carry (d_in, d_out, has_bias, the four schedules,
// ema_decay, inverse_period, locations) into core::KfacLayerOptions.
#ifndef NATGRAD_SERVER_BLOCKS_INTERNAL_KFAC_STATISTICS_CODEC_H_
#define NATGRAD_SERVER_BLOCKS_INTERNAL_KFAC_STATISTICS_CODEC_H_

#include <cstdint>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "natgrad/v1/step.pb.h"
#include "natgrad/v1/tensor.pb.h"
#include "server/blocks/internal/dense_codec.h"
#include "server/blocks/kfac_dense/math/kfac_dense_options.h"
#include "server/core/block.h"

namespace natgrad::blocks::internal {

// The dense part of a K-FAC-family step (gradient, params, learning rate;
// no parts), before its statistics are decoded.
absl::StatusOr<core::KfacStepInput> DecodeKfacStepBase(natgrad::v1::BlockStep& step,
                                                       absl::string_view kind,
                                                       ReplyFormat* reply);

// The damping a session-wide Levenberg-Marquardt adaptation starts from: the
// configured schedule's first value, else kfac_dense's default (ekfac's too).
double InitialKfacDamping(const natgrad::v1::Schedule& damping);

// `s` with "<field>.<kind>: " in front of its message (OK stays OK).
absl::Status PrefixedKindStatus(const absl::Status& s, const std::string& field,
                                absl::string_view kind);

// A required rank-2 statistics tensor, moved out of the message; scanned for
// finiteness unless `scan` is false (wire::TakeTensorUnscanned).
absl::StatusOr<core::DenseTensor> TakeRank2Statistic(bool present, natgrad::v1::Tensor* t,
                                                     const std::string& field,
                                                     bool scan = true);

// The step's raw statistics, moved out of `raw` (fields "kfac.raw.*").
absl::StatusOr<core::KfacStatisticsInput> TakeRawKfacStatistics(
    const natgrad::v1::BlockStep& step, natgrad::v1::RawKfacStatistics& raw);

// [d_out, d_in + has_bias]: the shape of a K-FAC-factored layer's weights.
inline std::vector<int64_t> KfacLayerShape(int64_t d_in, int64_t d_out, bool has_bias) {
  return {d_out, d_in + (has_bias ? 1 : 0)};
}

// Copies the shared fields of a KfacDenseConfig or EkfacConfig into `o`.
// Unset schedules stay null (the block applies its documented defaults);
// a bad one is reported under schedule_field(<name>).
template <typename Config>
absl::Status ReadKfacLayerConfig(const Config& k,
                                 absl::FunctionRef<std::string(absl::string_view)> schedule_field,
                                 core::KfacLayerOptions* o) {
  o->d_in = k.d_in();
  o->d_out = k.d_out();
  o->has_bias = k.has_bias();
  // Damping must be > 0; the smallest positive double stands for that.
  constexpr ValueRange kPositive{std::numeric_limits<double>::denorm_min()};
  for (auto [proto, param, out, range] :
       {std::tuple{&k.learning_rate(), "learning_rate", &o->learning_rate, kNonNegative},
        std::tuple{&k.damping(), "damping", &o->damping, kPositive},
        std::tuple{&k.momentum(), "momentum", &o->momentum, kMomentumRange},
        std::tuple{&k.weight_decay(), "weight_decay", &o->weight_decay, kNonNegative}}) {
    auto s = OptionalSchedule(*proto, schedule_field(param), range);
    if (!s.ok()) return s.status();
    *out = *std::move(s);
  }
  o->ema_decay = k.ema_decay();
  o->inverse_period = k.inverse_period();
  o->locations = k.locations();
  return absl::OkStatus();
}

}  // namespace natgrad::blocks::internal

#endif  // NATGRAD_SERVER_BLOCKS_INTERNAL_KFAC_STATISTICS_CODEC_H_
