#include "server/blocks/registry.h"

#include <cmath>
#include <limits>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "server/blocks/adam/adam_kind.h"
#include "server/blocks/ekfac/ekfac_kind.h"
#include "server/blocks/gaussian/gaussian_kind.h"
#include "server/blocks/gaussian_diag/gaussian_diag_kind.h"
#include "server/blocks/internal/dense_codec.h"
#include "server/blocks/kfac_dense/kfac_dense_kind.h"
#include "server/blocks/sgd/sgd_kind.h"
#include "server/blocks/shampoo/shampoo_kind.h"
#include "server/blocks/soap/soap_kind.h"

namespace natgrad::blocks {

const std::vector<const BlockKind*>& AllKinds() {
  // The registry: one line per block kind.
  static const std::vector<const BlockKind*> kinds = {
      &SgdKind(),
      &AdamKind(),
      &KfacDenseKind(),
      &GaussianKind(),
      &GaussianDiagKind(),
      &ShampooKind(),
      &SoapKind(),
      &EkfacKind(),
  };
  return kinds;
}

absl::StatusOr<const BlockKind*> KindOf(const natgrad::v1::BlockConfig& config,
                                        const std::string& field) {
  for (const BlockKind* kind : AllKinds()) {
    if (kind->config_case() == config.kind_case()) return kind;
  }
  std::vector<std::string> names;
  for (const BlockKind* kind : AllKinds()) names.emplace_back(kind->name());
  return absl::InvalidArgumentError(absl::StrCat(
      field, ": kind is required (", absl::StrJoin(names, ", "), ")"));
}

std::vector<int64_t> CanonicalShape(const natgrad::v1::BlockConfig& config) {
  absl::StatusOr<const BlockKind*> kind = KindOf(config, "");
  if (!kind.ok()) return {config.shape().begin(), config.shape().end()};
  return (*kind)->CanonicalShape(config);
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
  std::set<std::string> names;
  bool any_curvature = false;
  for (int i = 0; i < config.blocks_size(); ++i) {
    const auto& b = config.blocks(i);
    const std::string field = absl::StrCat("config.blocks[", i, "]");
    if (b.name().empty() || b.name().size() > 256) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, ".name: must be 1 to 256 characters"));
    }
    if (!names.insert(b.name()).second) {
      return absl::InvalidArgumentError(absl::StrCat(
          field, ".name: duplicate block name ", core::QuotedBlockName(b.name())));
    }
    absl::StatusOr<const BlockKind*> kind = KindOf(b, field);
    if (!kind.ok()) return kind.status();
    if (absl::Status s = (*kind)->Validate(b, config.state_dtype(), field); !s.ok()) {
      return s;
    }
    any_curvature |= (*kind)->InitialDamping(b).has_value();
  }
  const auto& ad = config.adaptive_damping();
  // Finite even while disabled: a snapshot carries its config, and enabling
  // it later must not find a NaN.
  for (auto [value, name] : {std::pair{ad.decay(), "decay"},
                             std::pair{ad.min_damping(), "min_damping"},
                             std::pair{ad.max_damping(), "max_damping"}}) {
    if (!std::isfinite(value)) {
      return absl::InvalidArgumentError(
          absl::StrCat("config.adaptive_damping.", name, ": must be finite, got ", value));
    }
  }
  if (ad.enabled()) {
    if (!any_curvature) {
      return absl::InvalidArgumentError(
          "config.adaptive_damping: needs at least one kfac_dense block");
    }
    // Written as !(valid) so NaN fails too.
    const bool valid = ad.interval() >= 0 && ad.decay() >= 0 && ad.decay() < 1 &&
                       ad.min_damping() >= 0 && ad.max_damping() >= 0 &&
                       std::isfinite(ad.min_damping()) && std::isfinite(ad.max_damping()) &&
                       !(ad.max_damping() > 0 && ad.max_damping() < ad.min_damping());
    if (!valid) {
      return absl::InvalidArgumentError(
          "config.adaptive_damping: want interval >= 0, decay in [0, 1), "
          "0 <= min_damping <= max_damping, all finite");
    }
  }
  return absl::OkStatus();
}

int64_t EstimateStateBytes(const natgrad::v1::SessionConfig& config) {
  int64_t total = 0;
  for (const auto& b : config.blocks()) {
    absl::StatusOr<const BlockKind*> kind = KindOf(b, "");
    if (!kind.ok()) continue;
    total = internal::SaturatingAdd(
        total, (*kind)->EstimateStateBytes(b, config.state_dtype()));
  }
  return total;
}

}  // namespace natgrad::blocks
