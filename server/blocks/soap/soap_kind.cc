#include "server/blocks/soap/soap_kind.h"

#include <tuple>

#include "absl/strings/str_cat.h"
#include "server/blocks/internal/dense_codec.h"
#include "server/blocks/internal/dense_gradient_kind.h"
#include "server/blocks/internal/math/matrix_block_helpers.h"
#include "server/blocks/soap/math/soap_block.h"

namespace natgrad::blocks {
namespace {

using natgrad::v1::BlockConfig;

class SoapBlockKind final : public internal::DenseGradientKind {
 public:
  absl::string_view name() const override { return "soap"; }
  BlockConfig::KindCase config_case() const override { return BlockConfig::kSoap; }

  absl::Status Validate(const BlockConfig& config, natgrad::v1::DType,
                        const std::string& field) const override {
    absl::StatusOr<core::MatrixShape> shape;
    absl::StatusOr<core::SoapOptions> o = Options(config, field, &shape);
    if (!o.ok()) return o.status();
    return Prefixed(core::ValidateSoapOptions(*shape, *o), config, field);
  }

  int64_t EstimateStateBytes(const BlockConfig& config,
                             natgrad::v1::DType state_dtype) const override {
    absl::StatusOr<core::MatrixShape> shape;
    absl::StatusOr<core::SoapOptions> o = Options(config, "", &shape);
    if (!o.ok()) return 0;
    return core::EstimateSoapStateBytes(*shape, *o, internal::ElementBytes(state_dtype, 4));
  }

  absl::StatusOr<std::unique_ptr<core::ParameterBlock>> NewBlock(
      const BlockConfig& config, natgrad::v1::DType state_dtype,
      const std::string& field) const override {
    absl::StatusOr<core::MatrixShape> shape;
    absl::StatusOr<core::SoapOptions> o = Options(config, field, &shape);
    if (!o.ok()) return o.status();
    auto block = core::NewSoapBlock(config.name(), *shape, *o,
                                    internal::PrecisionOf(state_dtype, core::Precision::kFloat32));
    if (!block.ok()) return Prefixed(block.status(), config, field);
    return block;
  }

  std::vector<std::string> SnapshotTensorNames() const override {
    // Factors and bases only on preconditioned sides; bases from step 1.
    return {"exp_avg", "exp_avg_sq", "left_factor", "right_factor", "left_basis", "right_basis"};
  }

 private:
  // The core's messages name the option ("soap.beta2 must be ..."); the
  // config's path and the block's name go in front.
  static absl::Status Prefixed(const absl::Status& s, const BlockConfig& config,
                               const std::string& field) {
    if (s.ok()) return s;
    return absl::Status(
        s.code(),
        absl::StrCat(field, ": block ", core::QuotedBlockName(config.name()), ": ", s.message()));
  }

  absl::StatusOr<core::SoapOptions> Options(const BlockConfig& config, const std::string& field,
                                            absl::StatusOr<core::MatrixShape>* shape) const {
    const std::vector<int64_t> dims = CanonicalShape(config);
    *shape = internal::MatrixShapeOf(dims, field);
    if (!shape->ok()) return shape->status();
    const auto& c = config.soap();
    core::SoapOptions o;
    for (auto [proto, out, param] :
         {std::tuple{&c.learning_rate(), &o.learning_rate, "learning_rate"},
          std::tuple{&c.weight_decay(), &o.weight_decay, "weight_decay"}}) {
      auto s = internal::OptionalSchedule(*proto, absl::StrCat(field, ".soap.", param));
      if (!s.ok()) return s.status();
      *out = *std::move(s);
    }
    if (c.has_beta1()) o.beta1 = c.beta1();
    if (c.has_beta2()) o.beta2 = c.beta2();
    // The reference's shampoo_beta < 0 (its default) means beta2.
    o.shampoo_beta = c.has_shampoo_beta() ? c.shampoo_beta() : o.beta2;
    if (c.epsilon() != 0) o.epsilon = c.epsilon();
    if (c.has_bias_correction()) o.bias_correction = c.bias_correction();
    if (c.precondition_frequency() != 0) o.precondition_frequency = c.precondition_frequency();
    if (c.max_precond_dim() != 0) o.max_precond_dim = c.max_precond_dim();
    switch (c.refresh()) {
      case natgrad::v1::SOAP_REFRESH_UNSPECIFIED:
      case natgrad::v1::SOAP_REFRESH_POWER_QR:
        o.refresh = core::SoapRefresh::kPowerQr;
        break;
      case natgrad::v1::SOAP_REFRESH_EIGH:
        o.refresh = core::SoapRefresh::kEigh;
        break;
      default:
        return absl::InvalidArgumentError(
            absl::StrCat(field, ".soap.refresh: unknown value ", c.refresh()));
    }
    // A 1-D parameter is plain Adam (the reference's precondition_1d off);
    // rank > 2 is reshaped by shampoo's merge of small dimensions.
    o.vector = dims.size() <= 1;
    o.view_rows = core::matrix_block_internal::MergedViewRows(dims, o.max_precond_dim);
    return o;
  }
};

}  // namespace

const BlockKind& SoapKind() {
  static const SoapBlockKind kind;
  return kind;
}

}  // namespace natgrad::blocks
