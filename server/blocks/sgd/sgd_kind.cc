#include "server/blocks/sgd/sgd_kind.h"

#include "server/blocks/internal/dense_codec.h"
#include "server/blocks/internal/dense_gradient_kind.h"
#include "server/blocks/sgd/math/sgd_block.h"

namespace natgrad::blocks {
namespace {

using natgrad::v1::BlockConfig;

class SgdBlockKind final : public internal::DenseGradientKind {
 public:
  absl::string_view name() const override { return "sgd"; }
  BlockConfig::KindCase config_case() const override { return BlockConfig::kSgd; }

  absl::Status Validate(const BlockConfig& config, natgrad::v1::DType,
                        const std::string& field) const override {
    // An SGD block allocates nothing until its first step with momentum.
    return NewBlock(config, natgrad::v1::FLOAT32, field).status();
  }

  int64_t EstimateStateBytes(const BlockConfig& config,
                             natgrad::v1::DType state_dtype) const override {
    return internal::SaturatingMul(internal::SaturatingElements(CanonicalShape(config)),
                                   internal::ElementBytes(state_dtype, 4));
  }

  absl::StatusOr<std::unique_ptr<core::ParameterBlock>> NewBlock(
      const BlockConfig& config, natgrad::v1::DType state_dtype,
      const std::string& field) const override {
    absl::StatusOr<core::MatrixShape> shape =
        internal::MatrixShapeOf(CanonicalShape(config), field);
    if (!shape.ok()) return shape.status();
    const auto& c = config.sgd();
    core::SgdOptions o;
    for (auto [proto, out, param, range] :
         {std::tuple{&c.learning_rate(), &o.learning_rate, "learning_rate", internal::kNonNegative},
          std::tuple{&c.momentum(), &o.momentum, "momentum", internal::kMomentumRange},
          std::tuple{&c.weight_decay(), &o.weight_decay, "weight_decay", internal::kNonNegative}}) {
      auto s = internal::OptionalSchedule(*proto, absl::StrCat(field, ".sgd.", param), range);
      if (!s.ok()) return s.status();
      *out = *std::move(s);
    }
    o.nesterov = c.nesterov();
    return core::NewSgdBlock(config.name(), *shape, o,
                             internal::PrecisionOf(state_dtype, core::Precision::kFloat32));
  }

  std::vector<std::string> SnapshotTensorNames() const override {
    return {"momentum_buffer"};
  }
};

}  // namespace

const BlockKind& SgdKind() {
  static const SgdBlockKind kind;
  return kind;
}

}  // namespace natgrad::blocks
