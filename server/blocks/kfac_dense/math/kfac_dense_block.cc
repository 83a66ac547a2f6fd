#include "server/blocks/kfac_dense/math/kfac_dense_block.h"

#include <chrono>
#include <cmath>
#include <limits>
#include <map>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "Eigen/Cholesky"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "server/core/block_error.h"
#include "server/core/engine_wait.h"
#include "server/core/first_order_checks.h"
#include "server/linalg/blas.h"
#include "server/blocks/kfac_dense/math/kfac_kernels.h"
#include "server/blocks/kfac_dense/math/kfac_step_checks.h"

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

absl::Status InvalidField(absl::string_view block, absl::string_view field,
                          absl::string_view what) {
  return InvalidBlockField(block, field, what);
}

// Shared with ekfac (kfac_step_checks.h).
using kfac::CheckedCast;
using kfac::CheckedTensor;
using kfac::NonFiniteAt;
using kfac::Shape;

// A reduced factor from the client, read straight into Scalar: [dim, dim],
// or (ReducedKfacStatistics.packed) rank 1 holding the upper triangle row by
// row, which is the lower triangle column by column.
template <typename Scalar>
absl::StatusOr<kfac::Matrix<Scalar>> ReadFactor(absl::string_view block,
                                                absl::string_view field,
                                                const DenseTensor& tensor,
                                                Eigen::Index dim) {
  if (tensor.shape().size() != 1) {
    if (tensor.rows() != dim || tensor.cols() != dim) {
      return InvalidField(block, field,
                          absl::StrCat("has shape ",
                                       Shape(tensor.rows(), tensor.cols()),
                                       ", want ", Shape(dim, dim)));
    }
    return tensor.template ToMatrix<Scalar>();
  }
  const int64_t want = static_cast<int64_t>(dim) * (dim + 1) / 2;
  if (tensor.size() != want) {
    return InvalidField(block, field,
                        absl::StrCat("is packed with ", tensor.size(),
                                     " values, want d(d+1)/2 = ", want,
                                     " (d = ", dim, ")"));
  }
  kfac::Matrix<Scalar> x(dim, dim);
  auto unpack = [&](const auto* p) {
    using Src = std::remove_const_t<std::remove_pointer_t<decltype(p)>>;
    for (Eigen::Index i = 0; i < dim; ++i) {
      x.col(i).tail(dim - i) =
          Eigen::Map<const Eigen::Matrix<Src, Eigen::Dynamic, 1>>(p, dim - i)
              .template cast<Scalar>();
      p += dim - i;
    }
  };
  if (tensor.dtype() == DType::kFloat32) {
    unpack(reinterpret_cast<const float*>(tensor.data()));
  } else {
    unpack(reinterpret_cast<const double*>(tensor.data()));
  }
  kfac::CopyLowerToUpper(x);
  return x;
}

// The per-step checks of a reduced factor: finite, symmetric up to rounding
// (then symmetrised), a diagonal >= -delta and every 2x2 principal minor >= 0
// (|x_ij| <= sqrt(x_ii x_jj), up to delta), all O(d^2) and with messages that
// locate the entry; then PSD beyond rounding by a Cholesky of X + shift I in
// the block's precision (LAPACK potrf, d^3/3 flops). The Cholesky has to run
// here, at the step that sends the factor: once folded into the EMA an
// indefinite factor cannot be taken out again, and the session would be
// stuck at its next decomposition.
template <typename Scalar>
absl::StatusOr<kfac::Matrix<Scalar>> CheckedFactor(absl::string_view block,
                                                   absl::string_view field,
                                                   const DenseTensor& tensor,
                                                   Eigen::Index dim, int64_t rows) {
  absl::StatusOr<kfac::Matrix<Scalar>> read =
      ReadFactor<Scalar>(block, field, tensor, dim);
  if (!read.ok()) return read.status();
  kfac::Matrix<Scalar>& x = *read;
  if (dim == 0) return x;
  // x * 0 sums to NaN iff an entry is not finite; only a narrowing read
  // needs it, else the tensor's own (once-made) check decides.
  if (kfac::Narrows<Scalar>(tensor) ? std::isnan((x.array() * Scalar(0)).sum())
                                    : !tensor.AllFinite()) {
    if (!tensor.AllFinite()) {
      // Locate it for the message (the error path only).
      return InvalidField(
          block, field,
          NonFiniteAt(ReadFactor<double>(block, field, tensor, dim).value()));
    }
    return InvalidField(block, field, "has values beyond float32 range");
  }
  const double max_abs = static_cast<double>(x.cwiseAbs().maxCoeff());
  if (tensor.shape().size() != 1) {  // a packed factor is symmetric
    const double asym =
        static_cast<double>((x - x.transpose()).cwiseAbs().maxCoeff());
    if (asym > kFactorTolerance * max_abs) {
      return InvalidField(block, field,
                          absl::StrCat("is not symmetric (max |X - X^T| = ",
                                       asym, ", max |X| = ", max_abs, ")"));
    }
    x = (Scalar(0.5) * (x + x.transpose())).eval();
  }
  const double max_diag = static_cast<double>(x.diagonal().cwiseAbs().maxCoeff());
  // The allowance for rounding: the factor's (kFactorTolerance) and the
  // client's in forming X = a^T a / n from n rows in the wire dtype, in any
  // summation order: |E| <= gamma_n |a|^T|a| / n entrywise, so ||E||_2 <=
  // gamma_n tr(X) (gamma_n = n eps / (1 - n eps)), which bounds how far below
  // 0 every principal minor's eigenvalues can be. It scales with tr(X) >=
  // lambda_max, not with max X_ii: a float32 Gram of correlated activations
  // (lambda_max ~ d max X_ii) has rounding eigenvalues far below -d eps max X_ii.
  const double wire_eps = tensor.dtype() == core::DType::kFloat32
                              ? std::numeric_limits<float>::epsilon()
                              : std::numeric_limits<double>::epsilon();
  const double n_eps = static_cast<double>(std::max<int64_t>(rows, 1)) * wire_eps;
  const double gamma = n_eps < 0.5 ? n_eps / (1 - n_eps) : 1.0;
  const double trace = std::max(0.0, static_cast<double>(x.trace()));
  const double delta = kFactorTolerance * max_diag + gamma * trace +
                       std::numeric_limits<double>::min() * dim;
  Eigen::Index neg;
  if (static_cast<double>(x.diagonal().minCoeff(&neg)) < -delta) {
    return InvalidField(block, field,
                        absl::StrCat("has a negative diagonal entry ",
                                     x(neg, neg), " at [", neg, ", ", neg,
                                     "]; a covariance is PSD"));
  }
  // s_i = sqrt(max(x_ii, 0) + delta): |x_ij| <= s_i s_j for a PSD matrix.
  const Eigen::Matrix<double, Eigen::Dynamic, 1> s =
      (x.diagonal().template cast<double>().array().max(0.0) + delta).sqrt();
  for (Eigen::Index j = 0; j < dim; ++j) {
    const auto bound = s.array() * s(j);
    const auto col = x.col(j).template cast<double>().array().abs();
    if ((col > bound).any()) {
      Eigen::Index i;
      (col - bound).maxCoeff(&i);
      return InvalidField(
          block, field,
          absl::StrCat("is not positive semidefinite: |X[", i, ", ", j,
                       "]| = ", std::abs(static_cast<double>(x(i, j))),
                       " exceeds sqrt(X[", i, ", ", i, "] X[", j, ", ", j,
                       "]) = ", std::sqrt(std::max(0.0, static_cast<double>(x(i, i)) *
                                                            static_cast<double>(x(j, j)))),
                       " (a 2x2 principal minor is negative)"));
    }
  }
  // The shift adds the Cholesky's own rounding (about d eps max|X|).
  const double shift =
      delta + static_cast<double>(dim) * std::numeric_limits<Scalar>::epsilon() * max_diag;
  kfac::Matrix<Scalar> chol = x;
  chol.diagonal().array() += static_cast<Scalar>(shift);
  if (const int info = linalg::blas::Potrf('L', dim, chol.data(), dim);
      info != 0) {
    return InvalidField(
        block, field,
        absl::StrCat("is not positive semidefinite beyond rounding: X + ", shift,
                     " I has no Cholesky factor (its leading ", info, "x", info,
                     " minor is not positive)"));
  }
  return x;
}

template <typename Scalar>
bool IsReady(const std::shared_future<
             absl::StatusOr<engine::Decomposition<Scalar>>>& f) {
  return f.valid() &&
         f.wait_for(std::chrono::seconds(0)) == std::future_status::ready;
}

using kfac::Dot;

}  // namespace

// The result of Propose: everything Commit installs, computed up front, so
// the update never reads the block (kfac-jax's split of a curvature block's
// step into update-estimate, update-cache and multiply).
template <typename Scalar>
class KfacDensePendingUpdate final : public PendingBlockUpdate,
                                     public CurvatureModel {
 public:
  using Block = KfacDenseBlock<Scalar>;
  using Matrix = typename Block::Matrix;

  KfacDensePendingUpdate(Block* block, int64_t step,
                         typename Block::Hyperparameters hyper,
                         typename Block::Factors factors,
                         typename Block::RefreshPlan plan, Matrix grad,
                         Matrix v, std::optional<Matrix> decayed_momentum,
                         linalg::ComputePool* pool)
      : block_(block),
        step_(step),
        hyper_(hyper),
        factors_(std::move(factors)),
        plan_(std::move(plan)),
        grad_(std::move(grad)),
        v_(std::move(v)),
        decayed_momentum_(std::move(decayed_momentum)),
        pool_(pool) {}

  const CurvatureModel* curvature() const override { return this; }
  double KlTerm() const override {
    return hyper_.lr * hyper_.lr * Dot(v_, grad_);
  }

  // The K-FAC quadratic model of the loss change for the committed delta,
  // with this step's (not the possibly stale decomposed) factors and lambda:
  // <grad, delta> + 1/2 <delta, G delta A> + 1/2 lambda |delta|^2.
  double PredictedReduction(double scale) const override {
    const Matrix delta = static_cast<Scalar>(-hyper_.lr) * Momentum(scale);
    const Scalar inv_w = static_cast<Scalar>(1.0 / factors_.weight);
    const Matrix g_factor = inv_w * *factors_.g_sum;
    const Matrix a_factor = inv_w * *factors_.a_sum;
    const Matrix curvature = kfac::Product<Scalar>(
        kfac::Product<Scalar>(g_factor, false, delta, false, pool_), false,
        a_factor, false, pool_);
    return Dot(grad_, delta) + 0.5 * Dot(delta, curvature) +
           0.5 * hyper_.damping * delta.template cast<double>().squaredNorm();
  }

  BlockStepOutput Commit(double scale) override {
    Block& b = *block_;
    b.momentum_ = Momentum(scale);
    b.factors_ = factors_;  // shared sums: PredictedReduction stays valid
    if (plan_.clear_in_flight) b.in_flight_.reset();
    if (plan_.start_in_flight) b.in_flight_ = std::move(*plan_.start_in_flight);
    if (plan_.install) b.decomp_ = std::move(*plan_.install);
    b.last_step_ = step_;

    BlockStepOutput out;
    out.delta = DenseTensor::FromMatrix(static_cast<Scalar>(-hyper_.lr) * b.momentum_);
    out.hyperparameters = kfac::ReportedHyperparameters(hyper_, scale);
    out.inversion_micros = plan_.inversion_micros;
    return out;
  }

 private:
  Matrix Momentum(double scale) const {
    return kfac::MomentumAt<Scalar>(scale, v_, decayed_momentum_);
  }

  Block* const block_;
  const int64_t step_;
  const typename Block::Hyperparameters hyper_;
  typename Block::Factors factors_;
  typename Block::RefreshPlan plan_;
  const Matrix grad_;  // the gradient preconditioned: grad + wd W
  const Matrix v_;     // the preconditioned gradient
  const std::optional<Matrix> decayed_momentum_;  // mu m_old, when mu != 0
  linalg::ComputePool* const pool_;  // Propose's context.compute_pool
};

template <typename Scalar>
KfacDenseBlock<Scalar>::KfacDenseBlock(std::string name,
                                       KfacDenseOptions options)
    : ParameterBlock(std::move(name)), options_(std::move(options)) {
  factors_.a_sum = std::make_shared<const Matrix>(Matrix::Zero(a_dim(), a_dim()));
  factors_.g_sum = std::make_shared<const Matrix>(Matrix::Zero(g_dim(), g_dim()));
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
    WaitForEngine(*future);  // a worker's slot goes to other steps meanwhile
    const absl::StatusOr<engine::Decomposition<Scalar>>& r = future->get();
    if (absl::Status s = CheckPsd(refresh, which, r); !s.ok()) return s;
    if (!r.ok()) {
      return BlockError(r.status().code(), name(),
                        absl::StrCat("factor ", std::string(1, which)),
                        absl::StrCat("could not be decomposed at step ",
                                     refresh.step, ": ", r.status().message()));
    }
    const bool bad_shape =
        r->matrix.rows() != dim || r->matrix.cols() != dim ||
        (eigen && r->eigenvalues.size() != dim);
    if (bad_shape || !r->matrix.allFinite() ||
        (eigen && !r->eigenvalues.allFinite())) {
      return BlockError(absl::StatusCode::kInternal, name(),
                        absl::StrCat("factor ", std::string(1, which)),
                        "got a malformed or non-finite decomposition from the engine");
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
absl::Status KfacDenseBlock<Scalar>::CheckPsd(
    const Refresh& refresh, char which,
    const absl::StatusOr<engine::Decomposition<Scalar>>& result) const {
  const bool eigen = options_.damping_mode == KfacDampingMode::kEigenExact;
  if (result.ok() && !eigen && result->retries == 0) return absl::OkStatus();
  if (!result.ok() && eigen) return absl::OkStatus();  // a solver failure
  const Matrix& sum =
      which == 'A' ? *refresh.factors.a_sum : *refresh.factors.g_sum;
  const Eigen::Index d = sum.rows();
  if (d == 0 || !(refresh.factors.weight > 0)) return absl::OkStatus();
  const double inv_w = 1.0 / refresh.factors.weight;
  // The factors' scale: max diagonal (>= |x_ij| for the PSD-looking factors
  // CheckedFactor lets through) and, for eigen, the largest eigenvalue.
  double scale = inv_w * static_cast<double>(sum.diagonal().cwiseAbs().maxCoeff());
  if (result.ok() && eigen && result->eigenvalues.size() == d) {
    scale = std::max(scale, static_cast<double>(result->eigenvalues.maxCoeff()));
  }
  const double tol = kFactorTolerance * scale + std::numeric_limits<double>::min();
  double lowest = 0;  // the most negative eigenvalue found (0: none)
  if (eigen) {
    const auto& q = result->matrix;
    const auto& w = result->eigenvalues;
    if (q.rows() != d || q.cols() != d || w.size() != d) return absl::OkStatus();
    std::vector<Eigen::Index> clamped;
    for (Eigen::Index i = 0; i < d; ++i) {
      if (static_cast<double>(w(i)) <= tol) clamped.push_back(i);
    }
    if (clamped.empty()) return absl::OkStatus();
    Matrix qk(d, static_cast<Eigen::Index>(clamped.size()));
    for (size_t k = 0; k < clamped.size(); ++k) qk.col(k) = q.col(clamped[k]);
    const Matrix z = kfac::Product<Scalar>(sum, false, qk, false);
    for (Eigen::Index k = 0; k < qk.cols(); ++k) {
      const double r = inv_w * static_cast<double>(qk.col(k).dot(z.col(k)));
      lowest = std::min(lowest, r);
    }
    if (lowest >= -tol) return absl::OkStatus();
  } else {
    Eigen::MatrixXd f = inv_w * sum.template cast<double>();
    f.diagonal().array() += tol;
    if (Eigen::LLT<Eigen::MatrixXd>(f).info() == Eigen::Success) {
      return absl::OkStatus();
    }
  }
  const std::string field =
      which == 'A' ? "kfac.reduced.a_factor" : "kfac.reduced.g_factor";
  return Invalid(
      field,
      absl::StrCat(
          "is not positive semidefinite beyond rounding: factor ",
          std::string(1, which), ", the EMA of the statistics folded up to step ",
          refresh.step, ", ",
          eigen ? absl::StrCat("has an eigenvalue ", lowest, " < -", tol)
                : absl::StrCat("plus ", tol, " I has no Cholesky factor"),
          " (found when step ", refresh.step,
          " decomposed it; statistics folded at earlier steps stay folded, so "
          "later decompositions fail too until the session is restored from a "
          "checkpoint)"));
}

template <typename Scalar>
absl::StatusOr<typename KfacDenseBlock<Scalar>::Hyperparameters>
KfacDenseBlock<Scalar>::ResolveHyperparameters(
    int64_t t, const KfacStepInput& input, const StepContext& context) const {
  return kfac::ResolveStepHyperparameters(name(), t, input, context, options_.learning_rate,
                                          options_.damping, options_.momentum,
                                          options_.weight_decay);
}

template <typename Scalar>
absl::StatusOr<typename KfacDenseBlock<Scalar>::Factors>
KfacDenseBlock<Scalar>::FoldStatistics(const KfacStepInput& input, int64_t t,
                                       const StepContext& context) const {
  const Eigen::Index ad = a_dim(), gd = g_dim();
  // Statistics are validated whenever sent and folded only on statistics
  // steps (and whenever none has been folded yet, so factors always exist).
  const bool fold = IsStatsStep(t) || factors_.updates == 0;
  std::optional<Matrix> a_batch, g_batch;
  if (input.kfac) {
    const KfacStatisticsInput& s = *input.kfac;
    if (s.form == KfacStatisticsInput::Form::kRaw) {
      // Shapes here; the values are read straight from the received
      // row-major bytes into the Grams (no transposed copy).
      absl::StatusOr<kfac::RawStatistics<Scalar>> raw = kfac::CheckedRawShapes<Scalar>(
          name(), s, options_.d_in, gd, options_.locations);
      if (!raw.ok()) return raw.status();
      const int64_t rows = raw->rows;
      const int64_t loc = raw->locations;
      if (!fold) {
        if (absl::Status v = kfac::CheckedRawValues<Scalar>(name(), "kfac.raw.activations",
                                                           s.activations);
            !v.ok()) {
          return v;
        }
        if (absl::Status v = kfac::CheckedRawValues<Scalar>(
                name(), "kfac.raw.output_gradients", s.output_gradients);
            !v.ok()) {
          return v;
        }
      } else {
        // KFC scaling (kfac-jax): A over the n examples, G over n*T rows.
        absl::StatusOr<Matrix> a = kfac::CheckedRawGram<Scalar>(
            name(), "kfac.raw.activations", s.activations, options_.has_bias,
            static_cast<Scalar>(rows / loc), context.compute_pool, "overflows in a^T a / n");
        if (!a.ok()) return a.status();
        absl::StatusOr<Matrix> g = kfac::CheckedRawGram<Scalar>(
            name(), "kfac.raw.output_gradients", s.output_gradients, false,
            static_cast<Scalar>(rows), context.compute_pool, "overflows in g^T g / (n T)");
        if (!g.ok()) return g.status();
        a_batch = *std::move(a);
        g_batch = *std::move(g);
      }
    } else {
      if (s.num_examples <= 0) {
        return Invalid("kfac.reduced.num_examples",
                       absl::StrCat("is ", s.num_examples, ", want > 0"));
      }
      absl::StatusOr<Matrix> af =
          CheckedFactor<Scalar>(name(), "kfac.reduced.a_factor", s.a_factor, ad,
                                s.num_examples);
      if (!af.ok()) return af.status();
      absl::StatusOr<Matrix> gf =
          CheckedFactor<Scalar>(name(), "kfac.reduced.g_factor", s.g_factor, gd,
                                s.num_examples);
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
  if (!fold) return factors_;  // shares the current sums, no copy

  // EMA of the factors from a zero start; factor = sum / weight (kfac-jax's
  // WeightedMovingAverage, i.e. Adam-style bias correction).
  const Scalar rho = static_cast<Scalar>(options_.ema_decay);
  Factors next;
  next.a_sum = std::make_shared<const Matrix>(rho * *factors_.a_sum +
                                              (Scalar(1) - rho) * *a_batch);
  next.g_sum = std::make_shared<const Matrix>(rho * *factors_.g_sum +
                                              (Scalar(1) - rho) * *g_batch);
  next.weight = options_.ema_decay * factors_.weight + (1.0 - options_.ema_decay);
  next.updates = factors_.updates + 1;
  return next;
}

template <typename Scalar>
absl::StatusOr<typename KfacDenseBlock<Scalar>::RefreshPlan>
KfacDenseBlock<Scalar>::PlanRefresh(int64_t t, double lambda,
                                    const Factors& factors,
                                    const StepContext& context) const {
  RefreshPlan plan;
  const bool eigen = options_.damping_mode == KfacDampingMode::kEigenExact;
  bool refresh = IsInverseStep(t) || decomp_.step == 0;
  bool force_wait = (t == 1);
  // An async refresh in flight is installed once ready, or waited for when
  // overdue.
  if (in_flight_) {
    const bool ready = IsReady(in_flight_->a) && IsReady(in_flight_->g);
    const bool overdue = refresh || t - in_flight_->step >= options_.max_staleness;
    if (ready || overdue) {
      const Clock::time_point start = Clock::now();
      absl::StatusOr<Decomp> d = Resolve(*in_flight_);
      plan.inversion_micros += MicrosSince(start);
      plan.clear_in_flight = true;
      if (d.ok()) {
        plan.install = *std::move(d);
      } else {
        // Redo it now from the current factors, waiting this time.
        refresh = true;
        force_wait = true;
      }
    }
  }
  if (!refresh) return plan;
  if (context.engine == nullptr) {
    return BlockError(absl::StatusCode::kInternal, name(), "",
                      "has no inversion engine in the step context");
  }
  const Scalar inv_w = static_cast<Scalar>(1.0 / factors.weight);
  Matrix a_factor = inv_w * *factors.a_sum;
  Matrix g_factor = inv_w * *factors.g_sum;
  Refresh r;
  r.step = t;
  r.factors = factors;  // shared sums, no copy
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
  const bool have_previous = plan.install || decomp_.step > 0;
  const bool wait = force_wait || !options_.async_inversion || !have_previous ||
                    options_.max_staleness == 0 ||
                    (IsReady(r.a) && IsReady(r.g));
  if (wait) {
    absl::StatusOr<Decomp> d = Resolve(r);
    plan.inversion_micros += MicrosSince(start);
    if (!d.ok()) return d.status();
    plan.install = *std::move(d);
  } else {
    plan.inversion_micros += MicrosSince(start);
    plan.start_in_flight = std::move(r);
  }
  return plan;
}

template <typename Scalar>
absl::StatusOr<typename KfacDenseBlock<Scalar>::Matrix>
KfacDenseBlock<Scalar>::Precondition(const Decomp& use, const Matrix& g,
                                     double lambda,
                                     linalg::ComputePool* pool) const {
  const bool eigen = options_.damping_mode == KfacDampingMode::kEigenExact;
  Matrix v = eigen ? kfac::PreconditionEigen<Scalar>(
                         use.g, use.g_values, use.a, use.a_values, g,
                         static_cast<Scalar>(lambda), pool)
                   : kfac::PreconditionFactored<Scalar>(use.g, use.a, g, pool);
  if (!v.allFinite()) {
    return Invalid("gradient",
                   "gives a non-finite preconditioned gradient; the damping "
                   "is too small for the factors' scale");
  }
  return v;
}

template <typename Scalar>
absl::StatusOr<std::unique_ptr<PendingBlockUpdate>>
KfacDenseBlock<Scalar>::Propose(const BlockStepInput& step_input,
                                const StepContext& context) {
  absl::StatusOr<const KfacStepInput*> in = InputOf<KfacStepInput>(step_input);
  if (!in.ok()) return in.status();
  const KfacStepInput& input = **in;
  const int64_t t = context.step;
  if (absl::Status s = kfac::CheckStepOrder(name(), t, last_step_); !s.ok()) return s;
  absl::StatusOr<kfac::StepTensors<Scalar>> tensors =
      kfac::CheckedStepTensors<Scalar>(name(), input, g_dim(), a_dim());
  if (!tensors.ok()) return tensors.status();
  std::optional<Matrix>& params = tensors->params;
  absl::StatusOr<Factors> factors = FoldStatistics(input, t, context);
  if (!factors.ok()) return factors.status();
  absl::StatusOr<Hyperparameters> hyper = ResolveHyperparameters(t, input, context);
  if (!hyper.ok()) return hyper.status();
  absl::StatusOr<RefreshPlan> plan = PlanRefresh(t, hyper->damping, *factors, context);
  if (!plan.ok()) return plan.status();

  Matrix g = std::move(tensors->gradient);
  if (params && hyper->weight_decay != 0) {
    g += static_cast<Scalar>(hyper->weight_decay) * *params;
  }
  absl::StatusOr<Matrix> v =
      Precondition(plan->install ? *plan->install : decomp_, g, hyper->damping,
                   context.compute_pool);
  if (!v.ok()) return v.status();
  std::optional<Matrix> decayed;
  if (hyper->momentum != 0) {
    decayed = static_cast<Scalar>(hyper->momentum) * momentum_;
  }
  if (absl::Status s = kfac::CheckCommittable<Scalar>(name(), *v, decayed, hyper->lr,
                                                      input.gradient.dtype());
      !s.ok()) {
    return s;
  }
  return std::make_unique<KfacDensePendingUpdate<Scalar>>(
      this, t, *hyper, *std::move(factors), *std::move(plan), std::move(g),
      *std::move(v), std::move(decayed), context.compute_pool);
}

template <typename Scalar>
BlockState KfacDenseBlock<Scalar>::ExportState() const {
  BlockState s;
  s.tensors["a_ema"] = factors_.a_sum->template cast<double>();
  s.tensors["g_ema"] = factors_.g_sum->template cast<double>();
  s.tensors["momentum"] = momentum_.template cast<double>();
  s.scalars["ema_weight"] = factors_.weight;
  s.scalars["stats_updates"] = static_cast<double>(factors_.updates);
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
    return InvalidBlockField(name(), "state", what);
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

  factors_.a_sum = std::make_shared<const Matrix>(std::move(cast["a_ema"]));
  factors_.g_sum = std::make_shared<const Matrix>(std::move(cast["g_ema"]));
  momentum_ = std::move(cast["momentum"]);
  factors_.weight = *weight;
  factors_.updates = static_cast<int64_t>(*updates);
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
  int64_t n = factors_.a_sum->size() + factors_.g_sum->size() + momentum_.size() +
              decomp_.a.size() + decomp_.g.size() + decomp_.a_values.size() +
              decomp_.g_values.size();
  if (in_flight_) {
    // The engine holds the in-flight result for this block, and the refresh
    // keeps the factors it decomposed (for CheckPsd) once newer ones exist.
    n += a_dim() * a_dim() + g_dim() * g_dim();
    if (in_flight_->factors.a_sum != factors_.a_sum) {
      n += a_dim() * a_dim() + g_dim() * g_dim();
    }
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
  return InvalidBlockField(name, "precision", "is unknown");
}

}  // namespace natgrad::core
