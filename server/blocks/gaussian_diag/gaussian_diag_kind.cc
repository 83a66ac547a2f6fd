#include "server/blocks/gaussian_diag/gaussian_diag_kind.h"


#include "absl/strings/str_join.h"
#include "server/blocks/gaussian_diag/math/gaussian_diag_block.h"
#include "server/blocks/internal/dense_codec.h"
#include "server/wire/tensor_codec.h"

namespace natgrad::blocks {
namespace {

using natgrad::v1::BlockConfig;
using internal::StepField;

int64_t Copies(const natgrad::v1::GaussianDiagConfig& g) {
  return g.copies() > 0 ? g.copies() : 1;
}

class GaussianDiagBlockKind final : public BlockKind {
 public:
  absl::string_view name() const override { return "gaussian_diag"; }
  BlockConfig::KindCase config_case() const override { return BlockConfig::kGaussianDiag; }

  std::vector<int64_t> CanonicalShape(const BlockConfig& config) const override {
    if (config.shape_size() > 0) return {config.shape().begin(), config.shape().end()};
    return {Copies(config.gaussian_diag()), config.gaussian_diag().dim()};
  }

  absl::Status Validate(const BlockConfig& config, natgrad::v1::DType,
                        const std::string& field) const override {
    return Options(config, field).status();
  }

  int64_t EstimateStateBytes(const BlockConfig& config, natgrad::v1::DType state_dtype) const override {
    // The step's working set: about 14 arrays of copies x dim.
    return internal::SaturatingMul(
        14 * internal::ElementBytes(state_dtype, 8),
        internal::SaturatingMul(Copies(config.gaussian_diag()),
                                std::max<int64_t>(config.gaussian_diag().dim(), 0)));
  }

  absl::StatusOr<std::unique_ptr<core::ParameterBlock>> NewBlock(
      const BlockConfig& config, natgrad::v1::DType state_dtype,
      const std::string& field) const override {
    absl::StatusOr<core::GaussianDiagOptions> o = Options(config, field);
    if (!o.ok()) return o.status();
    return core::NewGaussianDiagBlock(
        config.name(), *o, internal::PrecisionOf(state_dtype, core::Precision::kFloat64));
  }

  absl::StatusOr<core::BlockStepInput> DecodeStep(natgrad::v1::BlockStep& step,
                                                  const BlockConfig& config,
                                                  ReplyFormat* reply) const override {
    if (step.has_learning_rate() || step.has_gradient() || step.has_kfac()) {
      return absl::InvalidArgumentError(StepField(
          step, "gradient, kfac and learning_rate are not taken by a gaussian_diag block; it "
                "takes its parameters and gradients in `gaussian`"));
    }
    if (!step.has_gaussian()) {
      return absl::InvalidArgumentError(StepField(step, "gaussian is required"));
    }
    natgrad::v1::GaussianStepInput& g = *step.mutable_gaussian();
    if (g.has_compositional()) {
      return absl::InvalidArgumentError(StepField(
          step, "gaussian.compositional is taken by full gaussian blocks only, not gaussian_diag"));
    }
    const std::vector<int64_t> want = {Copies(config.gaussian_diag()),
                                       config.gaussian_diag().dim()};
    reply->dtype = g.param1().dtype();
    reply->shapes = {{g.param1().shape().begin(), g.param1().shape().end()}};
    core::GaussianDiagStepInput in;
    struct Part {
      bool present;
      natgrad::v1::Tensor* tensor;
      const char* name;
      core::DenseTensor* out;
    };
    for (Part p : {Part{g.has_param1(), g.mutable_param1(), "param1", &in.param1},
                   Part{g.has_param2(), g.mutable_param2(), "param2", &in.param2},
                   Part{g.has_grad1(), g.mutable_grad1(), "grad1", &in.grad1},
                   Part{g.has_grad2(), g.mutable_grad2(), "grad2", &in.grad2}}) {
      const std::string f = StepField(step, absl::StrCat("gaussian.", p.name));
      if (!p.present) return absl::InvalidArgumentError(f + " is required");
      std::vector<int64_t> shape(p.tensor->shape().begin(), p.tensor->shape().end());
      // A single copy may be sent as [dim].
      const bool ok = shape == want || (want[0] == 1 && shape == std::vector<int64_t>{want[1]});
      if (!ok) {
        return absl::InvalidArgumentError(absl::StrCat(f, " has shape [", absl::StrJoin(shape, ", "),
                                                       "], want [", absl::StrJoin(want, ", "), "]"));
      }
      absl::StatusOr<core::DenseTensor> t = wire::TakeTensor(p.tensor, f);
      if (!t.ok()) return t.status();
      *p.out = *std::move(t);
    }
    in.gradient_space = g.gradient_space() == natgrad::v1::PARAMETRIZATION_GRADIENT
                            ? core::GaussianStepInput::GradientSpace::kParametrization
                            : core::GaussianStepInput::GradientSpace::kExpectation;
    return core::BlockStepInput(std::move(in));
  }

  void EncodeUpdate(core::BlockStepOutput& output, const ReplyFormat& reply,
                    natgrad::v1::BlockUpdate* update) const override {
    for (const auto& [k, v] : output.hyperparameters) (*update->mutable_hyperparameters())[k] = v;
    auto* g = std::get_if<core::GaussianDiagStepOutput>(&output.kind_output);
    if (g == nullptr) return;
    natgrad::v1::GaussianUpdate* out = update->mutable_gaussian();
    const std::vector<int64_t>& shape = reply.shapes[0];
    const auto dt = reply.dtype;
    wire::EncodeTensor(std::move(g->param1), dt, shape, out->mutable_param1());
    wire::EncodeTensor(std::move(g->param2), dt, shape, out->mutable_param2());
    wire::EncodeTensor(std::move(g->delta1), dt, shape, out->mutable_delta1());
    wire::EncodeTensor(std::move(g->delta2), dt, shape, out->mutable_delta2());
    if (!g->direction1.empty()) {
      wire::EncodeTensor(std::move(g->direction1), dt, shape, out->mutable_direction1());
      wire::EncodeTensor(std::move(g->direction2), dt, shape, out->mutable_direction2());
    }
    out->set_gamma_used(g->gamma_used);
    out->set_halvings(g->halvings);
  }

  std::vector<std::string> SnapshotTensorNames() const override { return {}; }

 private:
  absl::StatusOr<core::GaussianDiagOptions> Options(const BlockConfig& config,
                                                    const std::string& f) const {
    const auto& g = config.gaussian_diag();
    core::GaussianDiagOptions o;
    o.dim = g.dim();
    o.copies = Copies(g);
    if (g.copies() < 0) {
      return absl::InvalidArgumentError(absl::StrCat(f, ".gaussian_diag.copies: must be >= 0"));
    }
    const std::vector<int64_t> shape = CanonicalShape(config);
    if (shape != std::vector<int64_t>{o.copies, o.dim}) {
      return absl::InvalidArgumentError(absl::StrCat(
          f, ".shape: a gaussian_diag block's shape is [copies, dim] = [", o.copies, ", ", o.dim,
          "], got [", absl::StrJoin(shape, ", "), "]"));
    }
    switch (g.parametrization()) {
      case natgrad::v1::DIAG_NATURAL:
        o.parametrization = core::GaussianDiagParametrization::kNatural;
        break;
      case natgrad::v1::DIAG_EXPECTATION:
        o.parametrization = core::GaussianDiagParametrization::kExpectation;
        break;
      case natgrad::v1::DIAG_MEAN_LOG_STD:
        o.parametrization = core::GaussianDiagParametrization::kMeanLogStd;
        break;
      case natgrad::v1::DIAG_MEAN_VARIANCE:
      case natgrad::v1::GAUSSIAN_DIAG_PARAMETRIZATION_UNSPECIFIED:
        o.parametrization = core::GaussianDiagParametrization::kMeanVariance;
        break;
      default:
        return absl::InvalidArgumentError(
            absl::StrCat(f, ".gaussian_diag.parametrization: unknown value"));
    }
    auto gamma = internal::OptionalSchedule(g.gamma(), f + ".gaussian_diag.gamma");
    if (!gamma.ok()) return gamma.status();
    o.gamma = *std::move(gamma);
    if (g.max_halvings() > 0) o.max_halvings = g.max_halvings();
    if (g.max_halvings() < 0) o.max_halvings = 0;
    o.return_direction = g.return_direction();
    switch (g.step_space()) {
      case natgrad::v1::GAUSSIAN_STEP_SPACE_UNSPECIFIED:
      case natgrad::v1::STEP_SPACE_THETA:
        o.step_space = core::GaussianDiagStepSpace::kTheta;
        break;
      case natgrad::v1::STEP_SPACE_XI:
        o.step_space = core::GaussianDiagStepSpace::kXi;
        break;
      default:
        return absl::InvalidArgumentError(
            absl::StrCat(f, ".gaussian_diag.step_space: unknown value"));
    }
    if (absl::Status s = core::ValidateGaussianDiagOptions(config.name(), o); !s.ok()) return s;
    return o;
  }
};

}  // namespace

const BlockKind& GaussianDiagKind() {
  static const GaussianDiagBlockKind kind;
  return kind;
}

}  // namespace natgrad::blocks
