// Step pieces K-FAC and EKFAC share: client and state tensors read into the
// state precision, raw statistics validated against the layer, the step's
// hyperparameters resolved from the schedules, the commit bound and the
// momentum it installs. Both blocks take the
// same KfacStepInput, so they refuse the same inputs with the same messages.
#ifndef NATGRAD_SERVER_BLOCKS_KFAC_DENSE_MATH_KFAC_STEP_CHECKS_H_
#define NATGRAD_SERVER_BLOCKS_KFAC_DENSE_MATH_KFAC_STEP_CHECKS_H_

#include <cmath>
#include <cstdint>
#include <map>
#include <optional>
#include <string>

#include "Eigen/Core"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "server/blocks/kfac_dense/math/kfac_kernels.h"
#include "server/core/block.h"
#include "server/core/block_error.h"
#include "server/core/first_order_checks.h"
#include "server/core/schedule.h"

namespace natgrad::core::kfac {

inline std::string Shape(Eigen::Index rows, Eigen::Index cols) {
  return absl::StrCat("[", rows, ", ", cols, "]");
}

// "" when all finite, else where the first non-finite value is.
inline std::string NonFiniteAt(const Eigen::MatrixXd& m) {
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

// Shape and finiteness of a matrix, then the cast to the state precision
// (float32 blocks also refuse values beyond float range).
template <typename Scalar>
absl::StatusOr<Matrix<Scalar>> CheckedCast(absl::string_view block,
                                           absl::string_view field,
                                           const Eigen::MatrixXd& m,
                                           Eigen::Index rows,
                                           Eigen::Index cols) {
  if (m.rows() != rows || m.cols() != cols) {
    return InvalidBlockField(block, field,
                             absl::StrCat("has shape ", Shape(m.rows(), m.cols()),
                                          ", want ", Shape(rows, cols)));
  }
  if (std::string where = NonFiniteAt(m); !where.empty()) {
    return InvalidBlockField(block, field, where);
  }
  Matrix<Scalar> out = m.template cast<Scalar>();
  if (!out.allFinite()) {
    return InvalidBlockField(block, field, "has values beyond float32 range");
  }
  return out;
}

// Whether reading a `t` into Scalar can overflow (float64 values into a
// float32 block). Every other read is exact, so the tensor's own finiteness
// decides, and a received tensor's is known without a second scan
// (DenseTensor::FromCheckedBytes).
template <typename Scalar>
bool Narrows(const DenseTensor& t) {
  return sizeof(Scalar) < sizeof(double) && t.dtype() == DType::kFloat64;
}

// The same for a client tensor, read straight into Scalar from its dtype.
template <typename Scalar>
absl::StatusOr<Matrix<Scalar>> CheckedTensor(absl::string_view block,
                                             absl::string_view field,
                                             const DenseTensor& t,
                                             Eigen::Index rows,
                                             Eigen::Index cols) {
  if (t.rows() != rows || t.cols() != cols) {
    return InvalidBlockField(block, field,
                             absl::StrCat("has shape ", Shape(t.rows(), t.cols()),
                                          ", want ", Shape(rows, cols)));
  }
  Matrix<Scalar> out = t.template ToMatrix<Scalar>();
  if (Narrows<Scalar>(t) ? !out.allFinite() : !t.AllFinite()) {
    if (!t.AllFinite()) {
      // Locate it for the message (the error path only).
      return InvalidBlockField(block, field,
                               NonFiniteAt(t.template ToMatrix<double>()));
    }
    return InvalidBlockField(block, field, "has values beyond float32 range");
  }
  return out;
}

// Raw statistics (KfacStatisticsInput::Form::kRaw) read into Scalar: a
// [rows, d_in] and g [rows, d_out], rows = n examples * `locations` each.
template <typename Scalar>
struct RawStatistics {
  Matrix<Scalar> a;
  Matrix<Scalar> g;
  int64_t rows = 0;
  int64_t locations = 1;  // resolved: the step's, else the block's
  int64_t examples() const { return rows / locations; }
};

// Checks the shapes of raw statistics against a layer of d_in inputs and
// d_out outputs (fields "kfac.raw.*"); `default_locations` applies when the
// step sets none. Returns rows and the resolved locations (a and g unread).
template <typename Scalar>
absl::StatusOr<RawStatistics<Scalar>> CheckedRawShapes(absl::string_view block,
                                                      const KfacStatisticsInput& s,
                                                      int64_t d_in, int64_t d_out,
                                                      int64_t default_locations) {
  const DenseTensor& a = s.activations;
  const DenseTensor& g = s.output_gradients;
  const int64_t rows = a.rows();
  if (s.locations < 0) {
    return InvalidBlockField(block, "kfac.raw.locations",
                             absl::StrCat("is ", s.locations, ", want >= 0"));
  }
  const int64_t loc = s.locations > 0 ? s.locations : default_locations;
  if (a.cols() != d_in) {
    return InvalidBlockField(block, "kfac.raw.activations",
                             absl::StrCat("has ", a.cols(), " columns, want ", d_in));
  }
  if (g.cols() != d_out) {
    return InvalidBlockField(block, "kfac.raw.output_gradients",
                             absl::StrCat("has ", g.cols(), " columns, want ", d_out));
  }
  if (rows == 0) return InvalidBlockField(block, "kfac.raw.activations", "has 0 rows");
  if (g.rows() != rows) {
    return InvalidBlockField(block, "kfac.raw.output_gradients",
                             absl::StrCat("has ", g.rows(), " rows, want ", rows,
                                          " (as kfac.raw.activations)"));
  }
  if (rows % loc != 0) {
    return InvalidBlockField(block, "kfac.raw.activations",
                             absl::StrCat("has ", rows, " rows, want a multiple of "
                                          "locations (", loc, ")"));
  }
  RawStatistics<Scalar> out;
  out.rows = rows;
  out.locations = loc;
  return out;
}

// The same, with a and g read into Scalar (column-major copies).
template <typename Scalar>
absl::StatusOr<RawStatistics<Scalar>> CheckedRawStatistics(
    absl::string_view block, const KfacStatisticsInput& s, int64_t d_in,
    int64_t d_out, int64_t default_locations) {
  absl::StatusOr<RawStatistics<Scalar>> out =
      CheckedRawShapes<Scalar>(block, s, d_in, d_out, default_locations);
  if (!out.ok()) return out.status();
  const int64_t rows = out->rows;
  absl::StatusOr<Matrix<Scalar>> as = CheckedTensor<Scalar>(
      block, "kfac.raw.activations", s.activations, rows, s.activations.cols());
  if (!as.ok()) return as.status();
  absl::StatusOr<Matrix<Scalar>> gs = CheckedTensor<Scalar>(
      block, "kfac.raw.output_gradients", s.output_gradients, rows, s.output_gradients.cols());
  if (!gs.ok()) return gs.status();
  out->a = *std::move(as);
  out->g = *std::move(gs);
  return out;
}

// Whether a raw statistics tensor (shape already checked) reads into Scalar
// finite: known from the wire when it is already Scalar, else read and
// checked as CheckedTensor does (its error).
template <typename Scalar>
absl::Status CheckedRawValues(absl::string_view block, absl::string_view field,
                              const DenseTensor& t) {
  const bool same = (t.dtype() == DType::kFloat32) == std::is_same_v<Scalar, float>;
  if (same && t.AllFinite()) return absl::OkStatus();
  return CheckedTensor<Scalar>(block, field, t, t.rows(), t.cols()).status();
}

// x^T x / divisor of a raw statistics tensor (shape already checked), with a
// column of ones appended when append_one: straight from the received bytes
// when they are already Scalar (no copy), else read into Scalar first with
// CheckedTensor's checks.
//
// From the bytes, the Gram is its own finiteness check, so the tensor needs
// no scan before it (wire::TakeTensorUnscanned): a non-finite x_ij makes
// diagonal entry j, a sum of squares, +Inf or NaN, and nothing brings a sum
// back from those. So a finite Gram means finite values; a non-finite one is
// either a non-finite value (found by a scan, for CheckedTensor's message) or
// finite values whose products overflow, refused with `overflow` ("overflows
// in a^T a / n"). The returned Gram is finite.
template <typename Scalar>
absl::StatusOr<Matrix<Scalar>> CheckedRawGram(absl::string_view block, absl::string_view field,
                                              const DenseTensor& t, bool append_one,
                                              Scalar divisor, linalg::ComputePool* pool,
                                              absl::string_view overflow) {
  const bool same = (t.dtype() == DType::kFloat32) == std::is_same_v<Scalar, float>;
  Matrix<Scalar> gram;
  if (same) {
    gram = GramFactorRowMajor<Scalar>(reinterpret_cast<const Scalar*>(t.data()), t.rows(),
                                      t.cols(), append_one, divisor, pool);
    if (!gram.allFinite() && !t.AllFinite()) {
      return InvalidBlockField(block, field, NonFiniteAt(t.template ToMatrix<double>()));
    }
  } else {
    absl::StatusOr<Matrix<Scalar>> x = CheckedTensor<Scalar>(block, field, t, t.rows(), t.cols());
    if (!x.ok()) return x.status();
    gram = GramFactor<Scalar>(*x, append_one, divisor, pool);
  }
  if (!gram.allFinite()) return InvalidBlockField(block, field, overflow);
  return gram;
}

// One step's hyperparameters, from the schedules (normalized: non-null) or
// the step's overrides, checked for the step they apply to.
struct StepHyperparameters {
  double lr = 0, damping = 0, momentum = 0, weight_decay = 0;
};

inline absl::StatusOr<StepHyperparameters> ResolveStepHyperparameters(
    absl::string_view block, int64_t t, const KfacStepInput& input,
    const StepContext& context, const SchedulePtr& learning_rate,
    const SchedulePtr& damping, const SchedulePtr& momentum,
    const SchedulePtr& weight_decay) {
  StepHyperparameters h;
  h.lr = input.learning_rate ? *input.learning_rate : learning_rate->Value(t);
  h.momentum = momentum->Value(t);
  h.weight_decay = weight_decay->Value(t);
  h.damping = context.damping_override ? *context.damping_override : damping->Value(t);
  if (!std::isfinite(h.lr) || h.lr < 0) {
    return InvalidBlockField(block, "learning_rate",
                             absl::StrCat("is ", h.lr, " at step ", t, ", want >= 0"));
  }
  // Momentum >= 1 grows the buffer without bound.
  if (!(h.momentum >= 0 && h.momentum < 1)) {
    return InvalidBlockField(block, "momentum", absl::StrCat("is ", h.momentum, " at step ", t,
                                                             ", want in [0, 1)"));
  }
  if (!(h.weight_decay >= 0 && std::isfinite(h.weight_decay))) {
    return InvalidBlockField(block, "weight_decay",
                             absl::StrCat("is ", h.weight_decay, " at step ", t, ", want >= 0"));
  }
  if (!std::isfinite(h.damping) || h.damping <= 0) {
    return InvalidBlockField(block, context.damping_override ? "damping_override" : "damping",
                             absl::StrCat("is ", h.damping, " at step ", t, ", want > 0"));
  }
  return h;
}

// Steps run 1, 2, ... and each after the block's last one.
inline absl::Status CheckStepOrder(absl::string_view block, int64_t t, int64_t last_step) {
  if (t < 1) return InvalidBlockField(block, "step", absl::StrCat("is ", t, ", want >= 1"));
  if (t <= last_step) {
    return BlockError(absl::StatusCode::kFailedPrecondition, block, "step",
                      absl::StrCat(t, " is not after the block's last step ", last_step));
  }
  return absl::OkStatus();
}

// The step's gradient and (optional) parameters, [rows, cols] each.
template <typename Scalar>
struct StepTensors {
  Matrix<Scalar> gradient;
  std::optional<Matrix<Scalar>> params;
};

template <typename Scalar>
absl::StatusOr<StepTensors<Scalar>> CheckedStepTensors(absl::string_view block,
                                                       const KfacStepInput& input,
                                                       Eigen::Index rows, Eigen::Index cols) {
  StepTensors<Scalar> out;
  absl::StatusOr<Matrix<Scalar>> grad =
      CheckedTensor<Scalar>(block, "gradient", input.gradient, rows, cols);
  if (!grad.ok()) return grad.status();
  out.gradient = *std::move(grad);
  if (input.params) {
    absl::StatusOr<Matrix<Scalar>> p =
        CheckedTensor<Scalar>(block, "params", *input.params, rows, cols);
    if (!p.ok()) return p.status();
    out.params = *std::move(p);
  }
  return out;
}

// Commit installs scale * v + decayed as the momentum and returns -lr times
// it, for a KL scale in (0, 1]; |v| + |decayed| bounds both for every such
// scale, so checking the bound at Propose keeps Commit from producing Inf.
//
// The bound is nonnegative and lr * x is monotone in x, so its largest entry
// decides every check: one fused pass in double (NaN propagated), with no
// bound matrix allocated (float64 copies of the layer, several passes, before).
template <typename Scalar>
absl::Status CheckCommittable(const std::string& block, const Matrix<Scalar>& v,
                              const std::optional<Matrix<Scalar>>& decayed, double lr,
                              DType gradient_dtype) {
  if (v.size() == 0) return absl::OkStatus();
  const double largest =
      decayed ? (v.template cast<double>().cwiseAbs() + decayed->template cast<double>().cwiseAbs())
                    .template maxCoeff<Eigen::PropagateNaN>()
              : v.template cast<double>().cwiseAbs().template maxCoeff<Eigen::PropagateNaN>();
  const DType kState = sizeof(Scalar) == 4 ? DType::kFloat32 : DType::kFloat64;
  const Eigen::Matrix<double, 1, 1> at_most(largest);
  if (absl::Status s = first_order_internal::CheckCommittable(block, "momentum", kState, at_most);
      !s.ok()) {
    return s;
  }
  return first_order_internal::CheckCommittable(
      block, "delta", gradient_dtype == DType::kFloat32 ? DType::kFloat32 : kState, lr * at_most);
}

// <x, y> accumulated in double.
template <typename Scalar>
double Dot(const Matrix<Scalar>& x, const Matrix<Scalar>& y) {
  return (x.template cast<double>().array() * y.template cast<double>().array()).sum();
}

// The momentum Commit installs for a KL scale: mu m_old + scale V, with
// decayed = mu m_old (absent when mu = 0).
template <typename Scalar>
Matrix<Scalar> MomentumAt(double scale, const Matrix<Scalar>& v,
                          const std::optional<Matrix<Scalar>>& decayed) {
  Matrix<Scalar> m = static_cast<Scalar>(scale) * v;
  if (decayed) m += *decayed;
  return m;
}

// What a step's output reports as its hyperparameters.
inline std::map<std::string, double> ReportedHyperparameters(const StepHyperparameters& h,
                                                             double kl_scale) {
  return {{"learning_rate", h.lr},
          {"damping", h.damping},
          {"momentum", h.momentum},
          {"weight_decay", h.weight_decay},
          {"kl_scale", kl_scale}};
}

}  // namespace natgrad::core::kfac

#endif  // NATGRAD_SERVER_BLOCKS_KFAC_DENSE_MATH_KFAC_STEP_CHECKS_H_
