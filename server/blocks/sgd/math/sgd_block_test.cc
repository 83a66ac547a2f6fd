#include "server/blocks/sgd/math/sgd_block.h"

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

constexpr int64_t kRows = 3, kCols = 2;
constexpr double kNan = std::numeric_limits<double>::quiet_NaN();

Eigen::MatrixXd RandomMatrix(std::mt19937& rng, int64_t rows = kRows,
                             int64_t cols = kCols) {
  std::normal_distribution<double> normal;
  Eigen::MatrixXd m(rows, cols);
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

std::unique_ptr<ParameterBlock> MakeSgd(const SgdOptions& o, Precision p) {
  absl::StatusOr<std::unique_ptr<ParameterBlock>> b =
      NewSgdBlock("w", {kRows, kCols}, o, p);
  EXPECT_TRUE(b.ok()) << b.status();
  return b.ok() ? std::move(*b) : nullptr;
}

// Proposes and commits one step; fails the test on error.
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
  return (*u)->Commit(1.0);
}

// PyTorch torch.optim.SGD (dampening 0), written out element by element.
struct ReferenceSgd {
  bool use_momentum;
  bool nesterov;
  std::vector<double> buf;  // empty until the first step

  std::vector<double> Delta(const std::vector<double>& g,
                            const std::vector<double>& w, double lr, double mu,
                            double wd) {
    std::vector<double> d(g.size()), delta(g.size());
    for (size_t i = 0; i < g.size(); ++i) d[i] = g[i] + wd * w[i];
    const bool first = buf.empty();
    if (use_momentum && first) buf = d;
    for (size_t i = 0; i < g.size(); ++i) {
      double dir = d[i];
      if (use_momentum) {
        if (!first) buf[i] = mu * buf[i] + d[i];
        dir = nesterov ? d[i] + mu * buf[i] : buf[i];
      }
      delta[i] = -lr * dir;
    }
    return delta;
  }
};

std::vector<double> ToVector(const Eigen::MatrixXd& m) {
  return std::vector<double>(m.data(), m.data() + m.size());
}

struct Case {
  std::string name;
  bool momentum;
  bool nesterov;
  double wd;
};

void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

class SgdReferenceTest : public ::testing::TestWithParam<Case> {};

TEST_P(SgdReferenceTest, MatchesPyTorchRecurrenceOverSteps) {
  const Case& c = GetParam();
  // A learning-rate warm-up and a momentum schedule exercise the per-step
  // evaluation at the session's t.
  SgdOptions o;
  o.learning_rate = *LinearWarmupSchedule(0.05, 0.2, 3);
  if (c.momentum) o.momentum = *PiecewiseConstantSchedule({4}, {0.9, 0.5});
  if (c.wd > 0) o.weight_decay = ConstantSchedule(c.wd);
  o.nesterov = c.nesterov;
  auto b64 = MakeSgd(o, Precision::kFloat64);
  auto b32 = MakeSgd(o, Precision::kFloat32);
  ASSERT_NE(b64, nullptr);
  ASSERT_NE(b32, nullptr);
  ReferenceSgd ref{c.momentum, c.nesterov, {}};

  std::mt19937 rng(7);
  Eigen::MatrixXd w = RandomMatrix(rng);
  for (int64_t t = 1; t <= 6; ++t) {
    const Eigen::MatrixXd g = RandomMatrix(rng);
    const double lr = 0.05 + 0.15 * std::min<int64_t>(t, 3) / 3.0;
    const double mu = c.momentum ? (t < 4 ? 0.9 : 0.5) : 0.0;
    const std::vector<double> want =
        ref.Delta(ToVector(g), ToVector(w), lr, mu, c.wd);
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
      EXPECT_NEAR(d64.data()[i], want[i], 1e-14) << "t=" << t;
      EXPECT_NEAR(d32.data()[i], want[i], 1e-5 * (1 + std::abs(want[i])))
          << "t=" << t;
    }
    EXPECT_DOUBLE_EQ(o64.hyperparameters.at("learning_rate"), lr);
    EXPECT_DOUBLE_EQ(o64.hyperparameters.at("momentum"), mu);
    EXPECT_DOUBLE_EQ(o64.hyperparameters.at("weight_decay"), c.wd);
    w += d64;
  }
  EXPECT_EQ(b64->ExportState().scalars.at("step"), 6.0);
}

INSTANTIATE_TEST_SUITE_P(
    Variants, SgdReferenceTest,
    ::testing::Values(Case{"plain", false, false, 0.0},
                      Case{"momentum", true, false, 0.0},
                      Case{"nesterov", true, true, 0.0},
                      Case{"weight_decay", false, false, 0.01},
                      Case{"momentum_weight_decay", true, false, 0.05},
                      Case{"nesterov_weight_decay", true, true, 0.05}),
    [](const ::testing::TestParamInfo<Case>& i) { return i.param.name; });

TEST(SgdBlockTest, HandComputedMomentumSteps) {
  // 1x1, lr 0.1, mu 0.9: buf = 1, then 0.9 + 2 = 2.9; Nesterov adds mu buf.
  SgdOptions o;
  o.learning_rate = ConstantSchedule(0.1);
  o.momentum = ConstantSchedule(0.9);
  auto heavy = NewSgdBlock("h", {1, 1}, o, Precision::kFloat64);
  o.nesterov = true;
  auto nest = NewSgdBlock("n", {1, 1}, o, Precision::kFloat64);
  ASSERT_TRUE(heavy.ok() && nest.ok());
  const Eigen::MatrixXd g1 = Eigen::MatrixXd::Constant(1, 1, 1.0);
  const Eigen::MatrixXd g2 = Eigen::MatrixXd::Constant(1, 1, 2.0);
  EXPECT_NEAR(Step(**heavy, g1, nullptr, 1).delta.ToMatrix<double>()(0, 0), -0.1, 1e-15);
  EXPECT_NEAR(Step(**heavy, g2, nullptr, 2).delta.ToMatrix<double>()(0, 0), -0.29, 1e-15);
  EXPECT_NEAR(Step(**nest, g1, nullptr, 1).delta.ToMatrix<double>()(0, 0), -0.19, 1e-15);
  EXPECT_NEAR(Step(**nest, g2, nullptr, 2).delta.ToMatrix<double>()(0, 0), -(2 + 0.9 * 2.9) * 0.1,
              1e-15);
}

TEST(SgdBlockTest, DefaultsAndStateBytes) {
  auto plain = MakeSgd({}, Precision::kFloat32);
  ASSERT_NE(plain, nullptr);
  EXPECT_EQ(plain->kind(), "sgd");
  EXPECT_EQ(plain->name(), "w");
  const Eigen::MatrixXd g = Eigen::MatrixXd::Ones(kRows, kCols);
  BlockStepOutput out = Step(*plain, g, nullptr, 1);
  EXPECT_NEAR(out.delta.ToMatrix<double>()(0, 0), -1e-2, 1e-9);  // default lr
  EXPECT_EQ(out.hyperparameters.at("momentum"), 0.0);
  EXPECT_EQ(out.hyperparameters.at("weight_decay"), 0.0);
  EXPECT_EQ(plain->StateBytes(), 0);
  EXPECT_TRUE(plain->ExportState().tensors.empty());

  SgdOptions o;
  o.momentum = ConstantSchedule(0.9);
  auto f32 = MakeSgd(o, Precision::kFloat32);
  auto f64 = MakeSgd(o, Precision::kFloat64);
  EXPECT_EQ(f32->StateBytes(), 0);  // buffer starts at the first step
  Step(*f32, g, nullptr, 1);
  Step(*f64, g, nullptr, 1);
  EXPECT_EQ(f32->StateBytes(), kRows * kCols * 4);
  EXPECT_EQ(f64->StateBytes(), kRows * kCols * 8);
}

TEST(SgdBlockTest, ProposeWithoutCommitChangesNothing) {
  SgdOptions o;
  o.momentum = ConstantSchedule(0.9);
  auto b = MakeSgd(o, Precision::kFloat64);
  std::mt19937 rng(1);
  Step(*b, RandomMatrix(rng), nullptr, 1);
  const BlockState before = b->ExportState();
  DenseStepInput in;
  in.gradient = RandomMatrix(rng);
  StepContext ctx;
  ctx.step = 2;
  ASSERT_TRUE(b->Propose(in, ctx).ok());  // dropped
  const BlockState after = b->ExportState();
  EXPECT_EQ(after.scalars, before.scalars);
  EXPECT_EQ(after.tensors.at("momentum_buffer"),
            before.tensors.at("momentum_buffer"));
}

TEST(SgdBlockTest, FactoryValidation) {
  for (MatrixShape s : {MatrixShape{0, 2}, MatrixShape{2, 0},
                        MatrixShape{-1, 3}, MatrixShape{int64_t{1} << 62, 4}}) {
    auto b = NewSgdBlock("w", s, {}, Precision::kFloat32);
    ASSERT_FALSE(b.ok());
    EXPECT_EQ(b.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(b.status().message()), HasSubstr("shape"));
  }
  SgdOptions o;
  o.nesterov = true;
  auto b = NewSgdBlock("w", {2, 2}, o, Precision::kFloat64);
  ASSERT_FALSE(b.ok());
  EXPECT_EQ(b.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(b.status().message()), HasSubstr("nesterov"));
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

TEST(SgdBlockTest, BadInputsAreRefusedAndLeaveStateUnchanged) {
  SgdOptions o;
  o.momentum = ConstantSchedule(0.9);
  o.weight_decay = ConstantSchedule(0.1);
  auto b = MakeSgd(o, Precision::kFloat32);
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
    in.gradient = Eigen::MatrixXd(Eigen::MatrixXd::Ones(kCols, kRows));
    bad.push_back({"transposed gradient", in, 2, "gradient"});
  }
  {
    DenseStepInput in = good();
    {
      Eigen::MatrixXd g = in.gradient.ToMatrix<double>();
      g(1, 1) = kNan;
      in.gradient = g;
    }
    bad.push_back({"nan gradient", in, 2, "gradient"});
  }
  {
    DenseStepInput in = good();
    {
      Eigen::MatrixXd g = in.gradient.ToMatrix<double>();
      g(0, 1) = std::numeric_limits<double>::infinity();
      in.gradient = g;
    }
    bad.push_back({"inf gradient", in, 2, "gradient"});
  }
  {
    DenseStepInput in = good();
    in.params = Eigen::MatrixXd(Eigen::MatrixXd::Ones(kRows, kCols + 1));
    bad.push_back({"params shape", in, 2, "params"});
  }
  {
    DenseStepInput in = good();
    {
      Eigen::MatrixXd p = in.params->ToMatrix<double>();
      p(2, 0) = kNan;
      in.params = p;
    }
    bad.push_back({"nan params", in, 2, "params"});
  }
  {
    DenseStepInput in = good();
    in.params.reset();
    bad.push_back(
        {"missing params", in, 2, "params is required when weight_decay > 0"});
  }
  {
    DenseStepInput in = good();
    KfacStepInput kfac;
    static_cast<DenseStepInput&>(kfac) = in;
    kfac.kfac = KfacStatisticsInput{};
    bad.push_back({"kfac input", kfac, 2, "not for a sgd block"});
  }
  {
    DenseStepInput in = good();
    {
      Eigen::MatrixXd g = in.gradient.ToMatrix<double>();
      g(0, 0) = 1e300;
      in.gradient = g;
    }  // finite in double, overflows float32
    bad.push_back({"float overflow", in, 2, "non-finite"});
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
}

TEST(SgdBlockTest, BadScheduleValuesAreRefused) {
  struct Bad {
    std::string param;
    SgdOptions options;
  };
  // Each schedule turns bad at step 3: the first two steps succeed.
  auto from3 = [](double good, double bad_value) -> SchedulePtr {
    return std::make_shared<StepFunction>(good, 3, bad_value);
  };
  std::vector<Bad> bad(6);
  bad[0] = {"learning_rate", {}};
  bad[0].options.learning_rate = from3(0.1, -0.1);
  bad[1] = {"learning_rate", {}};
  bad[1].options.learning_rate = from3(0.1, kNan);
  bad[2] = {"momentum", {}};
  bad[2].options.momentum = from3(0.9, -0.5);
  bad[3] = {"momentum", {}};
  bad[3].options.momentum = from3(0.9, std::numeric_limits<double>::infinity());
  bad[4] = {"weight_decay", {}};
  bad[4].options.weight_decay = from3(0.0, -1e-4);
  bad[5] = {"weight_decay", {}};
  bad[5].options.weight_decay = from3(0.0, kNan);
  for (const Bad& c : bad) {
    auto b = MakeSgd(c.options, Precision::kFloat64);
    std::mt19937 rng(5);
    Step(*b, RandomMatrix(rng), nullptr, 1);
    Step(*b, RandomMatrix(rng), nullptr, 2);
    const BlockState before = b->ExportState();
    DenseStepInput in;
    in.gradient = RandomMatrix(rng);
    StepContext ctx;
    ctx.step = 3;
    auto u = b->Propose(in, ctx);
    ASSERT_FALSE(u.ok()) << c.param;
    EXPECT_EQ(u.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(u.status().message()), HasSubstr(c.param));
    EXPECT_TRUE(SameState(b->ExportState(), before)) << c.param;
  }
}

TEST(SgdBlockTest, ExportImportContinuesIdentically) {
  for (Precision p : {Precision::kFloat32, Precision::kFloat64}) {
    SgdOptions o;
    o.learning_rate = *CosineDecaySchedule(0.1, 10, 0.0);
    o.momentum = ConstantSchedule(0.8);
    o.nesterov = true;
    o.weight_decay = ConstantSchedule(0.01);
    auto a = MakeSgd(o, p);
    auto b = MakeSgd(o, p);
    std::mt19937 rng(11);
    Eigen::MatrixXd w = RandomMatrix(rng);
    for (int64_t t = 1; t <= 3; ++t)
      w += Step(*a, RandomMatrix(rng), &w, t).delta.ToMatrix<double>();
    const BlockState exported = a->ExportState();
    EXPECT_EQ(exported.scalars.at("step"), 3.0);
    ASSERT_TRUE(exported.tensors.contains("momentum_buffer"));
    ASSERT_TRUE(b->ImportState(exported).ok());
    EXPECT_TRUE(SameState(b->ExportState(), exported));
    EXPECT_EQ(b->StateBytes(), a->StateBytes());
    for (int64_t t = 4; t <= 7; ++t) {
      const Eigen::MatrixXd g = RandomMatrix(rng);
      const Eigen::MatrixXd da = Step(*a, g, &w, t).delta.ToMatrix<double>();
      const Eigen::MatrixXd db = Step(*b, g, &w, t).delta.ToMatrix<double>();
      EXPECT_EQ(da, db) << t;
      w += da;
    }
  }
}

TEST(SgdBlockTest, ImportValidates) {
  SgdOptions o;
  o.momentum = ConstantSchedule(0.9);
  auto b = MakeSgd(o, Precision::kFloat32);
  std::mt19937 rng(2);
  Step(*b, RandomMatrix(rng), nullptr, 1);
  const BlockState before = b->ExportState();

  std::vector<std::pair<std::string, BlockState>> bad;
  auto with = [&](auto edit) {
    BlockState s = before;
    edit(s);
    return s;
  };
  bad.push_back({"momentum_buffer", with([](BlockState& s) {
                   s.tensors["momentum_buffer"] = Eigen::MatrixXd::Ones(2, 2);
                 })});
  bad.push_back({"momentum_buffer", with([](BlockState& s) {
                   s.tensors["momentum_buffer"](0, 0) = kNan;
                 })});
  bad.push_back({"precision", with([](BlockState& s) {
                   s.tensors["momentum_buffer"](0, 0) = 1e300;
                 })});
  bad.push_back({"step", with([](BlockState& s) { s.scalars.erase("step"); })});
  bad.push_back({"step", with([](BlockState& s) { s.scalars["step"] = -1; })});
  bad.push_back({"step", with([](BlockState& s) { s.scalars["step"] = 1.5; })});
  bad.push_back({"exp_avg", with([](BlockState& s) {
                   s.tensors["exp_avg"] = Eigen::MatrixXd::Zero(kRows, kCols);
                 })});
  for (const auto& [what, state] : bad) {
    absl::Status s = b->ImportState(state);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << what;
    EXPECT_THAT(std::string(s.message()), HasSubstr(what));
    EXPECT_TRUE(SameState(b->ExportState(), before)) << what;
  }
  // A block without momentum refuses a buffer.
  auto plain = MakeSgd({}, Precision::kFloat32);
  EXPECT_EQ(plain->ImportState(before).code(),
            absl::StatusCode::kInvalidArgument);
  // Without the buffer the next step starts it afresh (buf = g).
  BlockState no_buffer = before;
  no_buffer.tensors.clear();
  ASSERT_TRUE(b->ImportState(no_buffer).ok());
  EXPECT_EQ(b->StateBytes(), 0);
  const Eigen::MatrixXd g = RandomMatrix(rng);
  EXPECT_TRUE(Step(*b, g, nullptr, 2).delta.ToMatrix<double>().isApprox(-1e-2 * g, 1e-6));
}

// Plain SGD (no momentum, no weight decay) on a gradient of the block's own
// dtype takes a one-pass path from the received bytes to the reply's. Its
// delta must be -lr * g for every element in the gradient's row-major
// order. The shape is not square, so a transposed result would show. It
// spans several of the path's 8192-element chunks and ends inside one.
// The float oracle is the product rounded once from double: a product of
// two floats is exact in double, so this is what a correctly rounded float
// multiply gives.
template <typename Scalar>
void ExpectPlainStepIsTheScaledGradient(Precision precision) {
  using M = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;
  using RowMajor = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  constexpr int64_t kR = 129, kC = 131;  // 16899 elements
  SgdOptions o;
  o.learning_rate = ConstantSchedule(0.37);
  absl::StatusOr<std::unique_ptr<ParameterBlock>> b = NewSgdBlock("w", {kR, kC}, o, precision);
  ASSERT_TRUE(b.ok()) << b.status();
  std::mt19937 rng(11);
  const M g = RandomMatrix(rng, kR, kC).template cast<Scalar>();
  DenseStepInput in;
  in.gradient = DenseTensor::FromMatrix(g);
  StepContext ctx;
  ctx.step = 1;
  auto u = (*b)->Propose(in, ctx);
  ASSERT_TRUE(u.ok()) << u.status();
  const BlockStepOutput out = (*u)->Commit(1.0);
  ASSERT_EQ(out.delta.dtype(), in.gradient.dtype());
  ASSERT_EQ(out.delta.shape(), (std::vector<int64_t>{kR, kC}));
  const RowMajor rows = g;  // the gradient's bytes, in order
  const Scalar* delta = reinterpret_cast<const Scalar*>(out.delta.data());
  const Scalar lr = static_cast<Scalar>(0.37);
  int64_t mismatches = 0;
  for (int64_t i = 0; i < rows.size(); ++i) {
    const Scalar want =
        sizeof(Scalar) == 4
            ? static_cast<Scalar>(-static_cast<double>(lr) * static_cast<double>(rows.data()[i]))
            : -lr * rows.data()[i];
    mismatches += delta[i] != want;
  }
  EXPECT_EQ(mismatches, 0);
  EXPECT_EQ(out.hyperparameters.at("learning_rate"), 0.37);
  EXPECT_EQ((*b)->ExportState().scalars.at("step"), 1.0);
}

TEST(SgdBlockTest, PlainStepInTheBlocksOwnDtypeIsTheScaledGradient) {
  ExpectPlainStepIsTheScaledGradient<float>(Precision::kFloat32);
  ExpectPlainStepIsTheScaledGradient<double>(Precision::kFloat64);
}

// A product that overflows on that path (a finite float gradient times a
// learning rate) is refused like the general path's, naming the delta,
// wherever it falls (here in the third chunk), and nothing changes.
TEST(SgdBlockTest, PlainStepThatOverflowsIsRefusedAndChangesNothing) {
  constexpr int64_t kR = 129, kC = 131;
  SgdOptions o;
  o.learning_rate = ConstantSchedule(10.0);
  absl::StatusOr<std::unique_ptr<ParameterBlock>> b =
      NewSgdBlock("w", {kR, kC}, o, Precision::kFloat32);
  ASSERT_TRUE(b.ok()) << b.status();
  std::mt19937 rng(12);
  Eigen::MatrixXf g = RandomMatrix(rng, kR, kC).cast<float>();
  DenseStepInput in;
  in.gradient = DenseTensor::FromMatrix(g);
  StepContext ctx;
  ctx.step = 1;
  ASSERT_TRUE((*b)->Propose(in, ctx).ok());  // dropped: not committed
  const BlockState before = (*b)->ExportState();
  g(128, 130) = 3e38f;  // the last element: row-major index 16898
  in.gradient = DenseTensor::FromMatrix(g);
  auto u = (*b)->Propose(in, ctx);
  ASSERT_FALSE(u.ok());
  EXPECT_EQ(u.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(u.status().message()),
              HasSubstr("block \"w\": delta would be non-finite"));
  EXPECT_TRUE(SameState((*b)->ExportState(), before));
  g(128, 130) = 1.0f;
  in.gradient = DenseTensor::FromMatrix(g);
  ctx.step = 1;
  auto ok = (*b)->Propose(in, ctx);
  ASSERT_TRUE(ok.ok()) << ok.status();
  (*ok)->Commit(1.0);
  EXPECT_EQ((*b)->ExportState().scalars.at("step"), 1.0);
}

}  // namespace
}  // namespace natgrad::core
