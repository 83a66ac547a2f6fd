#include "server/service/step_assembler.h"

#include <cmath>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "server/session/tensor_codec.h"

namespace natgrad::service {
namespace {

using natgrad::v1::BlockConfig;
using natgrad::v1::Tensor;
using session::DecodeMatrix;
using session::DecodeSlices;
using session::ValidateTensor;

absl::Status CheckRank(const Tensor& t, int rank, const std::string& field) {
  if (t.shape_size() != rank) {
    return absl::InvalidArgumentError(absl::StrCat(
        field, ": want a rank-", rank, " tensor, got shape [",
        absl::StrJoin(t.shape(), ", "), "]"));
  }
  return absl::OkStatus();
}

// Decodes a required tensor field.
absl::StatusOr<Eigen::MatrixXd> Required(bool present, const Tensor& t,
                                         const std::string& field) {
  if (!present) return absl::InvalidArgumentError(absl::StrCat(field, ": required"));
  if (absl::Status s = ValidateTensor(t, field); !s.ok()) return s;
  return DecodeMatrix(t);
}

std::vector<int64_t> ShapeOf(const Tensor& t) {
  return {t.shape().begin(), t.shape().end()};
}

}  // namespace

StepAssembler::StepAssembler(const natgrad::v1::SessionConfig& config,
                             int64_t max_step_bytes)
    : max_step_bytes_(max_step_bytes) {
  for (const auto& b : config.blocks()) kinds_[b.name()] = &b;
}

absl::Status StepAssembler::Add(const natgrad::v1::StepRequest& request) {
  bytes_ += static_cast<int64_t>(request.ByteSizeLong());
  if (bytes_ > max_step_bytes_) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "step ", request.step(), ": its messages exceed ", max_step_bytes_,
        " bytes (the per-session limit)"));
  }
  if (request.step() < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("step: must be >= 1, got ", request.step()));
  }
  if (!started_) {
    started_ = true;
    data_.step = request.step();
  } else if (request.step() != data_.step) {
    return absl::InvalidArgumentError(absl::StrCat(
        "step: message for step ", request.step(), " arrived before step ",
        data_.step, " was marked last"));
  }
  if (request.has_loss()) {
    if (!std::isfinite(request.loss())) {
      return absl::InvalidArgumentError("loss: must be finite");
    }
    data_.loss = request.loss();
  }
  for (const auto& block : request.blocks()) {
    if (absl::Status s = AddBlock(block); !s.ok()) return s;
  }
  if (request.last()) {
    complete_ = true;
    data_.received = absl::Now();
  }
  return absl::OkStatus();
}

absl::Status StepAssembler::AddBlock(const natgrad::v1::BlockStep& b) {
  const std::string f = absl::StrCat("blocks[\"", b.name(), "\"]");
  auto it = kinds_.find(b.name());
  if (it == kinds_.end()) {
    return absl::InvalidArgumentError(
        absl::StrCat("blocks: unknown block \"", b.name(), "\""));
  }
  const BlockConfig& config = *it->second;
  const bool is_gaussian = config.has_gaussian();
  session::BlockStepData out;
  out.name = b.name();

  if (is_gaussian) {
    if (b.has_learning_rate()) {
      return absl::InvalidArgumentError(absl::StrCat(
          f, ".learning_rate: a gaussian block takes no learning rate (its step size is gamma)"));
    }
    if (b.has_gradient() || b.has_kfac()) {
      return absl::InvalidArgumentError(absl::StrCat(
          f, ": a gaussian block takes its parameters and gradients in `gaussian`"));
    }
    if (!b.has_gaussian()) {
      return absl::InvalidArgumentError(absl::StrCat(f, ".gaussian: required"));
    }
    const auto& g = b.gaussian();
    const std::string gf = f + ".gaussian";
    const Tensor* parts[4] = {&g.param1(), &g.param2(), &g.grad1(), &g.grad2()};
    const bool present[4] = {g.has_param1(), g.has_param2(), g.has_grad1(), g.has_grad2()};
    const char* names[4] = {"param1", "param2", "grad1", "grad2"};
    for (int i = 0; i < 4; ++i) {
      const std::string pf = absl::StrCat(gf, ".", names[i]);
      if (!present[i]) return absl::InvalidArgumentError(pf + ": required");
      if (absl::Status s = ValidateTensor(*parts[i], pf); !s.ok()) return s;
    }
    const int64_t copies = config.gaussian().copies() > 0 ? config.gaussian().copies() : 1;
    const int64_t dim = config.gaussian().dim();
    // Accept [dim] / [dim, dim] for a single copy; decode as [copies, ...].
    auto lift = [&](const Tensor& t, int rank, const std::string& pf)
        -> absl::StatusOr<Tensor> {
      Tensor lifted = t;
      if (copies == 1 && t.shape_size() == rank - 1) {
        lifted.clear_shape();
        lifted.add_shape(1);
        for (int64_t d : t.shape()) lifted.add_shape(d);
      }
      if (lifted.shape_size() != rank) return CheckRank(t, rank, pf);
      std::vector<int64_t> want = {copies, dim};
      if (rank == 3) want.push_back(dim);
      if (ShapeOf(lifted) != want) {
        return absl::InvalidArgumentError(absl::StrCat(
            pf, ": shape [", absl::StrJoin(t.shape(), ", "), "], want [",
            absl::StrJoin(want, ", "), "]"));
      }
      return lifted;
    };
    core::GaussianStepInputData in;
    for (int i = 0; i < 4; ++i) {
      const int rank = (i % 2 == 0) ? 2 : 3;
      auto lifted = lift(*parts[i], rank, absl::StrCat(gf, ".", names[i]));
      if (!lifted.ok()) return lifted.status();
      std::vector<Eigen::MatrixXd> slices = DecodeSlices(*lifted);
      if (rank == 2) {
        auto& dst = (i == 0) ? in.param1 : in.grad1;
        for (auto& s : slices) dst.push_back(s.col(0));  // each slice is dim x 1
      } else {
        auto& dst = (i == 1) ? in.param2 : in.grad2;
        for (auto& s : slices) dst.push_back(std::move(s));
      }
    }
    in.gradient_space =
        g.gradient_space() == natgrad::v1::PARAMETRIZATION_GRADIENT
            ? core::GaussianStepInputData::GradientSpace::kParametrization
            : core::GaussianStepInputData::GradientSpace::kExpectation;
    out.input.gaussian = std::move(in);
    out.reply_dtype = g.param1().dtype();
    out.gaussian_shape1 = ShapeOf(g.param1());
    out.gaussian_shape2 = ShapeOf(g.param2());
  } else {
    if (b.has_gaussian()) {
      return absl::InvalidArgumentError(
          absl::StrCat(f, ".gaussian: only gaussian blocks take it"));
    }
    auto grad = Required(b.has_gradient(), b.gradient(), f + ".gradient");
    if (!grad.ok()) return grad.status();
    out.input.gradient = *std::move(grad);
    if (b.has_learning_rate()) {
      if (!std::isfinite(b.learning_rate()) || b.learning_rate() < 0) {
        return absl::InvalidArgumentError(absl::StrCat(
            f, ".learning_rate: must be finite and >= 0, got ", b.learning_rate()));
      }
      out.input.learning_rate = b.learning_rate();
    }
    out.reply_dtype = b.gradient().dtype();
    out.reply_shape = ShapeOf(b.gradient());
    if (b.has_params()) {
      auto params = Required(true, b.params(), f + ".params");
      if (!params.ok()) return params.status();
      if (ShapeOf(b.params()) != out.reply_shape) {
        return absl::InvalidArgumentError(absl::StrCat(
            f, ".params: shape [", absl::StrJoin(b.params().shape(), ", "),
            "] differs from the gradient's [", absl::StrJoin(out.reply_shape, ", "), "]"));
      }
      out.input.params = *std::move(params);
    }
    if (b.has_kfac()) {
      if (!config.has_kfac_dense()) {
        return absl::InvalidArgumentError(
            absl::StrCat(f, ".kfac: only kfac_dense blocks take curvature statistics"));
      }
      core::KfacStatisticsInput k;
      const std::string kf = f + ".kfac";
      if (b.kfac().has_raw()) {
        const auto& raw = b.kfac().raw();
        k.form = core::KfacStatisticsInput::Form::kRaw;
        for (auto [present, t, name] :
             {std::tuple{raw.has_activations(), &raw.activations(), "activations"},
              std::tuple{raw.has_output_gradients(), &raw.output_gradients(),
                         "output_gradients"}}) {
          const std::string tf = absl::StrCat(kf, ".raw.", name);
          if (!present) return absl::InvalidArgumentError(tf + ": required");
          if (absl::Status s = ValidateTensor(*t, tf); !s.ok()) return s;
          if (absl::Status s = CheckRank(*t, 2, tf); !s.ok()) return s;
        }
        k.activations = DecodeMatrix(raw.activations());
        k.output_gradients = DecodeMatrix(raw.output_gradients());
        k.num_examples = k.activations.rows();
        k.locations = raw.locations();
      } else if (b.kfac().has_reduced()) {
        const auto& red = b.kfac().reduced();
        k.form = core::KfacStatisticsInput::Form::kReduced;
        for (auto [present, t, name] :
             {std::tuple{red.has_a_factor(), &red.a_factor(), "a_factor"},
              std::tuple{red.has_g_factor(), &red.g_factor(), "g_factor"}}) {
          const std::string tf = absl::StrCat(kf, ".reduced.", name);
          if (!present) return absl::InvalidArgumentError(tf + ": required");
          if (absl::Status s = ValidateTensor(*t, tf); !s.ok()) return s;
          if (absl::Status s = CheckRank(*t, 2, tf); !s.ok()) return s;
        }
        k.a_factor = DecodeMatrix(red.a_factor());
        k.g_factor = DecodeMatrix(red.g_factor());
        k.num_examples = red.num_examples();
      } else {
        return absl::InvalidArgumentError(
            absl::StrCat(kf, ": set either raw or reduced statistics"));
      }
      out.input.kfac = std::move(k);
    }
  }
  data_.blocks.push_back(std::move(out));
  return absl::OkStatus();
}

session::StepData StepAssembler::Take() {
  session::StepData out = std::move(data_);
  data_ = session::StepData();
  started_ = false;
  complete_ = false;
  bytes_ = 0;
  return out;
}

}  // namespace natgrad::service
