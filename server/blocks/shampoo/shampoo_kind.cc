#include "server/blocks/shampoo/shampoo_kind.h"

#include <tuple>

#include "absl/strings/str_cat.h"
#include "server/blocks/internal/dense_codec.h"
#include "server/blocks/internal/dense_gradient_kind.h"
#include "server/blocks/shampoo/math/shampoo_block.h"

namespace natgrad::blocks {
namespace {

using natgrad::v1::BlockConfig;

class ShampooBlockKind final : public internal::DenseGradientKind {
 public:
  absl::string_view name() const override { return "shampoo"; }
  BlockConfig::KindCase config_case() const override { return BlockConfig::kShampoo; }

  absl::Status Validate(const BlockConfig& config, natgrad::v1::DType,
                        const std::string& field) const override {
    absl::StatusOr<core::MatrixShape> shape;
    absl::StatusOr<core::ShampooOptions> o = Options(config, field, &shape);
    if (!o.ok()) return o.status();
    return Prefixed(core::ValidateShampooOptions(*shape, *o), config, field);
  }

  int64_t EstimateStateBytes(const BlockConfig& config,
                             natgrad::v1::DType state_dtype) const override {
    absl::StatusOr<core::MatrixShape> shape;
    absl::StatusOr<core::ShampooOptions> o = Options(config, "", &shape);
    if (!o.ok()) return 0;
    return core::EstimateShampooStateBytes(*shape, *o, internal::ElementBytes(state_dtype, 4));
  }

  absl::StatusOr<std::unique_ptr<core::ParameterBlock>> NewBlock(
      const BlockConfig& config, natgrad::v1::DType state_dtype,
      const std::string& field) const override {
    absl::StatusOr<core::MatrixShape> shape;
    absl::StatusOr<core::ShampooOptions> o = Options(config, field, &shape);
    if (!o.ok()) return o.status();
    auto block = core::NewShampooBlock(config.name(), *shape, *o,
                                       internal::PrecisionOf(state_dtype, core::Precision::kFloat32));
    if (!block.ok()) return Prefixed(block.status(), config, field);
    return block;
  }

  std::vector<std::string> SnapshotTensorNames() const override {
    // k numbers the tiles row-major (max_preconditioner_dim per side).
    return {"momentum",   "second_moment", "left_factor.<k>",
            "right_factor.<k>", "left_root.<k>", "right_root.<k>"};
  }

 private:
  // The core's messages name the option ("shampoo.beta2 must be ..."); the
  // config's path and the block's name go in front.
  static absl::Status Prefixed(const absl::Status& s, const BlockConfig& config,
                               const std::string& field) {
    if (s.ok()) return s;
    return absl::Status(s.code(), absl::StrCat(field, ": block ",
                                               core::QuotedBlockName(config.name()), ": ",
                                               s.message()));
  }

  absl::StatusOr<core::ShampooOptions> Options(const BlockConfig& config,
                                               const std::string& field,
                                               absl::StatusOr<core::MatrixShape>* shape) const {
    *shape = internal::MatrixShapeOf(CanonicalShape(config), field);
    if (!shape->ok()) return shape->status();
    const auto& c = config.shampoo();
    core::ShampooOptions o;
    for (auto [proto, out, param] :
         {std::tuple{&c.learning_rate(), &o.learning_rate, "learning_rate"},
          std::tuple{&c.weight_decay(), &o.weight_decay, "weight_decay"}}) {
      auto s = internal::OptionalSchedule(*proto, absl::StrCat(field, ".shampoo.", param));
      if (!s.ok()) return s.status();
      *out = *std::move(s);
    }
    if (c.has_beta1()) o.beta1 = c.beta1();
    if (c.beta2() != 0) o.beta2 = c.beta2();
    if (c.epsilon() != 0) o.epsilon = c.epsilon();
    o.bias_correction = c.bias_correction();
    if (c.precondition_frequency() != 0) o.precondition_frequency = c.precondition_frequency();
    if (c.start_preconditioning_step() != 0) {
      o.start_preconditioning_step = c.start_preconditioning_step();
    }
    if (c.max_preconditioner_dim() != 0) o.max_preconditioner_dim = c.max_preconditioner_dim();
    o.inverse_root_override = c.inverse_root_override();
    // Rank > 2: Distributed Shampoo's merge of small dimensions decides the
    // matrix the factors see, when it leaves two groups.
    o.view_rows = core::ShampooMergedRows(CanonicalShape(config), o.max_preconditioner_dim);
    switch (c.grafting()) {
      case natgrad::v1::SHAMPOO_GRAFTING_UNSPECIFIED:
      case natgrad::v1::SHAMPOO_GRAFTING_ADAM:
        o.grafting = core::ShampooGrafting::kAdam;
        break;
      case natgrad::v1::SHAMPOO_GRAFTING_SGD:
        o.grafting = core::ShampooGrafting::kSgd;
        break;
      case natgrad::v1::SHAMPOO_GRAFTING_NONE:
        o.grafting = core::ShampooGrafting::kNone;
        break;
      default:
        return absl::InvalidArgumentError(
            absl::StrCat(field, ".shampoo.grafting: unknown value ", c.grafting()));
    }
    if (c.grafting_beta2() != 0) o.grafting_beta2 = c.grafting_beta2();
    if (c.grafting_epsilon() != 0) o.grafting_epsilon = c.grafting_epsilon();
    return o;
  }
};

}  // namespace

const BlockKind& ShampooKind() {
  static const ShampooBlockKind kind;
  return kind;
}

}  // namespace natgrad::blocks
