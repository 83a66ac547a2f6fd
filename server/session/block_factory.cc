#include "server/session/block_factory.h"

#include <algorithm>
#include <cmath>
#include <set>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "server/core/first_order/adam_block.h"
#include "server/core/first_order/sgd_block.h"
#include "server/core/gaussian/gaussian_block.h"
#include "server/core/kfac/kfac_dense_block.h"
#include "server/core/kfac/kfac_dense_options.h"
#include "server/session/schedule_codec.h"

namespace natgrad::session {
namespace {

using natgrad::v1::BlockConfig;

core::Precision PrecisionOf(natgrad::v1::DType dtype, core::Precision fallback) {
  switch (dtype) {
    case natgrad::v1::FLOAT32:
      return core::Precision::kFloat32;
    case natgrad::v1::FLOAT64:
      return core::Precision::kFloat64;
    default:
      return fallback;
  }
}

absl::StatusOr<core::MatrixShape> MatrixShapeOf(const std::vector<int64_t>& shape,
                                                const std::string& field) {
  if (shape.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(field, ".shape: required"));
  }
  int64_t cols = 1;
  for (size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] <= 0 || shape[i] > (int64_t{1} << 31)) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, ".shape: dimensions must be positive, got [",
                       absl::StrJoin(shape, ", "), "]"));
    }
    if (i > 0) cols *= shape[i];
  }
  if (shape[0] * cols > (int64_t{1} << 32)) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ".shape: too many elements"));
  }
  return core::MatrixShape{shape[0], shape.size() == 1 ? 1 : cols};
}

#define NATGRAD_ASSIGN_SCHEDULE(lhs, proto, def, field)               \
  do {                                                               \
    auto _s = ScheduleFromProto(proto, def, field);                  \
    if (!_s.ok()) return _s.status();                                \
    lhs = *std::move(_s);                                            \
  } while (0)

absl::StatusOr<std::unique_ptr<core::ParameterBlock>> NewSgd(
    const BlockConfig& c, core::MatrixShape shape, core::Precision p,
    const std::string& f) {
  core::SgdOptions o;
  NATGRAD_ASSIGN_SCHEDULE(o.learning_rate, c.sgd().learning_rate(), 1e-2,
                          f + ".sgd.learning_rate");
  NATGRAD_ASSIGN_SCHEDULE(o.momentum, c.sgd().momentum(), 0.0,
                          f + ".sgd.momentum");
  NATGRAD_ASSIGN_SCHEDULE(o.weight_decay, c.sgd().weight_decay(), 0.0,
                          f + ".sgd.weight_decay");
  o.nesterov = c.sgd().nesterov();
  return core::NewSgdBlock(c.name(), shape, o, p);
}

absl::StatusOr<std::unique_ptr<core::ParameterBlock>> NewAdam(
    const BlockConfig& c, core::MatrixShape shape, core::Precision p,
    const std::string& f) {
  core::AdamOptions o;
  NATGRAD_ASSIGN_SCHEDULE(o.learning_rate, c.adam().learning_rate(), 1e-3,
                          f + ".adam.learning_rate");
  NATGRAD_ASSIGN_SCHEDULE(o.weight_decay, c.adam().weight_decay(), 0.0,
                          f + ".adam.weight_decay");
  if (c.adam().beta1() != 0) o.beta1 = c.adam().beta1();
  if (c.adam().beta2() != 0) o.beta2 = c.adam().beta2();
  if (c.adam().epsilon() != 0) o.epsilon = c.adam().epsilon();
  o.decoupled_weight_decay = c.adam().decoupled_weight_decay();
  return core::NewAdamBlock(c.name(), shape, o, p);
}

absl::StatusOr<std::unique_ptr<core::ParameterBlock>> NewGaussian(
    const BlockConfig& c, const std::vector<int64_t>& shape,
    natgrad::v1::DType state_dtype, const std::string& f) {
  const auto& g = c.gaussian();
  core::GaussianOptions o;
  o.dim = g.dim();
  o.copies = g.copies() > 0 ? g.copies() : 1;
  if (g.dim() <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(f, ".gaussian.dim: must be positive"));
  }
  if (g.copies() < 0) {
    return absl::InvalidArgumentError(absl::StrCat(f, ".gaussian.copies: must be >= 0"));
  }
  if (shape != std::vector<int64_t>{o.copies, o.dim}) {
    return absl::InvalidArgumentError(absl::StrCat(
        f, ".shape: a gaussian block's shape is [copies, dim] = [", o.copies, ", ", o.dim,
        "], got [", absl::StrJoin(shape, ", "), "]"));
  }
  switch (g.parametrization()) {
    case natgrad::v1::NATURAL:
      o.parametrization = core::GaussianParametrization::kNatural;
      break;
    case natgrad::v1::EXPECTATION:
      o.parametrization = core::GaussianParametrization::kExpectation;
      break;
    case natgrad::v1::MEAN_CHOLESKY:
      o.parametrization = core::GaussianParametrization::kMeanCholesky;
      break;
    case natgrad::v1::MEAN_COVARIANCE:
    case natgrad::v1::GAUSSIAN_PARAMETRIZATION_UNSPECIFIED:
      o.parametrization = core::GaussianParametrization::kMeanCovariance;
      break;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat(f, ".gaussian.parametrization: unknown value"));
  }
  NATGRAD_ASSIGN_SCHEDULE(o.gamma, g.gamma(), 1.0, f + ".gaussian.gamma");
  // Wire: 0 (unset) is the default, negative disables the retries.
  if (g.max_halvings() > 0) o.max_halvings = g.max_halvings();
  if (g.max_halvings() < 0) o.max_halvings = 0;
  o.return_direction = g.return_direction();
  // Small, ill-conditioned problems: float64 unless float32 is asked for.
  const core::Precision p = state_dtype == natgrad::v1::FLOAT32 ? core::Precision::kFloat32
                                                                 : core::Precision::kFloat64;
  auto block = core::NewGaussianBlock(c.name(), o, p);
  if (!block.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(f, ".gaussian: ", block.status().message()));
  }
  return block;
}

absl::StatusOr<std::unique_ptr<core::ParameterBlock>> NewKfacDense(
    const BlockConfig& c, const std::vector<int64_t>& shape, core::Precision p,
    const std::string& f) {
  const auto& k = c.kfac_dense();
  core::KfacDenseOptions o;
  o.d_in = k.d_in();
  o.d_out = k.d_out();
  o.has_bias = k.has_bias();
  const std::vector<int64_t> want = {k.d_out(), k.d_in() + (k.has_bias() ? 1 : 0)};
  if (shape != want) {
    return absl::InvalidArgumentError(absl::StrCat(
        f, ".shape: a kfac_dense block's shape is [d_out, d_in + has_bias] = [",
        absl::StrJoin(want, ", "), "], got [", absl::StrJoin(shape, ", "), "]"));
  }
  // Unset schedules stay null: the block applies its documented defaults.
  auto schedule = [&](const natgrad::v1::Schedule& proto, const char* name,
                      core::SchedulePtr* out) -> absl::Status {
    if (proto.kind_case() == natgrad::v1::Schedule::KIND_NOT_SET) return absl::OkStatus();
    auto built = ScheduleFromProto(proto, 0.0, absl::StrCat(f, ".kfac_dense.", name));
    if (!built.ok()) return built.status();
    *out = *std::move(built);
    return absl::OkStatus();
  };
  for (auto [proto, name, out] :
       {std::tuple{&k.learning_rate(), "learning_rate", &o.learning_rate},
        std::tuple{&k.damping(), "damping", &o.damping},
        std::tuple{&k.momentum(), "momentum", &o.momentum},
        std::tuple{&k.weight_decay(), "weight_decay", &o.weight_decay}}) {
    if (absl::Status st = schedule(*proto, name, out); !st.ok()) return st;
  }
  switch (k.damping_mode()) {
    case natgrad::v1::EIGEN_EXACT:
      o.damping_mode = core::KfacDampingMode::kEigenExact;
      break;
    case natgrad::v1::FACTORED_TIKHONOV:
    case natgrad::v1::DAMPING_MODE_UNSPECIFIED:
      o.damping_mode = core::KfacDampingMode::kFactoredTikhonov;
      break;
    default:
      return absl::InvalidArgumentError(absl::StrCat(f, ".kfac_dense.damping_mode: unknown"));
  }
  o.ema_decay = k.ema_decay();
  o.inverse_period = k.inverse_period();
  o.stats_period = k.stats_period();
  o.locations = k.locations();
  o.async_inversion = k.async_inversion();
  o.max_staleness = k.max_staleness();
  auto block = core::NewKfacDenseBlock(c.name(), o, p);
  if (!block.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat(f, ".kfac_dense: ", block.status().message()));
  }
  return block;
}

}  // namespace

std::vector<int64_t> CanonicalShape(const BlockConfig& config) {
  std::vector<int64_t> shape(config.shape().begin(), config.shape().end());
  if (!shape.empty()) return shape;
  if (config.has_kfac_dense()) {
    const auto& k = config.kfac_dense();
    return {k.d_out(), k.d_in() + (k.has_bias() ? 1 : 0)};
  }
  if (config.has_gaussian()) {
    const auto& g = config.gaussian();
    return {g.copies() > 0 ? g.copies() : 1, g.dim()};
  }
  return shape;
}

absl::StatusOr<std::unique_ptr<core::ParameterBlock>> NewBlock(
    const BlockConfig& config, natgrad::v1::DType state_dtype,
    const std::string& field) {
  if (state_dtype != natgrad::v1::DTYPE_UNSPECIFIED &&
      state_dtype != natgrad::v1::FLOAT32 &&
      state_dtype != natgrad::v1::FLOAT64) {
    return absl::InvalidArgumentError("config.state_dtype: unknown dtype");
  }
  const std::vector<int64_t> shape = CanonicalShape(config);
  switch (config.kind_case()) {
    case BlockConfig::kSgd: {
      auto ms = MatrixShapeOf(shape, field);
      if (!ms.ok()) return ms.status();
      return NewSgd(config, *ms, PrecisionOf(state_dtype, core::Precision::kFloat32), field);
    }
    case BlockConfig::kAdam: {
      auto ms = MatrixShapeOf(shape, field);
      if (!ms.ok()) return ms.status();
      return NewAdam(config, *ms, PrecisionOf(state_dtype, core::Precision::kFloat32), field);
    }
    case BlockConfig::kGaussian:
      return NewGaussian(config, shape, state_dtype, field);
    case BlockConfig::kKfacDense:
      return NewKfacDense(config, shape,
                          PrecisionOf(state_dtype, core::Precision::kFloat32), field);
    case BlockConfig::KIND_NOT_SET:
      break;
  }
  return absl::InvalidArgumentError(
      absl::StrCat(field, ": kind is required (sgd, adam, kfac_dense, gaussian)"));
}

absl::Status ValidateSessionConfig(const natgrad::v1::SessionConfig& config) {
  if (config.blocks_size() == 0) {
    return absl::InvalidArgumentError("config.blocks: at least one block is required");
  }
  if (config.state_dtype() != natgrad::v1::DTYPE_UNSPECIFIED &&
      config.state_dtype() != natgrad::v1::FLOAT32 &&
      config.state_dtype() != natgrad::v1::FLOAT64) {
    return absl::InvalidArgumentError("config.state_dtype: must be FLOAT32 or FLOAT64");
  }
  if (config.kl_clip().kappa() < 0 || !std::isfinite(config.kl_clip().kappa())) {
    return absl::InvalidArgumentError("config.kl_clip.kappa: must be >= 0 and finite");
  }
  const auto& ad = config.adaptive_damping();
  if (ad.enabled()) {
    bool any_kfac = false;
    for (const auto& b : config.blocks()) any_kfac |= b.has_kfac_dense();
    if (!any_kfac) {
      return absl::InvalidArgumentError(
          "config.adaptive_damping: needs at least one kfac_dense block");
    }
    if (ad.interval() < 0 || ad.decay() < 0 || ad.decay() >= 1 || ad.min_damping() < 0 ||
        ad.max_damping() < 0 || (ad.max_damping() > 0 && ad.max_damping() < ad.min_damping())) {
      return absl::InvalidArgumentError(
          "config.adaptive_damping: want interval >= 0, decay in [0, 1), "
          "0 <= min_damping <= max_damping");
    }
  }
  std::set<std::string> names;
  for (int i = 0; i < config.blocks_size(); ++i) {
    const auto& b = config.blocks(i);
    const std::string field = absl::StrCat("config.blocks[", i, "]");
    if (b.name().empty() || b.name().size() > 256) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, ".name: must be 1 to 256 characters"));
    }
    if (!names.insert(b.name()).second) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, ".name: duplicate block name \"", b.name(), "\""));
    }
    auto block = NewBlock(b, config.state_dtype(), field);
    if (!block.ok()) return block.status();
  }
  return absl::OkStatus();
}

int64_t EstimateStateBytes(const natgrad::v1::SessionConfig& config) {
  const int64_t es = config.state_dtype() == natgrad::v1::FLOAT64 ? 8 : 4;
  int64_t total = 0;
  for (const auto& b : config.blocks()) {
    const std::vector<int64_t> shape = CanonicalShape(b);
    int64_t n = 1;
    for (int64_t d : shape) n *= std::max<int64_t>(d, 0);
    switch (b.kind_case()) {
      case BlockConfig::kSgd:
        total += n * es;
        break;
      case BlockConfig::kAdam:
        total += 2 * n * es;
        break;
      case BlockConfig::kKfacDense: {
        const auto& k = b.kfac_dense();
        core::KfacDenseOptions o;
        o.d_in = std::max<int64_t>(k.d_in(), 0);
        o.d_out = std::max<int64_t>(k.d_out(), 0);
        o.has_bias = k.has_bias();
        o.async_inversion = k.async_inversion();
        total += core::KfacDenseStateBytes(
            o, es == 8 ? core::Precision::kFloat64 : core::Precision::kFloat32);
        break;
      }
      case BlockConfig::kGaussian: {
        const auto& gc = b.gaussian();
        const int64_t copies = gc.copies() > 0 ? gc.copies() : 1;
        total += copies * (gc.dim() * gc.dim() + gc.dim()) * 8;
        break;
      }
      default:
        break;
    }
  }
  return total;
}

}  // namespace natgrad::session
