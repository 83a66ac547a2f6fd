#include "server/blocks/ekfac/math/ekfac_block.h"

#include <chrono>
#include <cmath>
#include <limits>
#include <map>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "server/blocks/ekfac/math/ekfac_kernels.h"
#include "server/core/block_error.h"
#include "server/core/engine_wait.h"
#include "server/core/first_order_checks.h"
#include "server/engine/inversion_engine.h"

namespace natgrad::core {
namespace {

using Clock = std::chrono::steady_clock;

// Shared with kfac_dense (kfac_step_checks.h).
using kfac::CheckedCast;
using kfac::CheckedTensor;
using kfac::Dot;

}  // namespace

// The result of Propose: the whole next state, computed up front, so Commit
// never reads the block and cannot fail.
template <typename Scalar>
class EkfacPendingUpdate final : public PendingBlockUpdate, public CurvatureModel {
 public:
  using Block = EkfacBlock<Scalar>;
  using Matrix = typename Block::Matrix;

  EkfacPendingUpdate(Block* block, int64_t step, typename Block::Hyperparameters hyper,
                     typename Block::State next, Matrix grad, Matrix v,
                     std::optional<Matrix> decayed_momentum, int64_t inversion_micros,
                     linalg::ComputePool* pool)
      : block_(block),
        step_(step),
        hyper_(hyper),
        next_(std::move(next)),
        grad_(std::move(grad)),
        v_(std::move(v)),
        decayed_momentum_(std::move(decayed_momentum)),
        inversion_micros_(inversion_micros),
        pool_(pool) {}

  const CurvatureModel* curvature() const override { return this; }
  double KlTerm() const override { return hyper_.lr * hyper_.lr * Dot(v_, grad_); }

  // EKFAC's own quadratic model of the loss change: the curvature is
  // diag(s) in the eigenbasis, so with D = U_G^T delta U_A,
  // <grad, delta> + 1/2 <s + lambda, D^2> (U orthogonal: |D| = |delta|).
  double PredictedReduction(double scale) const override {
    const Matrix delta = static_cast<Scalar>(-hyper_.lr) * Momentum(scale);
    const Matrix d = ekfac::Product<Scalar>(
        ekfac::Product<Scalar>(*next_.u_g, true, delta, false, pool_), false,
        *next_.u_a, false, pool_);
    const Matrix s = next_.s_sum / static_cast<Scalar>(next_.s_weight);
    const double quad =
        (s.template cast<double>().array() * d.template cast<double>().array().square()).sum();
    return Dot(grad_, delta) + 0.5 * quad +
           0.5 * hyper_.damping * delta.template cast<double>().squaredNorm();
  }

  BlockStepOutput Commit(double scale) override {
    Block& b = *block_;
    b.momentum_ = Momentum(scale);
    b.state_ = std::move(next_);
    b.last_step_ = step_;
    BlockStepOutput out;
    out.delta = DenseTensor::FromMatrix(static_cast<Scalar>(-hyper_.lr) * b.momentum_);
    out.hyperparameters = kfac::ReportedHyperparameters(hyper_, scale);
    out.inversion_micros = inversion_micros_;
    return out;
  }

 private:
  Matrix Momentum(double scale) const {
    return kfac::MomentumAt<Scalar>(scale, v_, decayed_momentum_);
  }

  Block* const block_;
  const int64_t step_;
  const typename Block::Hyperparameters hyper_;
  typename Block::State next_;
  const Matrix grad_;  // the gradient preconditioned: grad + wd W
  const Matrix v_;
  const std::optional<Matrix> decayed_momentum_;
  const int64_t inversion_micros_;
  linalg::ComputePool* const pool_;
};

template <typename Scalar>
EkfacBlock<Scalar>::EkfacBlock(std::string name, EkfacOptions options)
    : ParameterBlock(std::move(name)), options_(std::move(options)) {
  state_.a_sum = Matrix::Zero(a_dim(), a_dim());
  state_.g_sum = Matrix::Zero(g_dim(), g_dim());
  state_.s_sum = Matrix::Zero(g_dim(), a_dim());
  momentum_ = Matrix::Zero(g_dim(), a_dim());
}

template <typename Scalar>
bool EkfacBlock<Scalar>::IsBasisStep(int64_t step) const {
  return (step - 1) % options_.inverse_period == 0;
}

template <typename Scalar>
absl::Status EkfacBlock<Scalar>::Invalid(absl::string_view field,
                                         absl::string_view what) const {
  return InvalidBlockField(name(), field, what);
}

template <typename Scalar>
absl::StatusOr<typename EkfacBlock<Scalar>::Hyperparameters>
EkfacBlock<Scalar>::ResolveHyperparameters(int64_t t, const KfacStepInput& input,
                                           const StepContext& context) const {
  return kfac::ResolveStepHyperparameters(name(), t, input, context, options_.learning_rate,
                                          options_.damping, options_.momentum,
                                          options_.weight_decay);
}

template <typename Scalar>
absl::StatusOr<std::unique_ptr<PendingBlockUpdate>> EkfacBlock<Scalar>::Propose(
    const BlockStepInput& step_input, const StepContext& context) {
  absl::StatusOr<const KfacStepInput*> in = InputOf<KfacStepInput>(step_input);
  if (!in.ok()) return in.status();
  const KfacStepInput& input = **in;
  const int64_t t = context.step;
  if (absl::Status s = kfac::CheckStepOrder(name(), t, last_step_); !s.ok()) return s;
  const Eigen::Index ad = a_dim(), gd = g_dim();
  absl::StatusOr<kfac::StepTensors<Scalar>> tensors =
      kfac::CheckedStepTensors<Scalar>(name(), input, gd, ad);
  if (!tensors.ok()) return tensors.status();
  std::optional<Matrix>& params = tensors->params;

  // The statistics: raw, at every step.
  if (!input.kfac) {
    return Invalid("kfac", absl::StrCat("statistics are missing at step ", t,
                                        "; ekfac re-estimates its scaling every step and "
                                        "needs raw statistics (kfac.raw) with every step"));
  }
  const KfacStatisticsInput& stats = *input.kfac;
  if (stats.form != KfacStatisticsInput::Form::kRaw) {
    return Invalid("kfac.reduced",
                   "is not accepted: ekfac needs raw statistics (kfac.raw: per-example "
                   "activations and output gradients), since its scaling is estimated from "
                   "per-example gradients that reduced factors no longer hold");
  }
  absl::StatusOr<kfac::RawStatistics<Scalar>> raw =
      kfac::CheckedRawStatistics<Scalar>(name(), stats, options_.d_in, gd, options_.locations);
  if (!raw.ok()) return raw.status();
  const int64_t rows = raw->rows;
  const int64_t loc = raw->locations;
  const int64_t n = raw->examples();
  const Matrix* a_raw = &raw->a;
  const Matrix* gs = &raw->g;
  Matrix abar(rows, ad);
  abar.leftCols(options_.d_in) = *a_raw;
  if (options_.has_bias) abar.col(ad - 1).setOnes();

  absl::StatusOr<Hyperparameters> hyper = ResolveHyperparameters(t, input, context);
  if (!hyper.ok()) return hyper.status();

  // 1. The factors: kfac_dense's KFC scaling, A over the n examples and G
  //    over the n*T rows, into zero-started EMAs (factor = sum / weight).
  const Matrix a_batch = kfac::GramFactor<Scalar>(abar, false, static_cast<Scalar>(n), context.compute_pool);
  const Matrix g_batch = kfac::GramFactor<Scalar>(*gs, false, static_cast<Scalar>(rows), context.compute_pool);
  if (!a_batch.allFinite()) return Invalid("kfac.raw.activations", "overflows in a^T a / n");
  if (!g_batch.allFinite()) {
    return Invalid("kfac.raw.output_gradients", "overflows in g^T g / (n T)");
  }
  const double rho = options_.ema_decay;
  const Scalar rho_s = static_cast<Scalar>(rho);
  State next;
  next.a_sum = rho_s * state_.a_sum + (Scalar(1) - rho_s) * a_batch;
  next.g_sum = rho_s * state_.g_sum + (Scalar(1) - rho_s) * g_batch;
  next.weight = rho * state_.weight + (1.0 - rho);
  next.updates = state_.updates + 1;

  // 2. The eigenbasis: refreshed from the new factors on basis steps; both
  //    jobs are submitted before waiting on either so the engine batches them
  //    with other blocks' and sessions'.
  int64_t inversion_micros = 0;
  const bool refresh = RefreshesBasis(t);
  if (refresh) {
    if (context.engine == nullptr) {
      return BlockError(absl::StatusCode::kInternal, name(), "",
                        "has no inversion engine in the step context");
    }
    const Scalar inv_w = static_cast<Scalar>(1.0 / next.weight);
    const Clock::time_point start = Clock::now();
    auto fa = context.engine->Submit(Matrix(inv_w * next.a_sum), engine::DecompositionKind::kEigh);
    auto fg = context.engine->Submit(Matrix(inv_w * next.g_sum), engine::DecompositionKind::kEigh);
    for (auto [future, dim, which, out] :
         {std::tuple{&fa, ad, 'A', &next.u_a}, std::tuple{&fg, gd, 'G', &next.u_g}}) {
      WaitForEngine(*future);
      absl::StatusOr<engine::Decomposition<Scalar>> r = future->get();
      if (!r.ok()) {
        return BlockError(r.status().code(), name(), absl::StrCat("factor ", std::string(1, which)),
                          absl::StrCat("could not be decomposed at step ", t, ": ",
                                       r.status().message()));
      }
      if (r->matrix.rows() != dim || r->matrix.cols() != dim || !r->matrix.allFinite()) {
        return BlockError(absl::StatusCode::kInternal, name(),
                          absl::StrCat("factor ", std::string(1, which)),
                          "got a malformed or non-finite decomposition from the engine");
      }
      *out = std::make_shared<const Matrix>(std::move(r->matrix));
    }
    inversion_micros = std::chrono::duration_cast<std::chrono::microseconds>(
                           Clock::now() - start).count();
    next.basis_step = t;
  } else {
    next.u_a = state_.u_a;
    next.u_g = state_.u_g;
    next.basis_step = state_.basis_step;
  }

  // 3. The scaling in this basis, from this step's per-example gradients; its
  //    EMA restarts with a new basis (the old one's scaling belongs to other
  //    directions), as the paper recomputes it after each eigendecomposition.
  const Matrix aa = ekfac::Product<Scalar>(abar, false, *next.u_a, false, context.compute_pool);
  const Matrix ga = ekfac::Product<Scalar>(*gs, false, *next.u_g, false, context.compute_pool);
  const Matrix s_batch = ekfac::ScalingEstimate<Scalar>(ga, aa, loc, context.compute_pool);
  if (!s_batch.allFinite()) {
    return Invalid("kfac.raw.output_gradients",
                   "overflows in the per-example gradients' squares (the scaling)");
  }
  if (refresh) {
    next.s_sum = (Scalar(1) - rho_s) * s_batch;
    next.s_weight = 1.0 - rho;
    next.s_updates = 1;
  } else {
    next.s_sum = rho_s * state_.s_sum + (Scalar(1) - rho_s) * s_batch;
    next.s_weight = rho * state_.s_weight + (1.0 - rho);
    next.s_updates = state_.s_updates + 1;
  }

  // 4. The update.
  Matrix g = std::move(tensors->gradient);
  if (params && hyper->weight_decay != 0) {
    g += static_cast<Scalar>(hyper->weight_decay) * *params;
  }
  const Matrix scaling = next.s_sum / static_cast<Scalar>(next.s_weight);
  Matrix v = ekfac::PreconditionScaled<Scalar>(*next.u_g, *next.u_a, scaling, g,
                                               static_cast<Scalar>(hyper->damping),
                                               context.compute_pool);
  if (!v.allFinite()) {
    return Invalid("gradient",
                   "gives a non-finite preconditioned gradient; the damping is too small "
                   "for the scaling");
  }
  std::optional<Matrix> decayed;
  if (hyper->momentum != 0) decayed = static_cast<Scalar>(hyper->momentum) * momentum_;
  if (absl::Status s = kfac::CheckCommittable<Scalar>(name(), v, decayed, hyper->lr,
                                                      input.gradient.dtype());
      !s.ok()) {
    return s;
  }
  return std::make_unique<EkfacPendingUpdate<Scalar>>(this, t, *hyper, std::move(next), std::move(g),
                                                      std::move(v), std::move(decayed),
                                                      inversion_micros, context.compute_pool);
}

template <typename Scalar>
BlockState EkfacBlock<Scalar>::ExportState() const {
  BlockState s;
  s.tensors["a_ema"] = state_.a_sum.template cast<double>();
  s.tensors["g_ema"] = state_.g_sum.template cast<double>();
  s.tensors["scaling_ema"] = state_.s_sum.template cast<double>();
  s.tensors["momentum"] = momentum_.template cast<double>();
  if (state_.basis_step > 0) {
    s.tensors["a_eigenvectors"] = state_.u_a->template cast<double>();
    s.tensors["g_eigenvectors"] = state_.u_g->template cast<double>();
  }
  s.scalars["ema_weight"] = state_.weight;
  s.scalars["stats_updates"] = static_cast<double>(state_.updates);
  s.scalars["scaling_weight"] = state_.s_weight;
  s.scalars["scaling_updates"] = static_cast<double>(state_.s_updates);
  s.scalars["last_step"] = static_cast<double>(last_step_);
  s.scalars["basis_step"] = static_cast<double>(state_.basis_step);
  return s;
}

template <typename Scalar>
absl::Status EkfacBlock<Scalar>::ImportState(const BlockState& state) {
  const Eigen::Index ad = a_dim(), gd = g_dim();
  auto bad = [&](absl::string_view what) { return InvalidBlockField(name(), "state", what); };
  auto scalar = [&](const std::string& key, bool integer, double lo,
                    double hi) -> absl::StatusOr<double> {
    auto it = state.scalars.find(key);
    if (it == state.scalars.end()) return bad(absl::StrCat("scalar \"", key, "\" is missing"));
    const double v = it->second;
    if (!std::isfinite(v) || v < lo || v > hi || (integer && v != std::floor(v))) {
      return bad(absl::StrCat("scalar \"", key, "\" is ", v, ", want ",
                              integer ? "an integer " : "", "in [", lo, ", ", hi, "]"));
    }
    return v;
  };
  constexpr double kMaxCount = 9007199254740992.0;  // 2^53
  std::map<std::string, double> v;
  for (auto [key, integer, hi] : {std::tuple{"ema_weight", false, 1.0},
                                  std::tuple{"stats_updates", true, kMaxCount},
                                  std::tuple{"scaling_weight", false, 1.0},
                                  std::tuple{"scaling_updates", true, kMaxCount},
                                  std::tuple{"last_step", true, kMaxCount},
                                  std::tuple{"basis_step", true, kMaxCount}}) {
    absl::StatusOr<double> x = scalar(key, integer, 0, hi);
    if (!x.ok()) return x.status();
    v[key] = *x;
  }
  if ((v["stats_updates"] == 0) != (v["ema_weight"] == 0)) {
    return bad("ema_weight and stats_updates disagree (one is 0, the other not)");
  }
  if ((v["scaling_updates"] == 0) != (v["scaling_weight"] == 0)) {
    return bad("scaling_weight and scaling_updates disagree (one is 0, the other not)");
  }
  const bool has_basis = v["basis_step"] > 0;
  if (has_basis && (v["stats_updates"] == 0 || v["scaling_updates"] == 0)) {
    return bad("basis_step is set but no statistics were folded");
  }
  std::vector<std::pair<std::string, std::pair<Eigen::Index, Eigen::Index>>> want = {
      {"a_ema", {ad, ad}}, {"g_ema", {gd, gd}}, {"scaling_ema", {gd, ad}}, {"momentum", {gd, ad}}};
  if (has_basis) {
    want.push_back({"a_eigenvectors", {ad, ad}});
    want.push_back({"g_eigenvectors", {gd, gd}});
  }
  for (const auto& [key, unused] : state.tensors) {
    bool known = false;
    for (const auto& w : want) known = known || w.first == key;
    if (!known) {
      return bad(absl::StrCat("tensor \"", key, "\" is not expected (", kEkfacKind,
                              " block, basis_step ", v["basis_step"], ")"));
    }
  }
  std::map<std::string, Matrix> cast;
  for (const auto& [key, shape] : want) {
    auto it = state.tensors.find(key);
    if (it == state.tensors.end()) return bad(absl::StrCat("tensor \"", key, "\" is missing"));
    absl::StatusOr<Matrix> m = CheckedCast<Scalar>(
        name(), absl::StrCat("state tensor \"", key, "\""), it->second, shape.first, shape.second);
    if (!m.ok()) return m.status();
    cast[key] = *std::move(m);
  }
  State s;
  s.a_sum = std::move(cast["a_ema"]);
  s.g_sum = std::move(cast["g_ema"]);
  s.s_sum = std::move(cast["scaling_ema"]);
  if ((s.s_sum.array() < 0).any()) return bad("tensor \"scaling_ema\" has a negative entry");
  s.weight = v["ema_weight"];
  s.updates = static_cast<int64_t>(v["stats_updates"]);
  s.s_weight = v["scaling_weight"];
  s.s_updates = static_cast<int64_t>(v["scaling_updates"]);
  s.basis_step = static_cast<int64_t>(v["basis_step"]);
  if (has_basis) {
    s.u_a = std::make_shared<const Matrix>(std::move(cast["a_eigenvectors"]));
    s.u_g = std::make_shared<const Matrix>(std::move(cast["g_eigenvectors"]));
  }
  state_ = std::move(s);
  momentum_ = std::move(cast["momentum"]);
  last_step_ = static_cast<int64_t>(v["last_step"]);
  return absl::OkStatus();
}

template <typename Scalar>
int64_t EkfacBlock<Scalar>::StateBytes() const {
  int64_t n = state_.a_sum.size() + state_.g_sum.size() + state_.s_sum.size() + momentum_.size();
  if (state_.u_a) n += state_.u_a->size();
  if (state_.u_g) n += state_.u_g->size();
  return n * static_cast<int64_t>(sizeof(Scalar));
}

template class EkfacBlock<float>;
template class EkfacBlock<double>;

absl::StatusOr<std::unique_ptr<ParameterBlock>> NewEkfacBlock(std::string name,
                                                              const EkfacOptions& options,
                                                              Precision precision) {
  absl::StatusOr<EkfacOptions> normalized = NormalizeEkfacOptions(name, options);
  if (!normalized.ok()) return normalized.status();
  switch (precision) {
    case Precision::kFloat32:
      return std::make_unique<EkfacBlock<float>>(std::move(name), *std::move(normalized));
    case Precision::kFloat64:
      return std::make_unique<EkfacBlock<double>>(std::move(name), *std::move(normalized));
  }
  return InvalidBlockField(name, "precision", "is unknown");
}

}  // namespace natgrad::core
