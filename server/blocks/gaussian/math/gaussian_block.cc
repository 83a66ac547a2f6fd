#include "server/blocks/gaussian/math/gaussian_block.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "server/core/block_error.h"
#include "server/core/step_size_record.h"
#include "absl/strings/str_format.h"
#include "server/blocks/gaussian/math/gaussian_gradient.h"
#include "server/blocks/gaussian/math/gaussian_linalg.h"
#include "server/blocks/gaussian/math/natural_gradient_direction.h"
#include "server/linalg/compute_pool.h"

namespace natgrad::core {
namespace {

// A step's output with a slot per copy (directions only when requested).
GaussianStepOutput SizedOutput(size_t copies, double gamma_used, int halvings,
                               bool with_direction) {
  GaussianStepOutput out;
  out.gamma_used = gamma_used;
  out.halvings = halvings;
  out.param1.resize(copies);
  out.param2.resize(copies);
  out.delta1.resize(copies);
  out.delta2.resize(copies);
  if (with_direction) {
    out.direction1.resize(copies);
    out.direction2.resize(copies);
  }
  return out;
}

using StepInput = GaussianStepInput;
using FisherForm = GaussianCompositionalInput::FisherForm;

// u_s = (F_s + λI)⁻¹ ∇_z ℓ(z_s) for copy i of a validated compositional
// input, pulled back through z_s = m + Lε_s: ∂/∂m = mean_s u_s and
// ∂/∂L = tril(mean_s u_s ε_sᵀ). Fails (with the field) when F_s + λI is not
// positive definite.
template <typename T>
absl::Status LikelihoodMeanCholeskyGradient(const GaussianCompositionalInput& c, size_t i,
                                            double damping, absl::string_view block,
                                            GVector<T>* um, GMatrix<T>* ul) {
  const GMatrix<T> eps = c.samples[i].cast<T>();
  const GMatrix<T> grad = c.likelihood_gradients[i].cast<T>();
  const GMatrix<T> fisher = c.likelihood_fisher[i].cast<T>();
  const T lambda = static_cast<T>(damping);
  const Eigen::Index ns = eps.rows(), m = eps.cols();
  // The input was checked finite; only a float32 block's cast can overflow.
  if (sizeof(T) < sizeof(double) &&
      (!eps.allFinite() || !grad.allFinite() || !fisher.allFinite())) {
    return InvalidBlockField(block, absl::StrCat("gaussian.compositional[", i, "]"),
                             "overflows float32");
  }
  const auto not_pd = [&](Eigen::Index s, absl::string_view detail) {
    const std::string field =
        c.fisher_form == FisherForm::kShared
            ? absl::StrCat("gaussian.compositional.likelihood_fisher[", i, "]")
            : absl::StrCat("gaussian.compositional.likelihood_fisher[", i, "][", s, "]");
    return InvalidBlockField(
        block, field,
        absl::StrCat("+ likelihood_damping I (likelihood_damping = ", damping,
                     ") is not positive definite", detail,
                     "; send a positive semi-definite Fisher and a damping that makes it "
                     "positive definite"));
  };
  GMatrix<T> u(ns, m);
  switch (c.fisher_form) {
    case FisherForm::kDiagonal: {
      const GMatrix<T> d = fisher.array() + lambda;
      for (Eigen::Index s = 0; s < ns; ++s) {
        for (Eigen::Index j = 0; j < m; ++j) {
          if (!(d(s, j) > T(0))) {
            return not_pd(s, absl::StrCat(" (diagonal entry ", j, " is ",
                                          static_cast<double>(d(s, j)), ")"));
          }
        }
      }
      u = grad.array() / d.array();
      break;
    }
    case FisherForm::kShared: {
      GMatrix<T> a = Symmetrize<T>(fisher);
      a.diagonal().array() += lambda;
      GMatrix<T> l;
      if (!gaussian_linalg::LowerCholesky<T>(a, &l)) return not_pd(0, " (Cholesky failed)");
      GMatrix<T> x = grad.transpose();  // columns ∇_z ℓ(z_s)
      gaussian_linalg::LowerTriangularSolve<T>(l, /*left=*/true, /*trans=*/false, &x);
      gaussian_linalg::LowerTriangularSolve<T>(l, true, true, &x);
      u = x.transpose();
      break;
    }
    case FisherForm::kFull: {
      for (Eigen::Index s = 0; s < ns; ++s) {
        GMatrix<T> a = Symmetrize<T>(GMatrix<T>(fisher.middleRows(s * m, m)));
        a.diagonal().array() += lambda;
        GMatrix<T> l;
        if (!gaussian_linalg::LowerCholesky<T>(a, &l)) return not_pd(s, " (Cholesky failed)");
        GMatrix<T> x = grad.row(s).transpose();
        gaussian_linalg::LowerTriangularSolve<T>(l, true, false, &x);
        gaussian_linalg::LowerTriangularSolve<T>(l, true, true, &x);
        u.row(s) = x.col(0).transpose();
      }
      break;
    }
  }
  *um = u.colwise().mean().transpose();
  *ul = GMatrix<T>((u.transpose() * eps / static_cast<T>(ns)).template triangularView<Eigen::Lower>());
  if (!um->allFinite() || !ul->allFinite()) {
    return InvalidBlockField(block, absl::StrCat("gaussian.compositional[", i, "]"),
                             "gives a non-finite likelihood gradient (F + likelihood_damping I "
                             "too ill-conditioned)");
  }
  return absl::OkStatus();
}

// Runs fn(i) (returning false on failure) for copies i = 0..n-1 and returns
// the smallest failing i, or n. Sequential (stopping at the first failure)
// without a compute pool (or one of a single thread) or for one copy; else
// the copies run on the pool, which hands them out in increasing order, and
// copies past a failure already seen are skipped, so the result is the same
// as the sequential one.
template <typename Fn>
size_t ForEachCopy(linalg::ComputePool* pool, size_t n, const Fn& fn) {
  if (n <= 1 || linalg::Parallelism(pool) <= 1) {
    for (size_t i = 0; i < n; ++i) {
      if (!fn(i)) return i;
    }
    return n;
  }
  std::atomic<size_t> first_fail{n};
  pool->ParallelFor(n, [&](size_t i) {
    if (i > first_fail.load()) return;
    if (!fn(i)) {
      size_t cur = first_fail.load();
      while (i < cur && !first_fail.compare_exchange_weak(cur, i)) {
      }
    }
  });
  return first_fail.load();
}

class GaussianBlock;

class GaussianPendingUpdate final : public PendingBlockUpdate {
 public:
  GaussianPendingUpdate(GaussianBlock* block, BlockStepOutput output)
      : block_(block), output_(std::move(output)) {}
  BlockStepOutput Commit(double kl_scale) override;

 private:
  GaussianBlock* block_;
  BlockStepOutput output_;
};

class GaussianBlock final : public ParameterBlock {
 public:
  GaussianBlock(std::string name, GaussianOptions options, Precision precision)
      : ParameterBlock(std::move(name)),
        options_(std::move(options)),
        precision_(precision) {}

  absl::string_view kind() const override { return kGaussianBlockKind; }

  bool MayWaitForEngine(int64_t) const override { return false; }  // its Cholesky factorisations are inline

  absl::StatusOr<std::unique_ptr<PendingBlockUpdate>> Propose(
      const BlockStepInput& step_input, const StepContext& context) override {
    const GaussianStepInput* input = std::get_if<GaussianStepInput>(&step_input);
    if (input == nullptr) {
      return Invalid(
          "needs the gaussian step input (param1, param2, grad1, grad2)");
    }
    if (absl::Status s = CheckShapes(*input); !s.ok()) return s;
    if (input->compositional.has_value()) {
      if (absl::Status s = CheckCompositional(*input->compositional); !s.ok()) return s;
    }
    const double gamma = options_.gamma->Value(context.step);
    if (!std::isfinite(gamma) || gamma < 0) {
      return Invalid(absl::StrCat("gamma schedule gave ", gamma, " at step ",
                                  context.step, "; it must be finite and >= 0"));
    }
    double damping = 0;
    if (input->compositional.has_value()) {
      damping = options_.likelihood_damping->Value(context.step);
      if (!std::isfinite(damping) || damping < 0) {
        return InvalidBlockField(name(), "likelihood_damping",
                                 absl::StrCat("is ", damping, " at step ", context.step,
                                              ", want finite and >= 0"));
      }
    }
    absl::StatusOr<BlockStepOutput> out =
        precision_ == Precision::kFloat32
            ? Step<float>(*input, gamma, damping, context.compute_pool)
            : Step<double>(*input, gamma, damping, context.compute_pool);
    if (!out.ok()) return out.status();
    out->hyperparameters["gamma"] = gamma;
    if (input->compositional.has_value()) out->hyperparameters["likelihood_damping"] = damping;
    out->hyperparameters["gamma_used"] =
        std::get<GaussianStepOutput>(out->kind_output).gamma_used;
    return std::make_unique<GaussianPendingUpdate>(this, *std::move(out));
  }

  BlockState ExportState() const override {
    BlockState state;
    record_.ExportTo(state);
    return state;
  }

  absl::Status ImportState(const BlockState& state) override {
    absl::StatusOr<StepSizeRecord> r = StepSizeRecord::Import(state, name(), kMaxMaxHalvings);
    if (!r.ok()) return r.status();
    record_ = *r;
    return absl::OkStatus();
  }

  int64_t StateBytes() const override {
    return sizeof(record_);
  }

 private:
  friend class GaussianPendingUpdate;

  absl::Status Invalid(absl::string_view what) const {
    return absl::InvalidArgumentError(
        absl::StrCat("block \"", name(), "\": ", what));
  }

  absl::Status CheckShapes(const StepInput& in) const {
    const int64_t m = options_.dim;
    const auto copies_ok = [&](size_t n, absl::string_view field) {
      return static_cast<int64_t>(n) == options_.copies
                 ? absl::OkStatus()
                 : Invalid(absl::StrCat("gaussian.", field, " has ", n,
                                        " copies, expected ", options_.copies));
    };
    for (const auto& [vecs, field] :
         {std::pair{&in.param1, "param1"}, std::pair{&in.grad1, "grad1"}}) {
      if (absl::Status s = copies_ok(vecs->size(), field); !s.ok()) return s;
      for (size_t i = 0; i < vecs->size(); ++i) {
        const Eigen::VectorXd& v = (*vecs)[i];
        if (v.size() != m) {
          return Invalid(absl::StrCat("gaussian.", field, "[", i, "] has ",
                                      v.size(), " entries, expected ", m));
        }
        if (!v.allFinite()) {
          return Invalid(absl::StrCat("gaussian.", field, "[", i,
                                      "] has a non-finite entry"));
        }
      }
    }
    for (const auto& [mats, field] :
         {std::pair{&in.param2, "param2"}, std::pair{&in.grad2, "grad2"}}) {
      if (absl::Status s = copies_ok(mats->size(), field); !s.ok()) return s;
      for (size_t i = 0; i < mats->size(); ++i) {
        const Eigen::MatrixXd& x = (*mats)[i];
        if (x.rows() != m || x.cols() != m) {
          return Invalid(absl::StrCat("gaussian.", field, "[", i, "] is ",
                                      x.rows(), "x", x.cols(), ", expected ", m,
                                      "x", m));
        }
        if (!x.allFinite()) {
          return Invalid(absl::StrCat("gaussian.", field, "[", i,
                                      "] has a non-finite entry"));
        }
      }
    }
    return absl::OkStatus();
  }

  // Shapes, finiteness and symmetry of a compositional input (in double;
  // positive definiteness of F + λI is checked by the step's Cholesky).
  absl::Status CheckCompositional(const GaussianCompositionalInput& c) const {
    const int64_t m = options_.dim;
    const auto field = [](absl::string_view f) {
      return absl::StrCat("gaussian.compositional.", f);
    };
    for (const auto& [v, f] : {std::pair{&c.samples, "samples"},
                               std::pair{&c.likelihood_gradients, "likelihood_gradients"},
                               std::pair{&c.likelihood_fisher, "likelihood_fisher"}}) {
      if (static_cast<int64_t>(v->size()) != options_.copies) {
        return InvalidBlockField(name(), field(f),
                                 absl::StrCat("has ", v->size(), " copies, want ", options_.copies));
      }
    }
    for (size_t i = 0; i < c.samples.size(); ++i) {
      const Eigen::MatrixXd& eps = c.samples[i];
      const int64_t ns = eps.rows();
      if (ns < 1 || eps.cols() != m) {
        return InvalidBlockField(name(), absl::StrCat(field("samples"), "[", i, "]"),
                                 absl::StrCat("is ", ns, "x", eps.cols(),
                                              ", want S x ", m, " with S >= 1"));
      }
      const Eigen::MatrixXd& g = c.likelihood_gradients[i];
      if (g.rows() != ns || g.cols() != m) {
        return InvalidBlockField(
            name(), absl::StrCat(field("likelihood_gradients"), "[", i, "]"),
            absl::StrCat("is ", g.rows(), "x", g.cols(), ", want ", ns, "x", m,
                         " (the samples' shape)"));
      }
      const Eigen::MatrixXd& fi = c.likelihood_fisher[i];
      int64_t want_rows = m, want_cols = m;
      if (c.fisher_form == FisherForm::kFull) want_rows = ns * m;
      if (c.fisher_form == FisherForm::kDiagonal) want_rows = ns;
      if (fi.rows() != want_rows || fi.cols() != want_cols) {
        return InvalidBlockField(
            name(), absl::StrCat(field("likelihood_fisher"), "[", i, "]"),
            absl::StrCat("is ", fi.rows(), "x", fi.cols(), ", want ", want_rows, "x",
                         want_cols, " for ", ns, " samples of dimension ", m));
      }
      for (const auto& [x, f] : {std::pair{&eps, "samples"},
                                 std::pair{&g, "likelihood_gradients"},
                                 std::pair{&fi, "likelihood_fisher"}}) {
        if (!x->allFinite()) {
          return InvalidBlockField(name(), absl::StrCat(field(f), "[", i, "]"),
                                   "has a non-finite entry");
        }
      }
      const int64_t nf = c.fisher_form == FisherForm::kFull ? ns : 0;
      for (int64_t s = 0; s < nf; ++s) {
        if (!IsNearlySymmetric<double>(fi.middleRows(s * m, m))) {
          return InvalidBlockField(
              name(), absl::StrCat(field("likelihood_fisher"), "[", i, "][", s, "]"),
              absl::StrCat("is not symmetric (max |F - F^T| > ", kSymmetryRelTolerance,
                           " max |F|)"));
        }
      }
      if (c.fisher_form == FisherForm::kShared && !IsNearlySymmetric<double>(fi)) {
        return InvalidBlockField(
            name(), absl::StrCat(field("likelihood_fisher"), "[", i, "]"),
            absl::StrCat("is not symmetric (max |F - F^T| > ", kSymmetryRelTolerance,
                         " max |F|)"));
      }
    }
    return absl::OkStatus();
  }

  // ξ from the client's parameters for the ξ-space step: symmetric second
  // parts symmetrised (as validated), the Cholesky factor as sent.
  template <typename T>
  GaussianParams<T> XiOf(const StepInput& in, size_t i) const {
    GaussianParams<T> x{in.param1[i].cast<T>(), in.param2[i].cast<T>()};
    if (options_.parametrization != GaussianParametrization::kMeanCholesky) {
      x.second = Symmetrize<T>(x.second);
    }
    return x;
  }

  template <typename T>
  absl::StatusOr<BlockStepOutput> Step(const StepInput& in, double gamma, double damping,
                                       linalg::ComputePool* pool) {
    const GaussianParametrization p = options_.parametrization;
    const size_t copies = in.param1.size();
    std::vector<GaussianForms<T>> q(copies);
    std::vector<ExpectationGradient<T>> v(copies);
    std::vector<absl::Status> errors(copies);
    const size_t first_bad = ForEachCopy(pool, copies, [&](size_t i) {
      // Values that overflow float become inf here; checked below.
      const GVector<T> p1 = in.param1[i].cast<T>();
      const GMatrix<T> p2 = in.param2[i].cast<T>();
      const GVector<T> g1 = in.grad1[i].cast<T>();
      const GMatrix<T> g2 = in.grad2[i].cast<T>();
      // The input was checked finite; only a float32 block's cast can overflow.
      if (sizeof(T) < sizeof(double) && (!p1.allFinite() || !p2.allFinite() ||
                                         !g1.allFinite() || !g2.allFinite())) {
        errors[i] = Invalid(
            absl::StrCat("gaussian input of copy ", i, " overflows float32"));
        return false;
      }
      absl::StatusOr<GaussianForms<T>> qi = GaussianFromParams<T>(
          p, p1, p2, absl::StrCat("gaussian.param2[", i, "]"));
      if (!qi.ok()) {
        errors[i] = Invalid(qi.status().message());
        return false;
      }
      q[i] = *std::move(qi);
      v[i] = in.gradient_space == StepInput::GradientSpace::kExpectation
                 ? ExpectationGradient<T>{g1, Symmetrize<T>(g2)}
                 : ExpectationGradientFrom<T>(p, q[i], g1, g2);
      if (!v[i].g1.allFinite() || !v[i].g2.allFinite()) {
        errors[i] = Invalid(absl::StrCat(
            "gaussian.grad1/grad2[", i,
            "] is not finite after conversion to dL/deta"));
        return false;
      }
      if (in.compositional.has_value()) {
        // The likelihood's (m, L)-gradient is a mean+chol gradient at the
        // current q whatever the block's parametrisation (L = chol(S)).
        GVector<T> um;
        GMatrix<T> ul;
        if (absl::Status s = LikelihoodMeanCholeskyGradient<T>(*in.compositional, i, damping,
                                                               name(), &um, &ul);
            !s.ok()) {
          errors[i] = s;
          return false;
        }
        const ExpectationGradient<T> lik = ExpectationGradientFrom<T>(
            GaussianParametrization::kMeanCholesky, q[i], um, ul);
        v[i].g1 += lik.g1;
        v[i].g2 += lik.g2;
        if (!v[i].g1.allFinite() || !v[i].g2.allFinite()) {
          errors[i] = InvalidBlockField(
              name(), absl::StrCat("gaussian.compositional[", i, "]"),
              "is not finite after conversion to dL/deta");
          return false;
        }
      }
      return true;
    });
    if (first_bad < copies) return errors[first_bad];
    const bool xi_step = options_.step_space == GaussianStepSpace::kXi &&
                         p != GaussianParametrization::kNatural;
    if (xi_step) return XiStep<T>(in, q, v, gamma, pool);

    // θ' = θ − γ' v with γ' = γ, γ/2, ...: the first γ' whose new point is a
    // Gaussian for every copy wins.
    std::vector<GaussianForms<T>> next(copies);
    int halvings = 0;
    double gamma_used = gamma;
    for (;; ++halvings, gamma_used *= 0.5) {
      const T g = static_cast<T>(gamma_used);
      const size_t failed_copy = ForEachCopy(pool, copies, [&](size_t i) {
        absl::StatusOr<GaussianForms<T>> qi = GaussianFromNatural<T>(
            q[i].theta1 - g * v[i].g1,
            T(-0.5) * q[i].precision - g * v[i].g2);
        if (!qi.ok() || !qi->mean.allFinite()) return false;
        next[i] = *std::move(qi);
        return true;
      });
      if (failed_copy >= copies) break;
      if (halvings >= options_.max_halvings) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "block \"%s\": the natural-gradient step left the "
            "positive-definite cone: -2 theta2' is not positive definite for "
            "copy %d even at gamma = %g after %d halvings (scheduled gamma "
            "%g); step rejected, nothing changed",
            name(), failed_copy, gamma_used, halvings, gamma));
      }
    }

    GaussianStepOutput out =
        SizedOutput(copies, gamma_used, halvings, options_.return_direction);
    ForEachCopy(pool, copies, [&](size_t i) {
      GaussianParams<T> np = GaussianToParams<T>(next[i], p);
      out.param1[i] = np.first.template cast<double>();
      out.param2[i] = np.second.template cast<double>();
      out.delta1[i] = out.param1[i] - in.param1[i];
      out.delta2[i] = out.param2[i] - in.param2[i];
      if (options_.return_direction) {
        GaussianParams<T> d = NaturalGradientDirection<T>(p, q[i], v[i]);
        out.direction1[i] = d.first.template cast<double>();
        out.direction2[i] = d.second.template cast<double>();
      }
      return true;
    });
    // What the client installs must be finite: near double's range the
    // difference from the old parameters can still overflow.
    for (size_t i = 0; i < copies; ++i) {
      if (!out.param1[i].allFinite() || !out.param2[i].allFinite() ||
          !out.delta1[i].allFinite() || !out.delta2[i].allFinite()) {
        return Invalid(absl::StrCat("gaussian.param1/param2 of copy ", i,
                                    " would be non-finite; step rejected, nothing changed"));
      }
    }
    BlockStepOutput result;
    result.kind_output = std::move(out);
    return result;
  }

  // ξ' = ξ − γ' d, d the natural-gradient direction in ξ at q, with the
  // same halving of γ' while some copy's ξ' is not a Gaussian in p.
  template <typename T>
  absl::StatusOr<BlockStepOutput> XiStep(const StepInput& in,
                                         const std::vector<GaussianForms<T>>& q,
                                         const std::vector<ExpectationGradient<T>>& v,
                                         double gamma, linalg::ComputePool* pool) {
    const GaussianParametrization p = options_.parametrization;
    const size_t copies = q.size();
    std::vector<GaussianParams<T>> xi(copies), dir(copies), next(copies);
    ForEachCopy(pool, copies, [&](size_t i) {
      xi[i] = XiOf<T>(in, i);
      dir[i] = NaturalGradientDirection<T>(p, q[i], v[i]);
      return true;
    });
    int halvings = 0;
    double gamma_used = gamma;
    for (;; ++halvings, gamma_used *= 0.5) {
      const T g = static_cast<T>(gamma_used);
      const size_t failed_copy = ForEachCopy(pool, copies, [&](size_t i) {
        GaussianParams<T> x{xi[i].first - g * dir[i].first, xi[i].second - g * dir[i].second};
        if (p == GaussianParametrization::kMeanCholesky) {
          // The direction is lower triangular; keep the zeros exact.
          x.second = GMatrix<T>(x.second.template triangularView<Eigen::Lower>());
        } else {
          x.second = Symmetrize<T>(x.second);  // rounding only
        }
        if (!x.first.allFinite() || !x.second.allFinite()) return false;
        absl::StatusOr<GaussianForms<T>> qi = GaussianFromParams<T>(p, x.first, x.second);
        if (!qi.ok() || !qi->mean.allFinite()) return false;
        next[i] = std::move(x);
        return true;
      });
      if (failed_copy >= copies) break;
      if (halvings >= options_.max_halvings) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "block \"%s\": the xi-space natural-gradient step left the parametrisation's "
            "domain: param2' of copy %d is not a Gaussian in %s parameters even at gamma = %g "
            "after %d halvings (scheduled gamma %g); step rejected, nothing changed",
            name(), failed_copy, std::string(GaussianParametrizationName(p)), gamma_used,
            halvings, gamma));
      }
    }
    GaussianStepOutput out =
        SizedOutput(copies, gamma_used, halvings, options_.return_direction);
    for (size_t i = 0; i < copies; ++i) {
      out.param1[i] = next[i].first.template cast<double>();
      out.param2[i] = next[i].second.template cast<double>();
      out.delta1[i] = out.param1[i] - in.param1[i];
      out.delta2[i] = out.param2[i] - in.param2[i];
      if (options_.return_direction) {
        out.direction1[i] = dir[i].first.template cast<double>();
        out.direction2[i] = dir[i].second.template cast<double>();
      }
      if (!out.param1[i].allFinite() || !out.param2[i].allFinite() ||
          !out.delta1[i].allFinite() || !out.delta2[i].allFinite()) {
        return Invalid(absl::StrCat("gaussian.param1/param2 of copy ", i,
                                    " would be non-finite; step rejected, nothing changed"));
      }
    }
    BlockStepOutput result;
    result.kind_output = std::move(out);
    return result;
  }

  GaussianOptions options_;
  Precision precision_;
  StepSizeRecord record_;
};

BlockStepOutput GaussianPendingUpdate::Commit(double /*kl_scale*/) {
  // Not KL-clipped: γ is the Gaussian step's only scale.
  ++block_->record_.steps;
  const auto& g = std::get<GaussianStepOutput>(output_.kind_output);
  block_->record_.gamma_used = g.gamma_used;
  block_->record_.halvings = g.halvings;
  return std::move(output_);
}

}  // namespace

absl::StatusOr<std::unique_ptr<ParameterBlock>> NewGaussianBlock(
    std::string name, const GaussianOptions& options, Precision precision) {
  GaussianOptions o = options;
  const auto invalid = [&](absl::string_view what) {
    return absl::InvalidArgumentError(
        absl::StrCat("block \"", name, "\": ", what));
  };
  if (o.dim < 1) return invalid(absl::StrCat("gaussian dim = ", o.dim, " < 1"));
  if (o.copies == 0) o.copies = 1;
  if (o.copies < 0) {
    return invalid(absl::StrCat("gaussian copies = ", o.copies, " < 0"));
  }
  if (o.max_halvings == -1) o.max_halvings = kDefaultMaxHalvings;
  if (o.max_halvings < 0 || o.max_halvings > kMaxMaxHalvings) {
    return invalid(absl::StrCat("gaussian max_halvings = ", o.max_halvings,
                                " is not in [-1, ", kMaxMaxHalvings, "]"));
  }
  switch (o.parametrization) {
    case GaussianParametrization::kNatural:
    case GaussianParametrization::kExpectation:
    case GaussianParametrization::kMeanCovariance:
    case GaussianParametrization::kMeanCholesky:
      break;
    default:
      return invalid("unknown gaussian parametrization");
  }
  if (o.gamma == nullptr) o.gamma = ConstantSchedule(1.0);
  if (o.likelihood_damping == nullptr) o.likelihood_damping = ConstantSchedule(0.0);
  if (o.step_space != GaussianStepSpace::kTheta && o.step_space != GaussianStepSpace::kXi) {
    return invalid("unknown gaussian step_space");
  }
  return std::make_unique<GaussianBlock>(std::move(name), std::move(o),
                                         precision);
}

}  // namespace natgrad::core
