#include "server/blocks/adam/adam_kind.h"

#include "server/blocks/internal/dense_codec.h"
#include "server/blocks/internal/dense_gradient_kind.h"
#include "server/blocks/adam/math/adam_block.h"

namespace natgrad::blocks {
namespace {

using natgrad::v1::BlockConfig;

class AdamBlockKind final : public internal::DenseGradientKind {
 public:
  absl::string_view name() const override { return "adam"; }
  BlockConfig::KindCase config_case() const override { return BlockConfig::kAdam; }

  absl::Status Validate(const BlockConfig& config, natgrad::v1::DType,
                        const std::string& field) const override {
    absl::StatusOr<core::MatrixShape> shape;
    absl::StatusOr<core::AdamOptions> o = Options(config, field, &shape);
    if (!o.ok()) return o.status();
    return core::ValidateAdamOptions(*shape, *o);
  }

  int64_t EstimateStateBytes(const BlockConfig& config,
                             natgrad::v1::DType state_dtype) const override {
    // exp_avg and exp_avg_sq.
    return internal::SaturatingMul(
        2 * internal::ElementBytes(state_dtype, 4),
        internal::SaturatingElements(CanonicalShape(config)));
  }

  absl::StatusOr<std::unique_ptr<core::ParameterBlock>> NewBlock(
      const BlockConfig& config, natgrad::v1::DType state_dtype,
      const std::string& field) const override {
    absl::StatusOr<core::MatrixShape> shape;
    absl::StatusOr<core::AdamOptions> o = Options(config, field, &shape);
    if (!o.ok()) return o.status();
    return core::NewAdamBlock(config.name(), *shape, *o,
                              internal::PrecisionOf(state_dtype, core::Precision::kFloat32));
  }

  std::vector<std::string> SnapshotTensorNames() const override {
    return {"exp_avg", "exp_avg_sq"};
  }

 private:
  // Unset betas and epsilon (0 on the wire) keep the core's defaults.
  absl::StatusOr<core::AdamOptions> Options(const BlockConfig& config, const std::string& field,
                                            absl::StatusOr<core::MatrixShape>* shape) const {
    *shape = internal::MatrixShapeOf(CanonicalShape(config), field);
    if (!shape->ok()) return shape->status();
    const auto& c = config.adam();
    core::AdamOptions o;
    for (auto [proto, out, param] :
         {std::tuple{&c.learning_rate(), &o.learning_rate, "learning_rate"},
          std::tuple{&c.weight_decay(), &o.weight_decay, "weight_decay"}}) {
      auto s = internal::OptionalSchedule(*proto, absl::StrCat(field, ".adam.", param),
                                          internal::kNonNegative);
      if (!s.ok()) return s.status();
      *out = *std::move(s);
    }
    if (c.beta1() != 0) o.beta1 = c.beta1();
    if (c.beta2() != 0) o.beta2 = c.beta2();
    if (c.epsilon() != 0) o.epsilon = c.epsilon();
    o.decoupled_weight_decay = c.decoupled_weight_decay();
    return o;
  }
};

}  // namespace

const BlockKind& AdamKind() {
  static const AdamBlockKind kind;
  return kind;
}

}  // namespace natgrad::blocks
