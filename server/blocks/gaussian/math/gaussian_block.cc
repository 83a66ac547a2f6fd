#include "server/blocks/gaussian/math/gaussian_block.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "server/core/step_size_record.h"
#include "absl/strings/str_format.h"
#include "server/blocks/gaussian/math/gaussian_gradient.h"
#include "server/blocks/gaussian/math/gaussian_linalg.h"
#include "server/blocks/gaussian/math/natural_gradient_direction.h"
#include "server/linalg/compute_pool.h"

namespace natgrad::core {
namespace {

using StepInput = GaussianStepInput;

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

  absl::StatusOr<std::unique_ptr<PendingBlockUpdate>> Propose(
      const BlockStepInput& step_input, const StepContext& context) override {
    const GaussianStepInput* input = std::get_if<GaussianStepInput>(&step_input);
    if (input == nullptr) {
      return Invalid(
          "needs the gaussian step input (param1, param2, grad1, grad2)");
    }
    if (absl::Status s = CheckShapes(*input); !s.ok()) return s;
    const double gamma = options_.gamma->Value(context.step);
    if (!std::isfinite(gamma) || gamma < 0) {
      return Invalid(absl::StrCat("gamma schedule gave ", gamma, " at step ",
                                  context.step, "; it must be finite and >= 0"));
    }
    absl::StatusOr<BlockStepOutput> out =
        precision_ == Precision::kFloat32
            ? Step<float>(*input, gamma, context.compute_pool)
            : Step<double>(*input, gamma, context.compute_pool);
    if (!out.ok()) return out.status();
    out->hyperparameters["gamma"] = gamma;
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

  template <typename T>
  absl::StatusOr<BlockStepOutput> Step(const StepInput& in, double gamma,
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
      if (!p1.allFinite() || !p2.allFinite() || !g1.allFinite() ||
          !g2.allFinite()) {
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
      return true;
    });
    if (first_bad < copies) return errors[first_bad];

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

    GaussianStepOutput out;
    out.gamma_used = gamma_used;
    out.halvings = halvings;
    out.param1.resize(copies);
    out.param2.resize(copies);
    out.delta1.resize(copies);
    out.delta2.resize(copies);
    if (options_.return_direction) {
      out.direction1.resize(copies);
      out.direction2.resize(copies);
    }
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
  return std::make_unique<GaussianBlock>(std::move(name), std::move(o),
                                         precision);
}

}  // namespace natgrad::core
