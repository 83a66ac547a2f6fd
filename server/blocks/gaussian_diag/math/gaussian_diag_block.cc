#include "server/blocks/gaussian_diag/math/gaussian_diag_block.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "absl/strings/str_cat.h"
#include "server/core/block_error.h"
#include "server/core/step_size_record.h"
#include "server/linalg/compute_pool.h"

namespace natgrad::core {
namespace {

using P = GaussianDiagParametrization;
using Space = GaussianStepInput::GradientSpace;

constexpr int kMaxHalvings = 64;
// Elements per parallel chunk: large enough that a chunk costs far more
// than handing it out.
constexpr int64_t kChunk = int64_t{1} << 16;

template <typename T>
using Array = Eigen::Array<T, Eigen::Dynamic, 1>;

// A tensor's values as a flat array in T (copies only when the dtype differs).
template <typename T>
Array<T> Flat(const DenseTensor& t) {
  const Eigen::Index n = t.size();
  if ((sizeof(T) == 4) == (t.dtype() == DType::kFloat32)) {
    return Eigen::Map<const Array<T>, Eigen::Unaligned>(reinterpret_cast<const T*>(t.data()), n);
  }
  if (t.dtype() == DType::kFloat32) {
    return Eigen::Map<const Array<float>, Eigen::Unaligned>(
               reinterpret_cast<const float*>(t.data()), n)
        .template cast<T>();
  }
  return Eigen::Map<const Array<double>, Eigen::Unaligned>(
             reinterpret_cast<const double*>(t.data()), n)
      .template cast<T>();
}

// Runs fn(begin, end) over [0, n) in chunks, on the pool when there is one.
void ForChunks(linalg::ComputePool* pool, int64_t n, absl::FunctionRef<void(int64_t, int64_t)> fn) {
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  if (pool == nullptr || chunks <= 1) {
    if (n > 0) fn(0, n);
    return;
  }
  pool->ParallelFor(static_cast<size_t>(chunks), [&](size_t c) {
    const int64_t b = static_cast<int64_t>(c) * kChunk;
    fn(b, std::min(n, b + kChunk));
  });
}

class GaussianDiagBlock;

class GaussianDiagPendingUpdate final : public PendingBlockUpdate {
 public:
  GaussianDiagPendingUpdate(GaussianDiagBlock* block, BlockStepOutput output)
      : block_(block), output_(std::move(output)) {}
  BlockStepOutput Commit(double) override;  // not KL-clipped: γ is the scale

 private:
  GaussianDiagBlock* block_;
  BlockStepOutput output_;
};

class GaussianDiagBlock final : public ParameterBlock {
 public:
  GaussianDiagBlock(std::string name, GaussianDiagOptions options, Precision precision)
      : ParameterBlock(std::move(name)), options_(std::move(options)), precision_(precision) {}

  absl::string_view kind() const override { return kGaussianDiagBlockKind; }

  bool MayWaitForEngine(int64_t) const override { return false; }  // no decompositions

  absl::StatusOr<std::unique_ptr<PendingBlockUpdate>> Propose(
      const BlockStepInput& step_input, const StepContext& context) override {
    absl::StatusOr<const GaussianDiagStepInput*> in = InputOf<GaussianDiagStepInput>(step_input);
    if (!in.ok()) return in.status();
    const int64_t n = options_.copies * options_.dim;
    for (auto [t, field] : {std::pair{&(*in)->param1, "gaussian.param1"},
                            std::pair{&(*in)->param2, "gaussian.param2"},
                            std::pair{&(*in)->grad1, "gaussian.grad1"},
                            std::pair{&(*in)->grad2, "gaussian.grad2"}}) {
      if (t->size() != n) {
        return InvalidBlockField(name(), field,
                                 absl::StrCat("has ", t->size(), " values, want copies x dim = ", n));
      }
    }
    const double gamma = options_.gamma->Value(context.step);
    if (!std::isfinite(gamma) || gamma < 0) {
      return InvalidBlockField(name(), "gamma",
                               absl::StrCat("is ", gamma, " at step ", context.step,
                                            ", want finite and >= 0"));
    }
    absl::StatusOr<BlockStepOutput> out =
        precision_ == Precision::kFloat32 ? Step<float>(**in, gamma, context.compute_pool)
                                          : Step<double>(**in, gamma, context.compute_pool);
    if (!out.ok()) return out.status();
    const auto& g = std::get<GaussianDiagStepOutput>(out->kind_output);
    out->hyperparameters = {{"gamma", gamma}, {"gamma_used", g.gamma_used}};
    return std::make_unique<GaussianDiagPendingUpdate>(this, *std::move(out));
  }

  BlockState ExportState() const override {
    BlockState state;
    record_.ExportTo(state);
    return state;
  }

  absl::Status ImportState(const BlockState& state) override {
    absl::StatusOr<StepSizeRecord> r = StepSizeRecord::Import(state, name(), kMaxHalvings);
    if (!r.ok()) return r.status();
    record_ = *r;
    return absl::OkStatus();
  }

  int64_t StateBytes() const override { return sizeof(record_); }

 private:
  friend class GaussianDiagPendingUpdate;

  template <typename T>
  absl::StatusOr<BlockStepOutput> Step(const GaussianDiagStepInput& in, double gamma,
                                       linalg::ComputePool* pool) const {
    const int64_t n = options_.copies * options_.dim;
    const Array<T> p1 = Flat<T>(in.param1), p2 = Flat<T>(in.param2);
    const Array<T> g1 = Flat<T>(in.grad1), g2 = Flat<T>(in.grad2);
    const std::vector<int64_t> shape = {options_.copies, options_.dim};
    const P param = options_.parametrization;

    // Pass 1: (m, s), ∂L/∂η = v, natural parameters θ; the first element
    // outside the cone is reported.
    Array<T> m(n), s(n), v1(n), v2(n);
    std::atomic<int64_t> bad{n};
    ForChunks(pool, n, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        T mi, si;
        switch (param) {
          case P::kNatural:
            si = T(-0.5) / p2[i];
            mi = p1[i] * si;
            break;
          case P::kExpectation:
            mi = p1[i];
            si = p2[i] - p1[i] * p1[i];
            break;
          case P::kMeanVariance:
            mi = p1[i];
            si = p2[i];
            break;
          case P::kMeanLogStd:
            mi = p1[i];
            si = std::exp(T(2) * p2[i]);
            break;
        }
        if (!(si > T(0)) || !std::isfinite(si) || !std::isfinite(mi)) {
          int64_t cur = bad.load();
          while (i < cur && !bad.compare_exchange_weak(cur, i)) {
          }
          continue;
        }
        m[i] = mi;
        s[i] = si;
        T a = g1[i], c = g2[i];
        if (in.gradient_space == Space::kParametrization) {
          T dm = a, ds = c;
          switch (param) {
            case P::kNatural:
              dm = a / si;
              ds = c / (T(2) * si * si) - mi * a / (si * si);
              break;
            case P::kExpectation:
              dm = a + T(2) * mi * c;  // so that v = (a, c) below
              ds = c;
              break;
            case P::kMeanVariance:
              break;
            case P::kMeanLogStd:
              ds = c / (T(2) * si);
              break;
          }
          a = dm - T(2) * mi * ds;
          c = ds;
        }
        v1[i] = a;
        v2[i] = c;
      }
    });
    if (bad.load() < n) {
      const int64_t i = bad.load();
      return InvalidBlockField(
          name(), "gaussian.param2",
          absl::StrCat("gives no positive variance at [", i / options_.dim, ", ", i % options_.dim,
                       "] (copy, element)"));
    }
    // The natural-gradient direction ξ̇ = (∂ξ/∂θ) v of element i.
    const auto direction = [&](int64_t i, T* r1, T* r2) {
      const T mi = m[i], si = s[i];
      const T dm = si * v1[i] + T(2) * mi * si * v2[i];
      const T ds = T(2) * si * si * v2[i];
      switch (param) {
        case P::kNatural:
          *r1 = v1[i];
          *r2 = v2[i];
          break;
        case P::kExpectation:
          *r1 = dm;
          *r2 = ds + T(2) * mi * dm;
          break;
        case P::kMeanVariance:
          *r1 = dm;
          *r2 = ds;
          break;
        case P::kMeanLogStd:
          *r1 = dm;
          *r2 = ds / (T(2) * si);
          break;
      }
    };
    // The variance of the client's (a, c), NaN when it is none.
    const auto variance = [&](T a, T c) -> T {
      switch (param) {
        case P::kNatural:
          return T(-0.5) / c;
        case P::kExpectation:
          return c - a * a;
        case P::kMeanVariance:
          return c;
        case P::kMeanLogStd:
          return std::exp(T(2) * c);
      }
      return std::numeric_limits<T>::quiet_NaN();
    };
    const bool xi = options_.step_space == GaussianDiagStepSpace::kXi && param != P::kNatural;
    // Pass 2: θ' = θ − γ v (or ξ' = ξ − γ ξ̇ into t1, t2), halving γ while
    // some s' is not positive.
    Array<T> theta1 = m / s, theta2 = T(-0.5) / s;
    int halvings = 0;
    double used = gamma;
    Array<T> t1(n), t2(n);
    for (;; ++halvings, used *= 0.5) {
      std::atomic<bool> ok{true};
      const T gam = static_cast<T>(used);
      ForChunks(pool, n, [&](int64_t b, int64_t e) {
        bool chunk_ok = true;
        if (xi) {
          for (int64_t i = b; i < e; ++i) {
            T r1, r2;
            direction(i, &r1, &r2);
            t1[i] = p1[i] - gam * r1;
            t2[i] = p2[i] - gam * r2;
            const T sn = variance(t1[i], t2[i]);
            chunk_ok &= std::isfinite(t1[i]) && std::isfinite(t2[i]) && sn > T(0) &&
                        std::isfinite(sn);
          }
        } else {
          for (int64_t i = b; i < e; ++i) {
            t1[i] = theta1[i] - gam * v1[i];
            t2[i] = theta2[i] - gam * v2[i];
            chunk_ok &= (t2[i] < T(0)) && std::isfinite(t1[i]) &&
                        std::isfinite(T(-0.5) / t2[i]);
          }
        }
        if (!chunk_ok) ok.store(false);
      });
      if (ok.load()) break;
      if (halvings >= options_.max_halvings) {
        return InvalidBlockField(
            name(), "gaussian",
            absl::StrCat("step leaves the positive variances with gamma ", gamma, " and ",
                         halvings, " halvings; the gradients are too large for this gamma"));
      }
    }
    // Pass 3: new parameters, deltas and (on request) directions.
    GaussianDiagStepOutput out;
    out.gamma_used = used;
    out.halvings = halvings;
    out.param1 = DenseTensor::Zeros<T>(shape);
    out.param2 = DenseTensor::Zeros<T>(shape);
    out.delta1 = DenseTensor::Zeros<T>(shape);
    out.delta2 = DenseTensor::Zeros<T>(shape);
    if (options_.return_direction) {
      out.direction1 = DenseTensor::Zeros<T>(shape);
      out.direction2 = DenseTensor::Zeros<T>(shape);
    }
    T* q1 = out.param1.MutableData<T>();
    T* q2 = out.param2.MutableData<T>();
    T* d1 = out.delta1.MutableData<T>();
    T* d2 = out.delta2.MutableData<T>();
    T* r1 = options_.return_direction ? out.direction1.MutableData<T>() : nullptr;
    T* r2 = options_.return_direction ? out.direction2.MutableData<T>() : nullptr;
    ForChunks(pool, n, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const T sn = T(-0.5) / t2[i];
        const T mn = t1[i] * sn;
        T a = t1[i], c = t2[i];  // the ξ step's result as is
        if (!xi) switch (param) {
          case P::kNatural:
            a = t1[i];
            c = t2[i];
            break;
          case P::kExpectation:
            a = mn;
            c = sn + mn * mn;
            break;
          case P::kMeanVariance:
            a = mn;
            c = sn;
            break;
          case P::kMeanLogStd:
            a = mn;
            c = T(0.5) * std::log(sn);
            break;
        }
        q1[i] = a;
        q2[i] = c;
        d1[i] = a - p1[i];
        d2[i] = c - p2[i];
        if (r1 != nullptr) direction(i, &r1[i], &r2[i]);
      }
    });
    BlockStepOutput result;
    result.kind_output = std::move(out);
    return result;
  }

  GaussianDiagOptions options_;
  Precision precision_;
  StepSizeRecord record_;
};

BlockStepOutput GaussianDiagPendingUpdate::Commit(double) {
  const auto& g = std::get<GaussianDiagStepOutput>(output_.kind_output);
  ++block_->record_.steps;
  block_->record_.gamma_used = g.gamma_used;
  block_->record_.halvings = g.halvings;
  return std::move(output_);
}

}  // namespace

absl::Status ValidateGaussianDiagOptions(absl::string_view name, const GaussianDiagOptions& o) {
  if (o.dim < 1) return InvalidBlockField(name, "gaussian_diag.dim", absl::StrCat("is ", o.dim, ", want >= 1"));
  if (o.copies < 1) {
    return InvalidBlockField(name, "gaussian_diag.copies", absl::StrCat("is ", o.copies, ", want >= 1"));
  }
  if (o.dim > (int64_t{1} << 40) / o.copies) {
    return InvalidBlockField(name, "gaussian_diag", "copies x dim is too large");
  }
  if (o.max_halvings < 0 || o.max_halvings > kMaxHalvings) {
    return InvalidBlockField(name, "gaussian_diag.max_halvings",
                             absl::StrCat("is ", o.max_halvings, ", want 0 to ", kMaxHalvings));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<ParameterBlock>> NewGaussianDiagBlock(
    std::string name, const GaussianDiagOptions& options, Precision precision) {
  if (absl::Status s = ValidateGaussianDiagOptions(name, options); !s.ok()) return s;
  GaussianDiagOptions o = options;
  if (o.gamma == nullptr) o.gamma = ConstantSchedule(1.0);
  return std::make_unique<GaussianDiagBlock>(std::move(name), std::move(o), precision);
}

}  // namespace natgrad::core
