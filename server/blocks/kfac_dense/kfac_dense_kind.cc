#include "server/blocks/kfac_dense/kfac_dense_kind.h"

#include "absl/strings/str_join.h"
#include "server/blocks/internal/dense_codec.h"
#include "server/blocks/internal/kfac_statistics_codec.h"
#include "server/blocks/kfac_dense/math/kfac_dense_block.h"
#include "server/blocks/kfac_dense/math/kfac_dense_options.h"
#include "server/wire/tensor_codec.h"

namespace natgrad::blocks {
namespace {

using natgrad::v1::BlockConfig;
using internal::SaturatingAdd;
using internal::SaturatingMul;
using internal::StepField;

using internal::TakeRank2Statistic;

// A packed factor (ReducedKfacStatistics.packed): a rank-1 tensor of
// d(d+1)/2 values, the upper triangle row by row. It stays rank 1 in the
// block's input; the block unpacks it straight into its state precision.
absl::StatusOr<core::DenseTensor> TakePackedFactor(bool present, natgrad::v1::Tensor* t,
                                                   int64_t d, const std::string& field) {
  if (!present) return absl::InvalidArgumentError(field + " is required");
  const int64_t want = d * (d + 1) / 2;
  if (t->shape_size() != 1 || t->shape(0) != want) {
    return absl::InvalidArgumentError(absl::StrCat(
        field, " is packed, so it must be a rank-1 tensor of d(d+1)/2 = ", want,
        " values (d = ", d, "), got shape [", absl::StrJoin(t->shape(), ", "), "]"));
  }
  return wire::TakeTensor(t, field);
}

class KfacDenseBlockKind final : public BlockKind {
 public:
  absl::string_view name() const override { return "kfac_dense"; }
  BlockConfig::KindCase config_case() const override { return BlockConfig::kKfacDense; }

  std::vector<int64_t> CanonicalShape(const BlockConfig& config) const override {
    if (config.shape_size() > 0) return {config.shape().begin(), config.shape().end()};
    const auto& k = config.kfac_dense();
    return internal::KfacLayerShape(k.d_in(), k.d_out(), k.has_bias());
  }

  absl::Status Validate(const BlockConfig& config, natgrad::v1::DType,
                        const std::string& field) const override {
    absl::StatusOr<core::KfacDenseOptions> o = Options(config, field);
    if (!o.ok()) return o.status();
    return Prefixed(core::NormalizeKfacDenseOptions(config.name(), *o).status(), field);
  }

  int64_t EstimateStateBytes(const BlockConfig& config,
                             natgrad::v1::DType state_dtype) const override {
    const auto& k = config.kfac_dense();
    const int64_t a = SaturatingAdd(std::max<int64_t>(k.d_in(), 0), k.has_bias() ? 1 : 0);
    const int64_t g = std::max<int64_t>(k.d_out(), 0);
    // EMA factors + momentum, then the installed and one in-flight
    // decomposition (eigen mode also keeps the eigenvalues); an async refresh
    // also keeps the factors it decomposed (the PSD test runs on them).
    const int64_t squares = SaturatingAdd(SaturatingMul(a, a), SaturatingMul(g, g));
    const int64_t decomposition = SaturatingAdd(squares, a + g);
    const int64_t elements = SaturatingAdd(
        SaturatingAdd(SaturatingAdd(squares, SaturatingMul(g, a)),
                      SaturatingMul(2, decomposition)),
        k.async_inversion() ? squares : 0);
    return SaturatingMul(internal::ElementBytes(state_dtype, 4), elements);
  }

  absl::StatusOr<std::unique_ptr<core::ParameterBlock>> NewBlock(
      const BlockConfig& config, natgrad::v1::DType state_dtype,
      const std::string& field) const override {
    absl::StatusOr<core::KfacDenseOptions> o = Options(config, field);
    if (!o.ok()) return o.status();
    auto block = core::NewKfacDenseBlock(
        config.name(), *o, internal::PrecisionOf(state_dtype, core::Precision::kFloat32));
    if (!block.ok()) return Prefixed(block.status(), field);
    return block;
  }

  std::optional<double> InitialDamping(const BlockConfig& config) const override {
    return internal::InitialKfacDamping(config.kfac_dense().damping());
  }

  absl::StatusOr<core::BlockStepInput> DecodeStep(natgrad::v1::BlockStep& step,
                                                  const BlockConfig& config,
                                                  ReplyFormat* reply) const override {
    absl::StatusOr<core::KfacStepInput> base = internal::DecodeKfacStepBase(step, name(), reply);
    if (!base.ok()) return base.status();
    core::KfacStepInput in = *std::move(base);
    if (!step.has_kfac()) return core::BlockStepInput(std::move(in));
    core::KfacStatisticsInput k;
    natgrad::v1::KfacStatistics& wire = *step.mutable_kfac();
    if (wire.has_raw()) {
      absl::StatusOr<core::KfacStatisticsInput> raw =
          internal::TakeRawKfacStatistics(step, *wire.mutable_raw());
      if (!raw.ok()) return raw.status();
      k = *std::move(raw);
    } else if (wire.has_reduced()) {
      auto& red = *wire.mutable_reduced();
      k.form = core::KfacStatisticsInput::Form::kReduced;
      const auto& kc = config.kfac_dense();
      const std::string a_field = StepField(step, "kfac.reduced.a_factor");
      const std::string g_field = StepField(step, "kfac.reduced.g_factor");
      auto a = red.packed() ? TakePackedFactor(red.has_a_factor(), red.mutable_a_factor(),
                                               kc.d_in() + (kc.has_bias() ? 1 : 0), a_field)
                            : TakeRank2Statistic(red.has_a_factor(), red.mutable_a_factor(), a_field);
      if (!a.ok()) return a.status();
      auto g = red.packed() ? TakePackedFactor(red.has_g_factor(), red.mutable_g_factor(),
                                               kc.d_out(), g_field)
                            : TakeRank2Statistic(red.has_g_factor(), red.mutable_g_factor(), g_field);
      if (!g.ok()) return g.status();
      k.a_factor = *std::move(a);
      k.g_factor = *std::move(g);
      k.num_examples = red.num_examples();
    } else {
      return absl::InvalidArgumentError(
          StepField(step, "kfac must set either raw or reduced statistics"));
    }
    in.kfac = std::move(k);
    return core::BlockStepInput(std::move(in));
  }

  void EncodeUpdate(core::BlockStepOutput& output, const ReplyFormat& reply,
                    natgrad::v1::BlockUpdate* update) const override {
    internal::EncodeDelta(output, reply, update);
  }

  std::vector<std::string> SnapshotTensorNames() const override {
    return {"a_ema",          "g_ema",          "momentum",
            "a_eigenvectors", "a_eigenvalues",  "g_eigenvectors",
            "g_eigenvalues",  "a_damped_inverse", "g_damped_inverse"};
  }

 private:
  static absl::Status Prefixed(const absl::Status& s, const std::string& field) {
    return internal::PrefixedKindStatus(s, field, "kfac_dense");
  }

  // Unset schedules stay null: the block applies its documented defaults.
  absl::StatusOr<core::KfacDenseOptions> Options(const BlockConfig& config,
                                                 const std::string& field) const {
    const auto& k = config.kfac_dense();
    const std::vector<int64_t> shape = CanonicalShape(config);
    const std::vector<int64_t> want = internal::KfacLayerShape(k.d_in(), k.d_out(), k.has_bias());
    if (shape != want) {
      return absl::InvalidArgumentError(absl::StrCat(
          field, ".shape: a kfac_dense block's shape is [d_out, d_in + has_bias] = [",
          absl::StrJoin(want, ", "), "], got [", absl::StrJoin(shape, ", "), "]"));
    }
    core::KfacDenseOptions o;
    absl::Status s = internal::ReadKfacLayerConfig(
        k, [&](absl::string_view param) { return absl::StrCat(field, ".kfac_dense.", param); },
        &o);
    if (!s.ok()) return s;
    switch (k.damping_mode()) {
      case natgrad::v1::EIGEN_EXACT:
        o.damping_mode = core::KfacDampingMode::kEigenExact;
        break;
      case natgrad::v1::FACTORED_TIKHONOV:
      case natgrad::v1::DAMPING_MODE_UNSPECIFIED:
        o.damping_mode = core::KfacDampingMode::kFactoredTikhonov;
        break;
      default:
        return absl::InvalidArgumentError(absl::StrCat(field, ".kfac_dense.damping_mode: unknown"));
    }
    o.stats_period = k.stats_period();
    o.async_inversion = k.async_inversion();
    o.max_staleness = k.max_staleness();
    return o;
  }
};

}  // namespace

const BlockKind& KfacDenseKind() {
  static const KfacDenseBlockKind kind;
  return kind;
}

}  // namespace natgrad::blocks
