#include "server/blocks/gaussian/gaussian_kind.h"

#include "absl/strings/str_join.h"
#include "server/blocks/internal/dense_codec.h"
#include "server/blocks/gaussian/math/gaussian_block.h"
#include "server/wire/tensor_codec.h"

namespace natgrad::blocks {
namespace {

using natgrad::v1::BlockConfig;
using natgrad::v1::Tensor;
using internal::SaturatingAdd;
using internal::SaturatingMul;
using internal::StepField;

int64_t Copies(const natgrad::v1::GaussianConfig& g) { return g.copies() > 0 ? g.copies() : 1; }

Eigen::MatrixXd StackRows(const std::vector<Eigen::VectorXd>& v) {
  if (v.empty()) return {};
  Eigen::MatrixXd m(v.size(), v[0].size());
  for (size_t i = 0; i < v.size(); ++i) m.row(i) = v[i].transpose();
  return m;
}

Eigen::MatrixXd StackBlocks(const std::vector<Eigen::MatrixXd>& v) {
  if (v.empty()) return {};
  const int64_t r = v[0].rows();
  Eigen::MatrixXd m(r * v.size(), v[0].cols());
  for (size_t i = 0; i < v.size(); ++i) m.middleRows(i * r, r) = v[i];
  return m;
}

// Shape [copies, rest...], or [rest...] accepted when copies = 1; a rest
// entry of -1 is any size (the sample count S).
absl::Status WantShape(Tensor& t, const std::string& field, int64_t copies,
                       const std::vector<int64_t>& rest, absl::string_view note = "") {
  const std::vector<int64_t> sent(t.shape().begin(), t.shape().end());
  if (copies == 1 && sent.size() == rest.size()) {
    t.clear_shape();
    t.add_shape(1);
    for (int64_t d : sent) t.add_shape(d);
  }
  const std::vector<int64_t> got(t.shape().begin(), t.shape().end());
  bool ok = got.size() == rest.size() + 1 && got[0] == copies;
  for (size_t k = 0; ok && k < rest.size(); ++k) ok = rest[k] < 0 || got[k + 1] == rest[k];
  if (!ok) {
    std::vector<std::string> want = {absl::StrCat(copies)};
    for (int64_t d : rest) want.push_back(d < 0 ? "S" : absl::StrCat(d));
    return absl::InvalidArgumentError(absl::StrCat(field, " has shape [", absl::StrJoin(sent, ", "),
                                                   "], want [", absl::StrJoin(want, ", "), "]",
                                                   note));
  }
  return absl::OkStatus();
}

absl::StatusOr<core::GaussianCompositionalInput> DecodeCompositional(
    const natgrad::v1::BlockStep& step, natgrad::v1::CompositionalGradient* c, int64_t copies,
    int64_t dim) {
  using Form = core::GaussianCompositionalInput::FisherForm;
  core::GaussianCompositionalInput out;
  const std::string base = StepField(step, "gaussian.compositional");
  switch (c->fisher_form()) {
    case natgrad::v1::LIKELIHOOD_FISHER_FULL:
      out.fisher_form = Form::kFull;
      break;
    case natgrad::v1::LIKELIHOOD_FISHER_DIAGONAL:
      out.fisher_form = Form::kDiagonal;
      break;
    case natgrad::v1::LIKELIHOOD_FISHER_SHARED:
      out.fisher_form = Form::kShared;
      break;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat(base, ".fisher_form must be LIKELIHOOD_FISHER_FULL, _DIAGONAL or _SHARED"));
  }
  struct Part {
    bool present;
    Tensor* t;
    const char* name;
  };
  for (Part p : {Part{c->has_samples(), c->mutable_samples(), "samples"},
                 Part{c->has_likelihood_gradients(), c->mutable_likelihood_gradients(),
                      "likelihood_gradients"},
                 Part{c->has_likelihood_fisher(), c->mutable_likelihood_fisher(),
                      "likelihood_fisher"}}) {
    const std::string pf = absl::StrCat(base, ".", p.name);
    if (!p.present) return absl::InvalidArgumentError(pf + " is required");
    if (absl::Status s = wire::ValidateTensor(*p.t, pf); !s.ok()) return s;
  }
  const std::string pf = base + ".";
  if (absl::Status s = WantShape(*c->mutable_samples(), pf + "samples", copies, {-1, dim});
      !s.ok()) {
    return s;
  }
  const int64_t ns = c->samples().shape(1);
  if (ns < 1) return absl::InvalidArgumentError(pf + "samples has no samples (S = 0)");
  if (absl::Status s = WantShape(*c->mutable_likelihood_gradients(), pf + "likelihood_gradients",
                                 copies, {ns, dim}, " (the samples' shape)");
      !s.ok()) {
    return s;
  }
  Tensor& f = *c->mutable_likelihood_fisher();
  absl::Status fs;
  switch (out.fisher_form) {
    case Form::kFull:
      fs = WantShape(f, pf + "likelihood_fisher", copies, {ns, dim, dim},
                     " (FULL: one M x M per sample)");
      break;
    case Form::kDiagonal:
      fs = WantShape(f, pf + "likelihood_fisher", copies, {ns, dim},
                     " (DIAGONAL: one diagonal per sample)");
      break;
    case Form::kShared:
      fs = WantShape(f, pf + "likelihood_fisher", copies, {dim, dim},
                     " (SHARED: one M x M per copy)");
      break;
  }
  if (!fs.ok()) return fs;
  out.samples = wire::DecodeSlices(c->samples());
  out.likelihood_gradients = wire::DecodeSlices(c->likelihood_gradients());
  std::vector<Eigen::MatrixXd> fisher = wire::DecodeSlices(f);
  if (out.fisher_form == Form::kFull) {
    // Each copy's slice is S x (M*M), row s the row-major F_s: restack as
    // (S*M) x M.
    for (Eigen::MatrixXd& x : fisher) {
      Eigen::MatrixXd stacked(ns * dim, dim);
      for (int64_t s = 0; s < ns; ++s) {
        for (int64_t i = 0; i < dim; ++i) {
          for (int64_t j = 0; j < dim; ++j) stacked(s * dim + i, j) = x(s, i * dim + j);
        }
      }
      x = std::move(stacked);
    }
  }
  out.likelihood_fisher = std::move(fisher);
  return out;
}

class GaussianBlockKind final : public BlockKind {
 public:
  absl::string_view name() const override { return "gaussian"; }
  BlockConfig::KindCase config_case() const override { return BlockConfig::kGaussian; }

  std::vector<int64_t> CanonicalShape(const BlockConfig& config) const override {
    if (config.shape_size() > 0) return {config.shape().begin(), config.shape().end()};
    return {Copies(config.gaussian()), config.gaussian().dim()};
  }

  absl::Status Validate(const BlockConfig& config, natgrad::v1::DType state_dtype,
                        const std::string& field) const override {
    // A Gaussian block holds scalars only; its matrices arrive with each step.
    return NewBlock(config, state_dtype, field).status();
  }

  int64_t EstimateStateBytes(const BlockConfig& config, natgrad::v1::DType) const override {
    // The step's working set: param and gradient matrices per copy, float64.
    const int64_t dim = std::max<int64_t>(config.gaussian().dim(), 0);
    return SaturatingMul(SaturatingMul(8, Copies(config.gaussian())),
                         SaturatingAdd(SaturatingMul(dim, dim), dim));
  }

  absl::StatusOr<std::unique_ptr<core::ParameterBlock>> NewBlock(
      const BlockConfig& config, natgrad::v1::DType state_dtype,
      const std::string& f) const override {
    const auto& g = config.gaussian();
    core::GaussianOptions o;
    o.dim = g.dim();
    o.copies = Copies(g);
    if (g.dim() <= 0) {
      return absl::InvalidArgumentError(absl::StrCat(f, ".gaussian.dim: must be positive"));
    }
    if (g.copies() < 0) {
      return absl::InvalidArgumentError(absl::StrCat(f, ".gaussian.copies: must be >= 0"));
    }
    const std::vector<int64_t> shape = CanonicalShape(config);
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
    auto gamma = internal::OptionalSchedule(g.gamma(), f + ".gaussian.gamma",
                                            internal::kNonNegative);
    if (!gamma.ok()) return gamma.status();
    o.gamma = *std::move(gamma);
    auto damping = internal::OptionalSchedule(g.likelihood_damping(),
                                              f + ".gaussian.likelihood_damping",
                                              internal::kNonNegative);
    if (!damping.ok()) return damping.status();
    o.likelihood_damping = *std::move(damping);
    switch (g.step_space()) {
      case natgrad::v1::GAUSSIAN_STEP_SPACE_UNSPECIFIED:
      case natgrad::v1::STEP_SPACE_THETA:
        o.step_space = core::GaussianStepSpace::kTheta;
        break;
      case natgrad::v1::STEP_SPACE_XI:
        o.step_space = core::GaussianStepSpace::kXi;
        break;
      default:
        return absl::InvalidArgumentError(absl::StrCat(f, ".gaussian.step_space: unknown value"));
    }
    // Wire: 0 (unset) is the default, negative disables the retries.
    if (g.max_halvings() > 0) o.max_halvings = g.max_halvings();
    if (g.max_halvings() < 0) o.max_halvings = 0;
    o.return_direction = g.return_direction();
    // Small, ill-conditioned problems: float64 unless float32 is asked for.
    auto block = core::NewGaussianBlock(
        config.name(), o, internal::PrecisionOf(state_dtype == natgrad::v1::FLOAT32
                                                    ? natgrad::v1::FLOAT32
                                                    : natgrad::v1::FLOAT64,
                                                core::Precision::kFloat64));
    if (!block.ok()) {
      return absl::InvalidArgumentError(absl::StrCat(f, ".gaussian: ", block.status().message()));
    }
    return block;
  }

  absl::StatusOr<core::BlockStepInput> DecodeStep(natgrad::v1::BlockStep& step,
                                                  const BlockConfig& config,
                                                  ReplyFormat* reply) const override {
    if (step.has_learning_rate()) {
      return absl::InvalidArgumentError(StepField(
          step, "learning_rate is not taken by a gaussian block (its step size is gamma)"));
    }
    if (step.has_gradient() || step.has_kfac()) {
      return absl::InvalidArgumentError(StepField(
          step, "gradient and kfac are not taken by a gaussian block; it takes its "
                "parameters and gradients in `gaussian`"));
    }
    if (!step.has_gaussian()) {
      return absl::InvalidArgumentError(StepField(step, "gaussian is required"));
    }
    natgrad::v1::GaussianStepInput& g = *step.mutable_gaussian();
    // Presence first: mutable_*() would create the fields.
    const bool present[4] = {g.has_param1(), g.has_param2(), g.has_grad1(), g.has_grad2()};
    Tensor* parts[4] = {g.mutable_param1(), g.mutable_param2(), g.mutable_grad1(),
                        g.mutable_grad2()};
    const char* names[4] = {"param1", "param2", "grad1", "grad2"};
    const int64_t copies = Copies(config.gaussian());
    const int64_t dim = config.gaussian().dim();
    reply->dtype = g.param1().dtype();
    reply->shapes = {{g.param1().shape().begin(), g.param1().shape().end()},
                     {g.param2().shape().begin(), g.param2().shape().end()}};
    core::GaussianStepInput in;
    const bool compositional = g.has_compositional();
    for (int i = 0; i < 4; ++i) {
      const std::string pf = StepField(step, absl::StrCat("gaussian.", names[i]));
      if (!present[i] && compositional && i >= 2) {
        // The rest of the objective's gradient may be left out: zero.
        if (i == 2) in.grad1.assign(copies, Eigen::VectorXd::Zero(dim));
        if (i == 3) in.grad2.assign(copies, Eigen::MatrixXd::Zero(dim, dim));
        continue;
      }
      if (!present[i]) return absl::InvalidArgumentError(pf + " is required");
      Tensor& t = *parts[i];
      if (absl::Status s = wire::ValidateTensor(t, pf); !s.ok()) return s;
      const int rank = (i % 2 == 0) ? 2 : 3;
      const std::vector<int64_t> sent(t.shape().begin(), t.shape().end());
      // Accept [dim] / [dim, dim] for a single copy; decode as [copies, ...].
      if (copies == 1 && t.shape_size() == rank - 1) {
        t.clear_shape();
        t.add_shape(1);
        for (int64_t d : sent) t.add_shape(d);
      }
      std::vector<int64_t> want = {copies, dim};
      if (rank == 3) want.push_back(dim);
      if (std::vector<int64_t>(t.shape().begin(), t.shape().end()) != want) {
        return absl::InvalidArgumentError(absl::StrCat(
            pf, " has shape [", absl::StrJoin(sent, ", "), "], want [",
            absl::StrJoin(want, ", "), "]"));
      }
      std::vector<Eigen::MatrixXd> slices = wire::DecodeSlices(t);
      if (rank == 2) {
        auto& dst = (i == 0) ? in.param1 : in.grad1;
        for (auto& s : slices) dst.push_back(s.col(0));  // each slice is dim x 1
      } else {
        auto& dst = (i == 1) ? in.param2 : in.grad2;
        for (auto& s : slices) dst.push_back(std::move(s));
      }
    }
    in.gradient_space = g.gradient_space() == natgrad::v1::PARAMETRIZATION_GRADIENT
                            ? core::GaussianStepInput::GradientSpace::kParametrization
                            : core::GaussianStepInput::GradientSpace::kExpectation;
    if (compositional) {
      absl::StatusOr<core::GaussianCompositionalInput> c =
          DecodeCompositional(step, g.mutable_compositional(), copies, dim);
      if (!c.ok()) return c.status();
      in.compositional = *std::move(c);
    }
    return core::BlockStepInput(std::move(in));
  }

  void EncodeUpdate(core::BlockStepOutput& output, const ReplyFormat& reply,
                    natgrad::v1::BlockUpdate* update) const override {
    for (const auto& [k, v] : output.hyperparameters) {
      (*update->mutable_hyperparameters())[k] = v;
    }
    const auto* g = std::get_if<core::GaussianStepOutput>(&output.kind_output);
    if (g == nullptr) return;
    natgrad::v1::GaussianUpdate* out = update->mutable_gaussian();
    const auto dt = reply.dtype;
    const std::vector<int64_t>& s1 = reply.shapes[0];
    const std::vector<int64_t>& s2 = reply.shapes[1];
    *out->mutable_param1() = wire::EncodeMatrix(StackRows(g->param1), dt, s1);
    *out->mutable_param2() = wire::EncodeMatrix(StackBlocks(g->param2), dt, s2);
    *out->mutable_delta1() = wire::EncodeMatrix(StackRows(g->delta1), dt, s1);
    *out->mutable_delta2() = wire::EncodeMatrix(StackBlocks(g->delta2), dt, s2);
    if (!g->direction1.empty()) {
      *out->mutable_direction1() = wire::EncodeMatrix(StackRows(g->direction1), dt, s1);
      *out->mutable_direction2() = wire::EncodeMatrix(StackBlocks(g->direction2), dt, s2);
    }
    out->set_gamma_used(g->gamma_used);
    out->set_halvings(g->halvings);
  }

  std::vector<std::string> SnapshotTensorNames() const override { return {}; }
};

}  // namespace

const BlockKind& GaussianKind() {
  static const GaussianBlockKind kind;
  return kind;
}

}  // namespace natgrad::blocks
