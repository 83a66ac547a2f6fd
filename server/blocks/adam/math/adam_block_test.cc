#include "server/blocks/adam/math/adam_block.h"

#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "Eigen/Core"
#include "absl/status/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/core/block.h"
#include "server/core/schedule.h"

namespace natgrad::core {
namespace {

using ::testing::HasSubstr;

constexpr int64_t kRows = 2, kCols = 3;
constexpr double kNan = std::numeric_limits<double>::quiet_NaN();

Eigen::MatrixXd RandomMatrix(std::mt19937& rng, double scale = 1.0) {
  std::normal_distribution<double> normal(0.0, scale);
  Eigen::MatrixXd m(kRows, kCols);
  for (int64_t i = 0; i < m.size(); ++i) m.data()[i] = normal(rng);
  return m;
}

// A schedule that returns whatever a test needs, including what the
// validating factories refuse (NaN, infinity).
class StepFunction final : public Schedule {
 public:
  StepFunction(double before, int64_t from, double after)
      : before_(before), from_(from), after_(after) {}
  double Value(int64_t t) const override {
    return t < from_ ? before_ : after_;
  }

 private:
  double before_;
  int64_t from_;
  double after_;
};

std::unique_ptr<ParameterBlock> MakeAdam(const AdamOptions& o, Precision p) {
  absl::StatusOr<std::unique_ptr<ParameterBlock>> b =
      NewAdamBlock("w", {kRows, kCols}, o, p);
  EXPECT_TRUE(b.ok()) << b.status();
  return b.ok() ? std::move(*b) : nullptr;
}

BlockStepOutput Step(ParameterBlock& block, const Eigen::MatrixXd& grad,
                     const Eigen::MatrixXd* params, int64_t t) {
  DenseStepInput in;
  in.gradient = grad;
  if (params != nullptr) in.params = *params;
  StepContext ctx;
  ctx.step = t;
  absl::StatusOr<std::unique_ptr<PendingBlockUpdate>> u =
      block.Propose(in, ctx);
  EXPECT_TRUE(u.ok()) << u.status();
  if (!u.ok()) return {};
  EXPECT_EQ((*u)->curvature(), nullptr);
  return (*u)->Commit(0.5);  // kl_scale is ignored by first-order blocks
}

// torch.optim.Adam / AdamW (amsgrad off), element by element: the delta is
// the new parameter minus the old one.
struct ReferenceAdam {
  double b1, b2, eps;
  bool decoupled;
  std::vector<double> m, v;
  int n = 0;

  std::vector<double> Delta(const std::vector<double>& grad,
                            const std::vector<double>& w, double lr,
                            double wd) {
    if (m.empty()) m.assign(grad.size(), 0.0), v.assign(grad.size(), 0.0);
    ++n;
    std::vector<double> delta(grad.size());
    for (size_t i = 0; i < grad.size(); ++i) {
      double g = grad[i];
      double p = w[i];
      if (decoupled) {
        p *= 1 - lr * wd;
      } else {
        g += wd * w[i];
      }
      m[i] = b1 * m[i] + (1 - b1) * g;
      v[i] = b2 * v[i] + (1 - b2) * g * g;
      const double bc1 = 1 - std::pow(b1, n);
      const double bc2 = 1 - std::pow(b2, n);
      const double denom = std::sqrt(v[i]) / std::sqrt(bc2) + eps;
      p -= (lr / bc1) * m[i] / denom;
      delta[i] = p - w[i];
    }
    return delta;
  }
};

std::vector<double> ToVector(const Eigen::MatrixXd& m) {
  return std::vector<double>(m.data(), m.data() + m.size());
}

struct Case {
  std::string name;
  double wd;
  bool decoupled;
  double beta1;
};

void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

class AdamReferenceTest : public ::testing::TestWithParam<Case> {};

TEST_P(AdamReferenceTest, MatchesPyTorchRecurrenceOverSteps) {
  const Case& c = GetParam();
  AdamOptions o;
  o.learning_rate = *ExponentialDecaySchedule(0.01, 0.5, 4, false);
  if (c.wd > 0) o.weight_decay = ConstantSchedule(c.wd);
  o.decoupled_weight_decay = c.decoupled;
  o.beta1 = c.beta1;
  o.beta2 = 0.99;
  o.epsilon = 1e-6;
  auto b64 = MakeAdam(o, Precision::kFloat64);
  auto b32 = MakeAdam(o, Precision::kFloat32);
  ASSERT_NE(b64, nullptr);
  ASSERT_NE(b32, nullptr);
  ReferenceAdam ref{c.beta1, 0.99, 1e-6, c.decoupled, {}, {}, 0};

  std::mt19937 rng(17);
  Eigen::MatrixXd w = RandomMatrix(rng);
  for (int64_t t = 1; t <= 8; ++t) {
    // Gradients of varying scale so the adaptive denominators matter.
    const Eigen::MatrixXd g = RandomMatrix(rng, t % 3 == 0 ? 10.0 : 0.1);
    const double lr = 0.01 * std::pow(0.5, t / 4.0);
    const std::vector<double> want =
        ref.Delta(ToVector(g), ToVector(w), lr, c.wd);
    BlockStepOutput o64 = Step(*b64, g, &w, t);
    BlockStepOutput o32 = Step(*b32, g, &w, t);
    // Each block answers in its own precision (no float64 detour).
    ASSERT_EQ(o64.delta.dtype(), DType::kFloat64);
    ASSERT_EQ(o32.delta.dtype(), DType::kFloat32);
    const Eigen::MatrixXd d64 = o64.delta.ToMatrix<double>();
    const Eigen::MatrixXd d32 = o32.delta.ToMatrix<double>();
    ASSERT_EQ(d64.rows(), kRows);
    ASSERT_EQ(d64.cols(), kCols);
    for (size_t i = 0; i < want.size(); ++i) {
      EXPECT_NEAR(d64.data()[i], want[i], 1e-15) << "t=" << t;
      // float32: relative to the step size lr (|delta| <= ~lr).
      EXPECT_NEAR(d32.data()[i], want[i], 1e-5 * lr) << "t=" << t;
    }
    EXPECT_DOUBLE_EQ(o64.hyperparameters.at("learning_rate"), lr);
    EXPECT_EQ(o64.hyperparameters.at("beta1"), c.beta1);
    EXPECT_EQ(o64.hyperparameters.at("beta2"), 0.99);
    EXPECT_EQ(o64.hyperparameters.at("weight_decay"), c.wd);
    w += d64;
  }
  const BlockState s = b64->ExportState();
  EXPECT_EQ(s.scalars.at("step"), 8.0);
  for (size_t i = 0; i < ref.m.size(); ++i) {
    EXPECT_NEAR(s.tensors.at("exp_avg").data()[i], ref.m[i], 1e-14);
    EXPECT_NEAR(s.tensors.at("exp_avg_sq").data()[i], ref.v[i], 1e-12);
  }
}

INSTANTIATE_TEST_SUITE_P(
    Variants, AdamReferenceTest,
    ::testing::Values(Case{"adam", 0.0, false, 0.9},
                      Case{"adam_l2", 0.1, false, 0.9},
                      Case{"adamw", 0.1, true, 0.9},
                      Case{"adam_beta1_zero", 0.0, false, 0.0}),
    [](const ::testing::TestParamInfo<Case>& i) { return i.param.name; });

TEST(AdamBlockTest, FirstStepIsSignLike) {
  // Step 1 with bias correction: m_hat = g, v_hat = g^2, so
  // delta = -lr g / (|g| + eps).
  AdamOptions o;
  o.learning_rate = ConstantSchedule(0.1);
  auto b = MakeAdam(o, Precision::kFloat64);
  Eigen::MatrixXd g(kRows, kCols);
  g << 1.0, -2.0, 1e-3, -4e-7, 3.0, 0.0;
  const Eigen::MatrixXd d = Step(*b, g, nullptr, 1).delta.ToMatrix<double>();
  for (int64_t i = 0; i < g.size(); ++i) {
    const double gi = g.data()[i];
    EXPECT_NEAR(d.data()[i], -0.1 * gi / (std::abs(gi) + 1e-8), 1e-15) << i;
  }
  EXPECT_EQ(d(1, 2), 0.0);
}

TEST(AdamBlockTest, DefaultsAndStateBytes) {
  auto b32 = MakeAdam({}, Precision::kFloat32);
  auto b64 = MakeAdam({}, Precision::kFloat64);
  EXPECT_EQ(b32->kind(), "adam");
  EXPECT_EQ(b32->StateBytes(), 2 * kRows * kCols * 4);
  EXPECT_EQ(b64->StateBytes(), 2 * kRows * kCols * 8);
  const BlockState fresh = b64->ExportState();
  EXPECT_EQ(fresh.scalars.at("step"), 0.0);
  EXPECT_TRUE(fresh.tensors.at("exp_avg").isZero());
  EXPECT_TRUE(fresh.tensors.at("exp_avg_sq").isZero());
  const Eigen::MatrixXd g = Eigen::MatrixXd::Constant(kRows, kCols, 2.0);
  BlockStepOutput out = Step(*b64, g, nullptr, 1);
  EXPECT_NEAR(out.delta.ToMatrix<double>()(0, 0), -1e-3 * 2.0 / (2.0 + 1e-8), 1e-18);
  EXPECT_EQ(out.hyperparameters.at("beta1"), 0.9);
  EXPECT_EQ(out.hyperparameters.at("beta2"), 0.999);
  EXPECT_EQ(out.hyperparameters.at("weight_decay"), 0.0);
}

TEST(AdamBlockTest, FactoryValidation) {
  struct Bad {
    std::string what;
    AdamOptions o;
  };
  std::vector<Bad> bad(8);
  bad[0] = {"beta1", {}};
  bad[0].o.beta1 = 1.0;
  bad[1] = {"beta1", {}};
  bad[1].o.beta1 = -0.1;
  bad[2] = {"beta1", {}};
  bad[2].o.beta1 = kNan;
  bad[3] = {"beta2", {}};
  bad[3].o.beta2 = 1.0;
  bad[4] = {"beta2", {}};
  bad[4].o.beta2 = kNan;
  bad[5] = {"epsilon", {}};
  bad[5].o.epsilon = 0.0;
  bad[6] = {"epsilon", {}};
  bad[6].o.epsilon = -1e-8;
  bad[7] = {"epsilon", {}};
  bad[7].o.epsilon = std::numeric_limits<double>::infinity();
  for (const Bad& c : bad) {
    auto b = NewAdamBlock("w", {2, 2}, c.o, Precision::kFloat32);
    ASSERT_FALSE(b.ok()) << c.what;
    EXPECT_EQ(b.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(b.status().message()), HasSubstr(c.what));
  }
  auto shape = NewAdamBlock("w", {3, 0}, {}, Precision::kFloat64);
  ASSERT_FALSE(shape.ok());
  EXPECT_THAT(std::string(shape.status().message()), HasSubstr("shape"));
}

bool SameState(const BlockState& a, const BlockState& b) {
  if (a.scalars != b.scalars || a.tensors.size() != b.tensors.size()) {
    return false;
  }
  for (const auto& [k, v] : a.tensors) {
    auto it = b.tensors.find(k);
    if (it == b.tensors.end() || it->second.rows() != v.rows() ||
        it->second.cols() != v.cols() || it->second != v) {
      return false;
    }
  }
  return true;
}

TEST(AdamBlockTest, BadInputsAreRefusedAndLeaveStateUnchanged) {
  AdamOptions o;
  o.weight_decay = ConstantSchedule(0.01);
  o.decoupled_weight_decay = true;
  auto b = MakeAdam(o, Precision::kFloat32);
  std::mt19937 rng(3);
  const Eigen::MatrixXd w = RandomMatrix(rng);
  Step(*b, RandomMatrix(rng), &w, 1);
  const BlockState before = b->ExportState();

  struct Bad {
    std::string what;
    BlockStepInput in;
    int64_t step;
    std::string message;
  };
  auto good = [&] {
    DenseStepInput in;
    in.gradient = RandomMatrix(rng);
    in.params = w;
    return in;
  };
  std::vector<Bad> bad;
  {
    DenseStepInput in = good();
    in.gradient = Eigen::MatrixXd(Eigen::MatrixXd::Ones(kRows, kCols + 1));
    bad.push_back({"gradient shape", in, 2, "gradient"});
  }
  {
    DenseStepInput in = good();
    {
      Eigen::MatrixXd g = in.gradient.ToMatrix<double>();
      g(1, 2) = kNan;
      in.gradient = g;
    }
    bad.push_back({"nan gradient", in, 2, "gradient"});
  }
  {
    DenseStepInput in = good();
    in.params = Eigen::MatrixXd(Eigen::MatrixXd::Ones(kCols, kRows));
    bad.push_back({"params shape", in, 2, "params"});
  }
  {
    DenseStepInput in = good();
    {
      Eigen::MatrixXd p = in.params->ToMatrix<double>();
      p(0, 0) = -std::numeric_limits<double>::infinity();
      in.params = p;
    }
    bad.push_back({"inf params", in, 2, "params"});
  }
  {
    DenseStepInput in = good();
    in.params.reset();
    bad.push_back(
        {"missing params", in, 2, "params is required when weight_decay > 0"});
  }
  {
    bad.push_back({"gaussian input", GaussianStepInput{}, 2, "not for a adam block"});
  }
  {
    DenseStepInput in = good();
    {
      Eigen::MatrixXd g = in.gradient.ToMatrix<double>();
      g(0, 0) = 1e200;
      in.gradient = g;
    }  // g^2 overflows even in double
    bad.push_back({"overflow", in, 2, "non-finite"});
  }
  bad.push_back({"step 0", good(), 0, "step"});
  for (const Bad& c : bad) {
    StepContext ctx;
    ctx.step = c.step;
    auto u = b->Propose(c.in, ctx);
    ASSERT_FALSE(u.ok()) << c.what;
    EXPECT_EQ(u.status().code(), absl::StatusCode::kInvalidArgument) << c.what;
    EXPECT_THAT(std::string(u.status().message()), HasSubstr(c.message))
        << c.what;
    EXPECT_TRUE(SameState(b->ExportState(), before)) << c.what;
  }
  // A proposal that is dropped leaves the state as well.
  StepContext ctx;
  ctx.step = 2;
  ASSERT_TRUE(b->Propose(good(), ctx).ok());
  EXPECT_TRUE(SameState(b->ExportState(), before));
}

TEST(AdamBlockTest, BadScheduleValuesAreRefused) {
  for (auto [param, bad_value] :
       {std::pair{"learning_rate", -1e-3}, std::pair{"learning_rate", kNan},
        std::pair{"weight_decay", -0.1}}) {
    AdamOptions o;
    const SchedulePtr s = std::make_shared<StepFunction>(0.01, 2, bad_value);
    (std::string(param) == "learning_rate" ? o.learning_rate : o.weight_decay) =
        s;
    auto b = MakeAdam(o, Precision::kFloat64);
    std::mt19937 rng(9);
    const Eigen::MatrixXd w = RandomMatrix(rng);
    Step(*b, RandomMatrix(rng), &w, 1);
    const BlockState before = b->ExportState();
    DenseStepInput in;
    in.gradient = RandomMatrix(rng);
    in.params = w;
    StepContext ctx;
    ctx.step = 2;
    auto u = b->Propose(in, ctx);
    ASSERT_FALSE(u.ok()) << param;
    EXPECT_EQ(u.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(u.status().message()), HasSubstr(param));
    EXPECT_TRUE(SameState(b->ExportState(), before));
  }
}

TEST(AdamBlockTest, ExportImportContinuesIdentically) {
  for (Precision p : {Precision::kFloat32, Precision::kFloat64}) {
    AdamOptions o;
    o.learning_rate = *LinearWarmupSchedule(1e-4, 1e-2, 5);
    o.weight_decay = ConstantSchedule(0.05);
    o.decoupled_weight_decay = true;
    auto a = MakeAdam(o, p);
    auto b = MakeAdam(o, p);
    std::mt19937 rng(21);
    Eigen::MatrixXd w = RandomMatrix(rng);
    for (int64_t t = 1; t <= 4; ++t) {
      w += Step(*a, RandomMatrix(rng), &w, t).delta.ToMatrix<double>();
    }
    const BlockState exported = a->ExportState();
    EXPECT_EQ(exported.scalars.at("step"), 4.0);
    ASSERT_TRUE(b->ImportState(exported).ok());
    EXPECT_TRUE(SameState(b->ExportState(), exported));
    for (int64_t t = 5; t <= 9; ++t) {
      const Eigen::MatrixXd g = RandomMatrix(rng);
      const Eigen::MatrixXd da = Step(*a, g, &w, t).delta.ToMatrix<double>();
      const Eigen::MatrixXd db = Step(*b, g, &w, t).delta.ToMatrix<double>();
      EXPECT_EQ(da, db) << t;
      w += da;
    }
  }
}

TEST(AdamBlockTest, ImportValidates) {
  auto b = MakeAdam({}, Precision::kFloat32);
  std::mt19937 rng(2);
  Step(*b, RandomMatrix(rng), nullptr, 1);
  const BlockState before = b->ExportState();
  auto with = [&](auto edit) {
    BlockState s = before;
    edit(s);
    return s;
  };
  std::vector<std::pair<std::string, BlockState>> bad;
  bad.push_back(
      {"exp_avg", with([](BlockState& s) { s.tensors.erase("exp_avg"); })});
  bad.push_back({"exp_avg_sq", with([](BlockState& s) {
                   s.tensors["exp_avg_sq"] =
                       Eigen::MatrixXd::Zero(kCols, kRows);
                 })});
  bad.push_back({"exp_avg", with([](BlockState& s) {
                   s.tensors["exp_avg"](1, 1) = kNan;
                 })});
  bad.push_back({"exp_avg_sq", with([](BlockState& s) {
                   s.tensors["exp_avg_sq"](0, 1) = -1e-9;
                 })});
  bad.push_back({"precision", with([](BlockState& s) {
                   s.tensors["exp_avg"](0, 0) = 1e300;
                 })});
  bad.push_back({"step", with([](BlockState& s) { s.scalars.erase("step"); })});
  bad.push_back(
      {"step", with([](BlockState& s) { s.scalars["step"] = kNan; })});
  bad.push_back({"momentum_buffer", with([](BlockState& s) {
                   s.tensors["momentum_buffer"] =
                       Eigen::MatrixXd::Zero(kRows, kCols);
                 })});
  for (const auto& [what, state] : bad) {
    absl::Status s = b->ImportState(state);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << what;
    EXPECT_THAT(std::string(s.message()), HasSubstr(what));
    EXPECT_TRUE(SameState(b->ExportState(), before)) << what;
  }
}

}  // namespace
}  // namespace natgrad::core
