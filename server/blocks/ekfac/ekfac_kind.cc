#include "server/blocks/ekfac/ekfac_kind.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "server/blocks/ekfac/math/ekfac_block.h"
#include "server/blocks/ekfac/math/ekfac_options.h"
#include "server/blocks/internal/dense_codec.h"
#include "server/blocks/internal/kfac_statistics_codec.h"

namespace natgrad::blocks {
namespace {

using natgrad::v1::BlockConfig;
using internal::StepField;

class EkfacBlockKind final : public BlockKind {
 public:
  absl::string_view name() const override { return "ekfac"; }
  BlockConfig::KindCase config_case() const override { return BlockConfig::kEkfac; }

  std::vector<int64_t> CanonicalShape(const BlockConfig& config) const override {
    if (config.shape_size() > 0) return {config.shape().begin(), config.shape().end()};
    const auto& k = config.ekfac();
    return internal::KfacLayerShape(k.d_in(), k.d_out(), k.has_bias());
  }

  absl::Status Validate(const BlockConfig& config, natgrad::v1::DType,
                        const std::string& field) const override {
    absl::StatusOr<core::EkfacOptions> o = Options(config, field);
    if (!o.ok()) return o.status();
    return Prefixed(core::NormalizeEkfacOptions(config.name(), *o).status(), field);
  }

  int64_t EstimateStateBytes(const BlockConfig& config,
                             natgrad::v1::DType state_dtype) const override {
    const auto& k = config.ekfac();
    core::EkfacOptions o;
    o.d_in = k.d_in();
    o.d_out = k.d_out();
    o.has_bias = k.has_bias();
    // Float32 unless the session asks for float64, as the block itself.
    return core::EkfacStateBytes(
        o, internal::PrecisionOf(state_dtype, core::Precision::kFloat32));
  }

  absl::StatusOr<std::unique_ptr<core::ParameterBlock>> NewBlock(
      const BlockConfig& config, natgrad::v1::DType state_dtype,
      const std::string& field) const override {
    absl::StatusOr<core::EkfacOptions> o = Options(config, field);
    if (!o.ok()) return o.status();
    auto block = core::NewEkfacBlock(
        config.name(), *o, internal::PrecisionOf(state_dtype, core::Precision::kFloat32));
    if (!block.ok()) return Prefixed(block.status(), field);
    return block;
  }

  // EKFAC has a quadratic model (diag(s) + lambda in the eigenbasis), so
  // session-wide Levenberg-Marquardt damping can drive its lambda.
  std::optional<double> InitialDamping(const BlockConfig& config) const override {
    return internal::InitialKfacDamping(config.ekfac().damping());
  }

  absl::StatusOr<core::BlockStepInput> DecodeStep(natgrad::v1::BlockStep& step,
                                                  const BlockConfig&,
                                                  ReplyFormat* reply) const override {
    absl::StatusOr<core::KfacStepInput> base = internal::DecodeKfacStepBase(step, name(), reply);
    if (!base.ok()) return base.status();
    core::KfacStepInput in = *std::move(base);
    // Missing statistics are the block's error (it names the step).
    if (!step.has_kfac()) return core::BlockStepInput(std::move(in));
    natgrad::v1::KfacStatistics& wire = *step.mutable_kfac();
    if (wire.has_reduced()) {
      return absl::InvalidArgumentError(StepField(
          step, "kfac.reduced: ekfac needs raw statistics (kfac.raw: per-example activations "
                "and output gradients); its scaling is estimated from per-example gradients, "
                "which reduced factors no longer hold"));
    }
    if (!wire.has_raw()) {
      return absl::InvalidArgumentError(
          StepField(step, "kfac must set raw statistics (ekfac needs raw statistics)"));
    }
    absl::StatusOr<core::KfacStatisticsInput> k =
        internal::TakeRawKfacStatistics(step, *wire.mutable_raw());
    if (!k.ok()) return k.status();
    in.kfac = *std::move(k);
    return core::BlockStepInput(std::move(in));
  }

  void EncodeUpdate(core::BlockStepOutput& output, const ReplyFormat& reply,
                    natgrad::v1::BlockUpdate* update) const override {
    internal::EncodeDelta(output, reply, update);
  }

  std::vector<std::string> SnapshotTensorNames() const override {
    return {"a_ema",    "g_ema",          "scaling_ema",
            "momentum", "a_eigenvectors", "g_eigenvectors"};
  }

 private:
  static absl::Status Prefixed(const absl::Status& s, const std::string& field) {
    return internal::PrefixedKindStatus(s, field, "ekfac");
  }

  // Unset schedules stay null: the block applies its documented defaults.
  absl::StatusOr<core::EkfacOptions> Options(const BlockConfig& config,
                                             const std::string& field) const {
    const auto& k = config.ekfac();
    const std::vector<int64_t> shape = CanonicalShape(config);
    const std::vector<int64_t> want = internal::KfacLayerShape(k.d_in(), k.d_out(), k.has_bias());
    if (shape != want) {
      return absl::InvalidArgumentError(absl::StrCat(
          field, ".shape: block ", core::QuotedBlockName(config.name()),
          ": an ekfac block's shape is [d_out, d_in + has_bias] = [",
          absl::StrJoin(want, ", "), "], got [", absl::StrJoin(shape, ", "), "]"));
    }
    core::EkfacOptions o;
    absl::Status s = internal::ReadKfacLayerConfig(
        k,
        [&](absl::string_view param) {
          return absl::StrCat(field, ": block ", core::QuotedBlockName(config.name()),
                              ": ekfac.", param);
        },
        &o);
    if (!s.ok()) return s;
    return o;
  }
};

}  // namespace

const BlockKind& EkfacKind() {
  static const EkfacBlockKind kind;
  return kind;
}

}  // namespace natgrad::blocks
