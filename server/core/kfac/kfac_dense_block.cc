#include "server/core/kfac/kfac_dense_block.h"

#include <chrono>
#include <cmath>
#include <limits>
#include <map>
#include <tuple>
#include <utility>
#include <vector>

#include "Eigen/Cholesky"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "server/core/kfac/kfac_kernels.h"

namespace natgrad::core {
namespace {

using engine::DecompositionKind;

// Relative tolerance for "symmetric and PSD up to rounding" of factors the
// client reduced itself (float32 Gram matrices of many rows drift ~1e-6).
constexpr double kFactorTolerance = 1e-4;

using Clock = std::chrono::steady_clock;

int64_t MicrosSince(Clock::time_point start) {
  return std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() -
                                                               start)
      .count();
}

std::string Shape(Eigen::Index rows, Eigen::Index cols) {
  return absl::StrCat("[", rows, ", ", cols, "]");
}

absl::Status InvalidField(absl::string_view block, absl::string_view field,
                          absl::string_view what) {
  return absl::InvalidArgumentError(
      absl::StrCat("block \"", block, "\": ", field, " ", what));
}

// "" when all finite, else where the first non-finite value is.
std::string NonFiniteAt(const Eigen::MatrixXd& m) {
  if (m.allFinite()) return "";
  for (Eigen::Index j = 0; j < m.cols(); ++j) {
    for (Eigen::Index i = 0; i < m.rows(); ++i) {
      if (!std::isfinite(m(i, j))) {
        return absl::StrCat("has a non-finite value (", m(i, j), ") at [", i,
                            ", ", j, "]");
      }
    }
  }
  return "";
}

// Shape and finiteness of a client matrix, then the cast to the state
// precision (float32 blocks also refuse values beyond float range).
template <typename Scalar>
absl::StatusOr<kfac::Matrix<Scalar>> CheckedCast(absl::string_view block,
                                                 absl::string_view field,
                                                 const Eigen::MatrixXd& m,
                                                 Eigen::Index rows,
                                                 Eigen::Index cols) {
  if (m.rows() != rows || m.cols() != cols) {
    return InvalidField(block, field,
                        absl::StrCat("has shape ", Shape(m.rows(), m.cols()),
                                     ", want ", Shape(rows, cols)));
  }
  if (std::string where = NonFiniteAt(m); !where.empty()) {
    return InvalidField(block, field, where);
  }
  kfac::Matrix<Scalar> out = m.template cast<Scalar>();
  if (!out.allFinite()) {
    return InvalidField(block, field, "has values beyond float32 range");
  }
  return out;
}

// A reduced factor from the client: square, finite, symmetric and PSD up to
// rounding. The PSD test is a Cholesky of X + delta I in float64 (O(d^3/3),
// a sixth of the preconditioning GEMMs), delta = tol * max diag.
template <typename Scalar>
absl::StatusOr<kfac::Matrix<Scalar>> CheckedFactor(absl::string_view block,
                                                   absl::string_view field,
                                                   const Eigen::MatrixXd& x,
                                                   Eigen::Index dim) {
  if (x.rows() != dim || x.cols() != dim) {
    return InvalidField(block, field,
                        absl::StrCat("has shape ", Shape(x.rows(), x.cols()),
                                     ", want ", Shape(dim, dim)));
  }
  if (std::string where = NonFiniteAt(x); !where.empty()) {
    return InvalidField(block, field, where);
  }
  const double max_abs = x.cwiseAbs().maxCoeff();
  const double asym = (x - x.transpose()).cwiseAbs().maxCoeff();
  if (asym > kFactorTolerance * max_abs) {
    return InvalidField(block, field,
                        absl::StrCat("is not symmetric (max |X - X^T| = ",
                                     asym, ", max |X| = ", max_abs, ")"));
  }
  const double max_diag = x.diagonal().cwiseAbs().maxCoeff();
  const double delta = kFactorTolerance * max_diag +
                       std::numeric_limits<double>::min() * dim;
  const Eigen::Index neg = [&] {
    Eigen::Index i;
    return x.diagonal().minCoeff(&i) < -delta ? i : Eigen::Index{-1};
  }();
  if (neg >= 0) {
    return InvalidField(block, field,
                        absl::StrCat("has a negative diagonal entry ",
                                     x(neg, neg), " at [", neg, ", ", neg,
                                     "]; a covariance is PSD"));
  }
  Eigen::MatrixXd sym = 0.5 * (x + x.transpose());
  Eigen::MatrixXd shifted = sym;
  shifted.diagonal().array() += delta;
  if (Eigen::LLT<Eigen::MatrixXd> llt(shifted); llt.info() != Eigen::Success) {
    return InvalidField(block, field,
                        "is not positive semidefinite beyond rounding");
  }
  kfac::Matrix<Scalar> out = sym.template cast<Scalar>();
  if (!out.allFinite()) {
    return InvalidField(block, field, "has values beyond float32 range");
  }
  return out;
}

template <typename Scalar>
bool IsReady(const std::shared_future<
             absl::StatusOr<engine::Decomposition<Scalar>>>& f) {
  return f.valid() &&
         f.wait_for(std::chrono::seconds(0)) == std::future_status::ready;
}

template <typename Scalar>
double Dot(const kfac::Matrix<Scalar>& x, const kfac::Matrix<Scalar>& y) {
  return (x.template cast<double>().array() * y.template cast<double>().array())
      .sum();
}

}  // namespace

// The result of Propose: everything Commit installs, computed up front.
template <typename Scalar>
class KfacDensePendingUpdate final : public PendingBlockUpdate {
 public:
  using Block = KfacDenseBlock<Scalar>;
  using Matrix = typename Block::Matrix;

  explicit KfacDensePendingUpdate(Block* block) : block_(block) {}

  bool clipped_by_kl() const override { return true; }
  double KlTerm() const override { return lr * lr * Dot(v, grad); }

  // The K-FAC quadratic model of the loss change for the committed delta,
  // with the current (not the possibly stale decomposed) factors and this
  // step's lambda: <grad, delta> + 1/2 <delta, G delta A> + 1/2 lambda |delta|^2.
  double PredictedReduction(double kl_scale) const override {
    const Matrix delta = static_cast<Scalar>(-lr) * Momentum(kl_scale);
    // After Commit the new EMA sums live in the block.
    const bool own = a_ema && !committed_;
    const Matrix& a_sum = own ? *a_ema : block_->a_ema_;
    const Matrix& g_sum = own ? *g_ema : block_->g_ema_;
    const Scalar inv_w = static_cast<Scalar>(1.0 / ema_weight);
    const Matrix g_factor = inv_w * g_sum;
    const Matrix a_factor = inv_w * a_sum;
    const Matrix curvature = kfac::Product<Scalar>(
        kfac::Product<Scalar>(g_factor, false, delta, false, pool), false,
        a_factor, false, pool);
    return Dot(grad, delta) + 0.5 * Dot(delta, curvature) +
           0.5 * damping * delta.template cast<double>().squaredNorm();
  }

  BlockStepOutput Commit(double kl_scale) override {
    Block& b = *block_;
    b.momentum_ = Momentum(kl_scale);
    if (a_ema) {
      b.a_ema_ = std::move(*a_ema);
      b.g_ema_ = std::move(*g_ema);
      b.ema_weight_ = ema_weight;
      b.stats_updates_ = stats_updates;
    }
    if (clear_in_flight) b.in_flight_.reset();
    if (start_in_flight) b.in_flight_ = std::move(*start_in_flight);
    if (install) b.decomp_ = std::move(*install);
    b.last_step_ = step;
    committed_ = true;

    BlockStepOutput out;
    out.delta = (static_cast<Scalar>(-lr) * b.momentum_).template cast<double>();
    out.hyperparameters = {{"learning_rate", lr},
                           {"damping", damping},
                           {"momentum", momentum},
                           {"weight_decay", weight_decay},
                           {"kl_scale", kl_scale}};
    out.inversion_micros = inversion_micros;
    return out;
  }

  int64_t step = 0;
  double lr = 0, damping = 0, momentum = 0, weight_decay = 0;
  Matrix grad;  // the gradient preconditioned: grad + wd W
  Matrix v;     // the preconditioned gradient
  std::optional<Matrix> decayed_momentum;  // mu m_old, when mu != 0
  // New EMA state when this step folds statistics.
  std::optional<Matrix> a_ema, g_ema;
  double ema_weight = 0;
  int64_t stats_updates = 0;
  std::optional<typename Block::Decomp> install;
  bool clear_in_flight = false;
  std::optional<typename Block::Refresh> start_in_flight;
  int64_t inversion_micros = 0;
  linalg::ComputePool* pool = nullptr;  // context.compute_pool of Propose

 private:
  // mu m_old + nu V, independent of the block (valid after Commit too).
  Matrix Momentum(double kl_scale) const {
    Matrix m = static_cast<Scalar>(kl_scale) * v;
    if (decayed_momentum) m += *decayed_momentum;
    return m;
  }

  Block* block_;
  bool committed_ = false;
};

template <typename Scalar>
KfacDenseBlock<Scalar>::KfacDenseBlock(std::string name,
                                       KfacDenseOptions options)
    : ParameterBlock(std::move(name)), options_(std::move(options)) {
  a_ema_ = Matrix::Zero(a_dim(), a_dim());
  g_ema_ = Matrix::Zero(g_dim(), g_dim());
  momentum_ = Matrix::Zero(g_dim(), a_dim());
}

template <typename Scalar>
bool KfacDenseBlock<Scalar>::IsStatsStep(int64_t step) const {
  return (step - 1) % options_.stats_period == 0;
}

template <typename Scalar>
bool KfacDenseBlock<Scalar>::IsInverseStep(int64_t step) const {
  return (step - 1) % options_.inverse_period == 0;
}

template <typename Scalar>
absl::Status KfacDenseBlock<Scalar>::Invalid(absl::string_view field,
                                             absl::string_view what) const {
  return InvalidField(name(), field, what);
}

template <typename Scalar>
absl::StatusOr<typename KfacDenseBlock<Scalar>::Decomp>
KfacDenseBlock<Scalar>::Resolve(const Refresh& refresh) const {
  const bool eigen = options_.damping_mode == KfacDampingMode::kEigenExact;
  Decomp d;
  d.step = refresh.step;
  d.damping = refresh.damping;
  for (auto [future, dim, which] :
       {std::tuple{&refresh.a, a_dim(), 'A'},
        std::tuple{&refresh.g, g_dim(), 'G'}}) {
    const absl::StatusOr<engine::Decomposition<Scalar>>& r = future->get();
    if (!r.ok()) {
      return absl::Status(
          r.status().code(),
          absl::StrCat("block \"", name(), "\": decomposing factor ", 
                       std::string(1, which), " at step ", refresh.step, ": ",
                       r.status().message()));
    }
    const bool bad_shape =
        r->matrix.rows() != dim || r->matrix.cols() != dim ||
        (eigen && r->eigenvalues.size() != dim);
    if (bad_shape || !r->matrix.allFinite() ||
        (eigen && !r->eigenvalues.allFinite())) {
      return absl::InternalError(absl::StrCat(
          "block \"", name(), "\": the engine returned a malformed or "
          "non-finite decomposition of factor ", std::string(1, which)));
    }
    Matrix& m = which == 'A' ? d.a : d.g;
    m = r->matrix;
    if (eigen) {
      (which == 'A' ? d.a_values : d.g_values) =
          r->eigenvalues.cwiseMax(Scalar(0));
    }
  }
  return d;
}

template <typename Scalar>
absl::StatusOr<std::unique_ptr<PendingBlockUpdate>>
KfacDenseBlock<Scalar>::Propose(const BlockStepInput& input,
                                const StepContext& context) {
  const int64_t t = context.step;
  if (t < 1) return Invalid("step", absl::StrCat("is ", t, ", want >= 1"));
  if (t <= last_step_) {
    return absl::FailedPreconditionError(
        absl::StrCat("block \"", name(), "\": step ", t,
                     " is not after the block's last step ", last_step_));
  }
  const Eigen::Index ad = a_dim(), gd = g_dim();
  auto pending = std::make_unique<KfacDensePendingUpdate<Scalar>>(this);
  pending->step = t;
  pending->pool = context.compute_pool;

  // Gradient and parameters.
  absl::StatusOr<Matrix> grad =
      CheckedCast<Scalar>(name(), "gradient", input.gradient, gd, ad);
  if (!grad.ok()) return grad.status();
  std::optional<Matrix> params;
  if (input.params) {
    absl::StatusOr<Matrix> p =
        CheckedCast<Scalar>(name(), "params", *input.params, gd, ad);
    if (!p.ok()) return p.status();
    params = *std::move(p);
  }

  // Statistics: validated whenever sent, folded only on statistics steps
  // (and whenever none has been folded yet, so factors always exist).
  const bool fold = IsStatsStep(t) || stats_updates_ == 0;
  std::optional<Matrix> a_batch, g_batch;
  if (input.kfac) {
    const KfacStatisticsInput& s = *input.kfac;
    if (s.form == KfacStatisticsInput::Form::kRaw) {
      const Eigen::MatrixXd& a = s.activations;
      const Eigen::MatrixXd& g = s.output_gradients;
      const int64_t rows = a.rows();
      const int64_t loc = options_.locations;
      if (a.cols() != options_.d_in) {
        return Invalid("kfac.raw.activations",
                       absl::StrCat("has ", a.cols(), " columns, want ",
                                    options_.d_in));
      }
      if (g.cols() != gd) {
        return Invalid("kfac.raw.output_gradients",
                       absl::StrCat("has ", g.cols(), " columns, want ", gd));
      }
      if (rows == 0) return Invalid("kfac.raw.activations", "has 0 rows");
      if (g.rows() != rows) {
        return Invalid("kfac.raw.output_gradients",
                       absl::StrCat("has ", g.rows(), " rows, want ", rows,
                                    " (as kfac.raw.activations)"));
      }
      if (rows % loc != 0) {
        return Invalid("kfac.raw.activations",
                       absl::StrCat("has ", rows, " rows, want a multiple of "
                                    "locations (", loc, ")"));
      }
      absl::StatusOr<Matrix> as =
          CheckedCast<Scalar>(name(), "kfac.raw.activations", a, rows, a.cols());
      if (!as.ok()) return as.status();
      absl::StatusOr<Matrix> gs = CheckedCast<Scalar>(
          name(), "kfac.raw.output_gradients", g, rows, g.cols());
      if (!gs.ok()) return gs.status();
      if (fold) {
        // KFC scaling (kfac-jax): A over the n examples, G over n*T rows.
        a_batch = kfac::GramFactor<Scalar>(*as, options_.has_bias,
                                           static_cast<Scalar>(rows / loc),
                                           context.compute_pool);
        g_batch = kfac::GramFactor<Scalar>(*gs, false,
                                           static_cast<Scalar>(rows),
                                           context.compute_pool);
        if (!a_batch->allFinite()) {
          return Invalid("kfac.raw.activations", "overflows in a^T a / n");
        }
        if (!g_batch->allFinite()) {
          return Invalid("kfac.raw.output_gradients",
                         "overflows in g^T g / (n T)");
        }
      }
    } else {
      if (s.num_examples <= 0) {
        return Invalid("kfac.reduced.num_examples",
                       absl::StrCat("is ", s.num_examples, ", want > 0"));
      }
      absl::StatusOr<Matrix> af =
          CheckedFactor<Scalar>(name(), "kfac.reduced.a_factor", s.a_factor, ad);
      if (!af.ok()) return af.status();
      absl::StatusOr<Matrix> gf =
          CheckedFactor<Scalar>(name(), "kfac.reduced.g_factor", s.g_factor, gd);
      if (!gf.ok()) return gf.status();
      if (fold) {
        a_batch = *std::move(af);
        g_batch = *std::move(gf);
      }
    }
  } else if (fold) {
    return Invalid("kfac", absl::StrCat("statistics are missing; step ", t,
                                        " folds them (stats_period ",
                                        options_.stats_period, ")"));
  }

  // Hyperparameters of this step.
  auto value = [&](const SchedulePtr& s) { return s->Value(t); };
  const double lr = value(options_.learning_rate);
  const double mu = value(options_.momentum);
  const double wd = value(options_.weight_decay);
  const double lambda = context.damping_override
                            ? *context.damping_override
                            : value(options_.damping);
  if (!std::isfinite(lr) || lr < 0) {
    return Invalid("learning_rate",
                   absl::StrCat("is ", lr, " at step ", t, ", want >= 0"));
  }
  if (!std::isfinite(mu)) {
    return Invalid("momentum", absl::StrCat("is ", mu, " at step ", t));
  }
  if (!std::isfinite(wd)) {
    return Invalid("weight_decay", absl::StrCat("is ", wd, " at step ", t));
  }
  if (!std::isfinite(lambda) || lambda <= 0) {
    return Invalid(context.damping_override ? "damping_override" : "damping",
                   absl::StrCat("is ", lambda, " at step ", t, ", want > 0"));
  }
  pending->lr = lr;
  pending->momentum = mu;
  if (mu != 0) pending->decayed_momentum = static_cast<Scalar>(mu) * momentum_;
  pending->weight_decay = wd;
  pending->damping = lambda;

  // EMA of the factors from a zero start; factor = sum / weight (kfac-jax's
  // WeightedMovingAverage, i.e. Adam-style bias correction).
  const Scalar rho = static_cast<Scalar>(options_.ema_decay);
  if (fold) {
    pending->a_ema = rho * a_ema_ + (Scalar(1) - rho) * *a_batch;
    pending->g_ema = rho * g_ema_ + (Scalar(1) - rho) * *g_batch;
    pending->ema_weight = options_.ema_decay * ema_weight_ +
                          (1.0 - options_.ema_decay);
    pending->stats_updates = stats_updates_ + 1;
  } else {
    pending->ema_weight = ema_weight_;
  }

  // Decomposition: resolve an async refresh in flight, refresh if due.
  const bool eigen = options_.damping_mode == KfacDampingMode::kEigenExact;
  bool refresh = IsInverseStep(t) || decomp_.step == 0;
  bool force_wait = (t == 1);
  if (in_flight_) {
    const bool ready = IsReady(in_flight_->a) && IsReady(in_flight_->g);
    const bool overdue = refresh || t - in_flight_->step >= options_.max_staleness;
    if (ready || overdue) {
      const Clock::time_point start = Clock::now();
      absl::StatusOr<Decomp> d = Resolve(*in_flight_);
      pending->inversion_micros += MicrosSince(start);
      pending->clear_in_flight = true;
      if (d.ok()) {
        pending->install = *std::move(d);
      } else {
        // Redo it now from the current factors, waiting this time.
        refresh = true;
        force_wait = true;
      }
    }
  }
  if (refresh) {
    if (context.engine == nullptr) {
      return absl::InternalError(absl::StrCat(
          "block \"", name(), "\": no inversion engine in the step context"));
    }
    const Matrix& a_sum = pending->a_ema ? *pending->a_ema : a_ema_;
    const Matrix& g_sum = pending->g_ema ? *pending->g_ema : g_ema_;
    const Scalar inv_w = static_cast<Scalar>(1.0 / pending->ema_weight);
    Matrix a_factor = inv_w * a_sum;
    Matrix g_factor = inv_w * g_sum;
    Refresh r;
    r.step = t;
    DecompositionKind kind = DecompositionKind::kEigh;
    if (!eigen) {
      // Factored Tikhonov (Martens & Grosse §6.3): the damping is split
      // between the factors by pi and baked into their inverses.
      r.damping = lambda;
      const double pi = kfac::PiCorrection(a_factor, g_factor);
      const double sqrt_lambda = std::sqrt(lambda);
      a_factor.diagonal().array() += static_cast<Scalar>(pi * sqrt_lambda);
      g_factor.diagonal().array() += static_cast<Scalar>(sqrt_lambda / pi);
      kind = DecompositionKind::kCholeskyInverse;
    }
    const Clock::time_point start = Clock::now();
    r.a = context.engine->Submit(std::move(a_factor), kind).share();
    r.g = context.engine->Submit(std::move(g_factor), kind).share();
    const bool have_previous = pending->install || decomp_.step > 0;
    const bool wait = force_wait || !options_.async_inversion ||
                      !have_previous || options_.max_staleness == 0 ||
                      (IsReady(r.a) && IsReady(r.g));
    if (wait) {
      absl::StatusOr<Decomp> d = Resolve(r);
      pending->inversion_micros += MicrosSince(start);
      if (!d.ok()) return d.status();
      pending->install = *std::move(d);
    } else {
      pending->inversion_micros += MicrosSince(start);
      pending->start_in_flight = std::move(r);
    }
  }
  const Decomp& use = pending->install ? *pending->install : decomp_;

  // Precondition grad (+ wd W).
  Matrix g = *std::move(grad);
  if (params && wd != 0) g += static_cast<Scalar>(wd) * *params;
  pending->v = eigen ? kfac::PreconditionEigen<Scalar>(
                           use.g, use.g_values, use.a, use.a_values, g,
                           static_cast<Scalar>(lambda), context.compute_pool)
                     : kfac::PreconditionFactored<Scalar>(use.g, use.a, g,
                                                          context.compute_pool);
  if (!pending->v.allFinite()) {
    return Invalid("gradient",
                   "gives a non-finite preconditioned gradient; the damping "
                   "is too small for the factors' scale");
  }
  pending->grad = std::move(g);
  return pending;
}

template <typename Scalar>
BlockState KfacDenseBlock<Scalar>::ExportState() const {
  BlockState s;
  s.tensors["a_ema"] = a_ema_.template cast<double>();
  s.tensors["g_ema"] = g_ema_.template cast<double>();
  s.tensors["momentum"] = momentum_.template cast<double>();
  s.scalars["ema_weight"] = ema_weight_;
  s.scalars["stats_updates"] = static_cast<double>(stats_updates_);
  s.scalars["last_step"] = static_cast<double>(last_step_);

  const Decomp* d = &decomp_;
  absl::StatusOr<Decomp> resolved;
  if (in_flight_) {
    // Waiting makes the export deterministic; a failed refresh is dropped,
    // the in-place block would redo it at its next step.
    resolved = Resolve(*in_flight_);
    if (resolved.ok()) d = &*resolved;
  }
  s.scalars["decomposition_step"] = static_cast<double>(d->step);
  s.scalars["decomposition_damping"] = d->damping;
  if (d->step > 0) {
    if (options_.damping_mode == KfacDampingMode::kEigenExact) {
      s.tensors["a_eigenvectors"] = d->a.template cast<double>();
      s.tensors["g_eigenvectors"] = d->g.template cast<double>();
      s.tensors["a_eigenvalues"] = d->a_values.template cast<double>();
      s.tensors["g_eigenvalues"] = d->g_values.template cast<double>();
    } else {
      s.tensors["a_damped_inverse"] = d->a.template cast<double>();
      s.tensors["g_damped_inverse"] = d->g.template cast<double>();
    }
  }
  return s;
}

template <typename Scalar>
absl::Status KfacDenseBlock<Scalar>::ImportState(const BlockState& state) {
  const Eigen::Index ad = a_dim(), gd = g_dim();
  auto bad = [&](absl::string_view what) {
    return absl::InvalidArgumentError(
        absl::StrCat("block \"", name(), "\": state ", what));
  };
  auto scalar = [&](const std::string& key, bool integer, double lo,
                    double hi) -> absl::StatusOr<double> {
    auto it = state.scalars.find(key);
    if (it == state.scalars.end()) {
      return bad(absl::StrCat("scalar \"", key, "\" is missing"));
    }
    const double v = it->second;
    if (!std::isfinite(v) || v < lo || v > hi ||
        (integer && v != std::floor(v))) {
      return bad(absl::StrCat("scalar \"", key, "\" is ", v, ", want ",
                              integer ? "an integer " : "", "in [", lo, ", ",
                              hi, "]"));
    }
    return v;
  };
  constexpr double kMaxCount = 9007199254740992.0;  // 2^53
  absl::StatusOr<double> weight = scalar("ema_weight", false, 0, 1);
  if (!weight.ok()) return weight.status();
  absl::StatusOr<double> updates = scalar("stats_updates", true, 0, kMaxCount);
  if (!updates.ok()) return updates.status();
  absl::StatusOr<double> last = scalar("last_step", true, 0, kMaxCount);
  if (!last.ok()) return last.status();
  absl::StatusOr<double> dstep = scalar("decomposition_step", true, 0, kMaxCount);
  if (!dstep.ok()) return dstep.status();
  absl::StatusOr<double> ddamp = scalar("decomposition_damping", false, 0,
                                        std::numeric_limits<double>::max());
  if (!ddamp.ok()) return ddamp.status();
  if ((*updates == 0) != (*weight == 0)) {
    return bad("ema_weight and stats_updates disagree (one is 0, the other not)");
  }

  const bool eigen = options_.damping_mode == KfacDampingMode::kEigenExact;
  std::vector<std::pair<std::string, std::pair<Eigen::Index, Eigen::Index>>>
      want = {{"a_ema", {ad, ad}}, {"g_ema", {gd, gd}}, {"momentum", {gd, ad}}};
  if (*dstep > 0) {
    if (eigen) {
      want.push_back({"a_eigenvectors", {ad, ad}});
      want.push_back({"g_eigenvectors", {gd, gd}});
      want.push_back({"a_eigenvalues", {ad, 1}});
      want.push_back({"g_eigenvalues", {gd, 1}});
    } else {
      want.push_back({"a_damped_inverse", {ad, ad}});
      want.push_back({"g_damped_inverse", {gd, gd}});
    }
  }
  for (const auto& [key, unused] : state.tensors) {
    bool known = false;
    for (const auto& w : want) known = known || w.first == key;
    if (!known) {
      return bad(absl::StrCat("tensor \"", key, "\" is not expected (",
                              kKfacDenseKind, " block, ",
                              eigen ? "eigen-exact" : "factored-Tikhonov",
                              " damping, decomposition_step ", *dstep, ")"));
    }
  }
  std::map<std::string, Matrix> cast;
  for (const auto& [key, shape] : want) {
    auto it = state.tensors.find(key);
    if (it == state.tensors.end()) {
      return bad(absl::StrCat("tensor \"", key, "\" is missing"));
    }
    absl::StatusOr<Matrix> m =
        CheckedCast<Scalar>(name(), absl::StrCat("state tensor \"", key, "\""),
                            it->second, shape.first, shape.second);
    if (!m.ok()) return m.status();
    cast[key] = *std::move(m);
  }

  a_ema_ = std::move(cast["a_ema"]);
  g_ema_ = std::move(cast["g_ema"]);
  momentum_ = std::move(cast["momentum"]);
  ema_weight_ = *weight;
  stats_updates_ = static_cast<int64_t>(*updates);
  last_step_ = static_cast<int64_t>(*last);
  decomp_ = Decomp{};
  decomp_.step = static_cast<int64_t>(*dstep);
  decomp_.damping = *ddamp;
  if (decomp_.step > 0) {
    if (eigen) {
      decomp_.a = std::move(cast["a_eigenvectors"]);
      decomp_.g = std::move(cast["g_eigenvectors"]);
      decomp_.a_values = cast["a_eigenvalues"].col(0).cwiseMax(Scalar(0));
      decomp_.g_values = cast["g_eigenvalues"].col(0).cwiseMax(Scalar(0));
    } else {
      decomp_.a = std::move(cast["a_damped_inverse"]);
      decomp_.g = std::move(cast["g_damped_inverse"]);
    }
  }
  in_flight_.reset();
  return absl::OkStatus();
}

template <typename Scalar>
int64_t KfacDenseBlock<Scalar>::StateBytes() const {
  int64_t n = a_ema_.size() + g_ema_.size() + momentum_.size() +
              decomp_.a.size() + decomp_.g.size() + decomp_.a_values.size() +
              decomp_.g_values.size();
  if (in_flight_) {
    // The engine holds the in-flight result for this block.
    n += a_dim() * a_dim() + g_dim() * g_dim();
  }
  return n * static_cast<int64_t>(sizeof(Scalar));
}

template class KfacDenseBlock<float>;
template class KfacDenseBlock<double>;

absl::StatusOr<std::unique_ptr<ParameterBlock>> NewKfacDenseBlock(
    std::string name, const KfacDenseOptions& options, Precision precision) {
  absl::StatusOr<KfacDenseOptions> normalized =
      NormalizeKfacDenseOptions(name, options);
  if (!normalized.ok()) return normalized.status();
  switch (precision) {
    case Precision::kFloat32:
      return std::make_unique<KfacDenseBlock<float>>(std::move(name),
                                                     *std::move(normalized));
    case Precision::kFloat64:
      return std::make_unique<KfacDenseBlock<double>>(std::move(name),
                                                      *std::move(normalized));
  }
  return absl::InvalidArgumentError(
      absl::StrCat("block \"", name, "\": unknown precision"));
}

}  // namespace natgrad::core
