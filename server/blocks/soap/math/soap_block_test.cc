// SoapBlock against an independent dense oracle (soap_oracle.h: the
// reference's step transcribed in its own order). Updates are compared, not
// bases: they do not depend on the eigenvectors' signs, and every shape here
// keeps each preconditioned factor's first eigendecomposition free of repeated
// eigenvalues (square parameters, or the long side left to the identity), so
// the descending order, and with it the power-iteration path, is well defined.
#include "server/blocks/soap/math/soap_block.h"

#include <cmath>
#include <limits>
#include <random>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/blocks/soap/math/soap_oracle.h"
#include "server/blocks/internal/math/testing/dense_block_testing.h"
#include "server/engine/testing/eigen_inversion_engine.h"

namespace natgrad::core {
namespace {

using Eigen::MatrixXd;
using ::testing::HasSubstr;
using dense_block_testing::Random;
using dense_block_testing::RandomFloat;
using dense_block_testing::RelErr;
using dense_block_testing::SameState;
using dense_block_testing::ExpectBadStepsRefused;
using dense_block_testing::ExpectExportImportContinuesExactly;

SoapOptions Full() {
  SoapOptions o;
  o.learning_rate = *LinearWarmupSchedule(0.01, 0.1, 5);
  o.weight_decay = ConstantSchedule(0.01);
  o.beta1 = 0.9;
  o.beta2 = 0.95;
  o.shampoo_beta = 0.8;
  o.epsilon = 1e-8;
  o.precondition_frequency = 3;
  return o;
}

testing::SoapOracleOptions OracleOptions(const SoapOptions& o, int64_t rows, int64_t cols) {
  testing::SoapOracleOptions t;
  t.beta1 = o.beta1;
  t.beta2 = o.beta2;
  t.shampoo_beta = o.shampoo_beta;
  t.eps = o.epsilon;
  t.correct_bias = o.bias_correction;
  t.precondition_frequency = o.precondition_frequency;
  t.left = !o.vector && rows <= o.max_precond_dim;
  t.right = !o.vector && cols <= o.max_precond_dim;
  t.eigh_refresh = o.refresh == SoapRefresh::kEigh;
  return t;
}

void CompareWithOracle(const SoapOptions& o, int64_t rows, int64_t cols, Precision prec, double tol,
                       int steps = 14) {
  SCOPED_TRACE(::testing::Message() << rows << "x" << cols);
  testing::EigenInversionEngine engine;
  auto block = NewSoapBlock("w", {rows, cols}, o, prec);
  ASSERT_TRUE(block.ok()) << block.status();
  testing::SoapOracle oracle(OracleOptions(o, rows, cols), rows, cols);
  std::mt19937 rng(7);
  int refreshes = 0;
  for (int t = 1; t <= steps; ++t) {
    DenseStepInput in;
    const MatrixXd g = RandomFloat(rng, rows, cols), w = RandomFloat(rng, rows, cols);
    in.gradient = g;
    in.params = w;
    StepContext ctx{.step = t, .engine = &engine};
    auto p = (*block)->Propose(in, ctx);
    ASSERT_TRUE(p.ok()) << p.status();
    const BlockStepOutput out = (*p)->Commit(1.0);
    const double lr = o.learning_rate ? o.learning_rate->Value(t) : 3e-3;
    const double wd = o.weight_decay ? o.weight_decay->Value(t) : 0.01;
    const MatrixXd want = oracle.Step(g, w, lr, wd);
    if (t == 1) {
      EXPECT_TRUE(out.delta.ToMatrix<double>().isZero(0)) << "the first step only builds the bases";
      EXPECT_EQ(out.hyperparameters.at("preconditioned"), 0);
      continue;
    }
    refreshes += out.hyperparameters.at("refreshed") > 0;
    EXPECT_LE(RelErr(out.delta.ToMatrix<double>(), want), tol) << "step " << t;
  }
  EXPECT_EQ(refreshes, (steps - 1) / o.precondition_frequency);
}

TEST(SoapBlock, MayWaitForEngineExactlyWhenItDecomposes) {
  // The first step always; then the kEigh refreshes (every 3rd step), but
  // never the power-iteration ones, which run on the step's thread.
  for (SoapRefresh refresh : {SoapRefresh::kEigh, SoapRefresh::kPowerQr}) {
    SoapOptions o = Full();
    o.refresh = refresh;
    testing::EigenInversionEngine engine;
    auto block = NewSoapBlock("w", {5, 4}, o, Precision::kFloat64);
    ASSERT_TRUE(block.ok()) << block.status();
    dense_block_testing::ExpectMayWaitExactlyWhenItSubmits(**block, engine, 5, 4, 8);
  }
}

TEST(SoapBlock, PowerIterationRefreshMatchesOracleFloat64) {
  CompareWithOracle(Full(), 5, 5, Precision::kFloat64, 1e-10);
}

TEST(SoapBlock, EighRefreshMatchesOracleFloat64) {
  SoapOptions o = Full();
  o.refresh = SoapRefresh::kEigh;
  CompareWithOracle(o, 4, 4, Precision::kFloat64, 1e-10);
}

TEST(SoapBlock, ReferenceDefaultsMatchOracleFloat64) {
  SoapOptions o;  // lr 3e-3, betas 0.95, wd 0.01, frequency 10
  CompareWithOracle(o, 6, 6, Precision::kFloat64, 1e-10, 25);
}

TEST(SoapBlock, SideAboveMaxPrecondDimKeepsIdentityFloat64) {
  SoapOptions o = Full();
  o.max_precond_dim = 4;
  CompareWithOracle(o, 3, 7, Precision::kFloat64, 1e-10);  // right side identity
  CompareWithOracle(o, 7, 3, Precision::kFloat64, 1e-10);  // left side identity
  o.refresh = SoapRefresh::kEigh;
  CompareWithOracle(o, 3, 7, Precision::kFloat64, 1e-10);
  auto block = NewSoapBlock("w", {3, 7}, o, Precision::kFloat64);
  ASSERT_TRUE(block.ok());
  EXPECT_EQ((*block)->ExportState().tensors.count("right_factor"), 0);
  EXPECT_EQ((*block)->ExportState().tensors.count("left_factor"), 1);
}

TEST(SoapBlock, VectorIsAdamWithTheFirstStepSkippedFloat64) {
  SoapOptions o = Full();
  o.vector = true;
  CompareWithOracle(o, 6, 1, Precision::kFloat64, 1e-10);
  // Against Adam written out: no bases, so the oracle is just AdamW.
  testing::EigenInversionEngine engine;
  auto block = NewSoapBlock("b", {6, 1}, o, Precision::kFloat64);
  ASSERT_TRUE(block.ok());
  std::mt19937 rng(2);
  MatrixXd m = MatrixXd::Zero(6, 1), v = m;
  for (int t = 1; t <= 5; ++t) {
    DenseStepInput in;
    const MatrixXd g = Random(rng, 6, 1), w = Random(rng, 6, 1);
    in.gradient = g;
    in.params = w;
    StepContext ctx{.step = t, .engine = &engine};
    const MatrixXd got = (*(*block)->Propose(in, ctx))->Commit(1).delta.ToMatrix<double>();
    if (t == 1) continue;
    const int k = t - 1;
    m = 0.9 * m + 0.1 * g;
    v = 0.95 * v + 0.05 * g.cwiseProduct(g);
    const double lr = o.learning_rate->Value(t);
    const double s = lr * std::sqrt(1 - std::pow(0.95, k)) / (1 - std::pow(0.9, k));
    const MatrixXd stepped = w - s * m.cwiseQuotient((v.array().sqrt() + 1e-8).matrix());
    const MatrixXd want = stepped - lr * 0.01 * stepped - w;
    EXPECT_LE(RelErr(got, want), 1e-12) << "step " << t;
  }
  EXPECT_EQ(engine.submitted(), 0);
}

TEST(SoapBlock, NoBiasCorrectionNoWeightDecayFrequencyOneFloat64) {
  SoapOptions o = Full();
  o.bias_correction = false;
  o.weight_decay = ConstantSchedule(0);
  o.precondition_frequency = 1;
  CompareWithOracle(o, 5, 5, Precision::kFloat64, 1e-10, 8);
  o.refresh = SoapRefresh::kEigh;
  CompareWithOracle(o, 5, 5, Precision::kFloat64, 1e-10, 8);
}

// Row-major re-reading of x as rows x cols (the wire's order).
MatrixXd Reshape(const MatrixXd& x, int64_t rows, int64_t cols) {
  Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> flat = x;
  return Eigen::Map<Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>(
      flat.data(), rows, cols);
}

TEST(SoapBlock, ViewOfARank3TensorMatchesOracleFloat64) {
  // A [3, 2, 6] tensor arrives as 3 x 12; the kind's merge makes it 6 x 6.
  SoapOptions o = Full();
  o.view_rows = 6;
  testing::EigenInversionEngine engine;
  auto block = NewSoapBlock("conv", {3, 12}, o, Precision::kFloat64);
  ASSERT_TRUE(block.ok()) << block.status();
  testing::SoapOracle oracle(OracleOptions(o, 6, 6), 6, 6);
  std::mt19937 rng(9);
  for (int t = 1; t <= 8; ++t) {
    DenseStepInput in;
    const MatrixXd g = Random(rng, 3, 12), w = Random(rng, 3, 12);
    in.gradient = g;
    in.params = w;
    StepContext ctx{.step = t, .engine = &engine};
    auto p = (*block)->Propose(in, ctx);
    ASSERT_TRUE(p.ok()) << p.status();
    const MatrixXd got = (*p)->Commit(1.0).delta.ToMatrix<double>();
    const MatrixXd want = Reshape(
        oracle.Step(Reshape(g, 6, 6), Reshape(w, 6, 6), o.learning_rate->Value(t), 0.01), 3, 12);
    if (t > 1) EXPECT_LE(RelErr(got, want), 1e-10) << "step " << t;
  }
  EXPECT_EQ((*block)->ExportState().tensors.at("left_basis").rows(), 6);
}

TEST(SoapBlock, Float32WithinRelativeTolerance) {
  SoapOptions o = Full();
  CompareWithOracle(o, 5, 5, Precision::kFloat32, 1e-5, 8);
  o.refresh = SoapRefresh::kEigh;
  CompareWithOracle(o, 4, 4, Precision::kFloat32, 1e-5, 8);
  o.max_precond_dim = 4;
  CompareWithOracle(o, 3, 7, Precision::kFloat32, 1e-5, 8);
  o.vector = true;
  CompareWithOracle(o, 6, 1, Precision::kFloat32, 1e-5, 8);
}

TEST(SoapBlock, EngineJobsOnlyForTheFirstBasesAndEighRefreshes) {
  for (SoapRefresh refresh : {SoapRefresh::kPowerQr, SoapRefresh::kEigh}) {
    SoapOptions o = Full();  // frequency 3: refreshes at k = 3, 6 (steps 4, 7)
    o.refresh = refresh;
    testing::EigenInversionEngine engine;
    auto block = NewSoapBlock("w", {4, 3}, o, Precision::kFloat64);
    ASSERT_TRUE(block.ok());
    std::mt19937 rng(3);
    std::vector<int> submitted;
    for (int t = 1; t <= 7; ++t) {
      DenseStepInput in;
      in.gradient = Random(rng, 4, 3);
      in.params = Random(rng, 4, 3);
      StepContext ctx{.step = t, .engine = &engine};
      auto p = (*block)->Propose(in, ctx);
      ASSERT_TRUE(p.ok());
      (*p)->Commit(1);
      submitted.push_back(engine.submitted());
    }
    if (refresh == SoapRefresh::kPowerQr) {
      EXPECT_EQ(submitted, (std::vector<int>{2, 2, 2, 2, 2, 2, 2}));
    } else {
      EXPECT_EQ(submitted, (std::vector<int>{2, 2, 2, 4, 4, 4, 6}));
    }
  }
}

TEST(SoapBlock, ExportImportContinuesExactly) {
  for (Precision prec : {Precision::kFloat32, Precision::kFloat64}) {
    testing::EigenInversionEngine engine;
    SoapOptions o = Full();
    auto a = NewSoapBlock("w", {5, 4}, o, prec);
    auto b = NewSoapBlock("w", {5, 4}, o, prec);
    // Step 7 refreshes (k = 6).
    ExpectExportImportContinuesExactly(**a, **b, 5, 4, 5, 12, &engine);
  }
  // A fresh block's state (step 0, no bases) imports too.
  auto a = NewSoapBlock("w", {5, 4}, SoapOptions{}, Precision::kFloat64);
  auto b = NewSoapBlock("w", {5, 4}, SoapOptions{}, Precision::kFloat64);
  EXPECT_TRUE((*b)->ImportState((*a)->ExportState()).ok());
  EXPECT_EQ((*a)->ExportState().tensors.count("left_basis"), 0);
}

TEST(SoapBlock, BadInputsAreRefusedAndChangeNothing) {
  testing::EigenInversionEngine engine;
  SoapOptions o = Full();
  auto block = NewSoapBlock("fc1", {4, 3}, o, Precision::kFloat64);
  std::mt19937 rng(5);
  for (int t = 1; t <= 3; ++t) {
    DenseStepInput in;
    in.gradient = Random(rng, 4, 3);
    in.params = Random(rng, 4, 3);
    StepContext ctx{.step = t, .engine = &engine};
    (*(*block)->Propose(in, ctx))->Commit(1);
  }
  const BlockState before = (*block)->ExportState();
  StepContext ctx{.step = 4, .engine = &engine};
  ExpectBadStepsRefused(**block, "fc1", 4, 3, ctx, rng);
  // Bad imports.
  BlockState bad = before;
  bad.tensors["left_factor"](0, 0) = std::nan("");
  EXPECT_FALSE((*block)->ImportState(bad).ok());
  bad = before;
  bad.tensors["exp_avg_sq"](0, 0) = -1;
  EXPECT_THAT((*block)->ImportState(bad).message(), HasSubstr("exp_avg_sq"));
  bad = before;
  bad.tensors["right_factor"] = MatrixXd::Zero(2, 2);
  EXPECT_THAT((*block)->ImportState(bad).message(), HasSubstr("right_factor"));
  bad = before;
  bad.tensors["left_basis"] *= 2;
  EXPECT_THAT((*block)->ImportState(bad).message(), HasSubstr("orthogonal"));
  bad = before;
  bad.tensors["momentum"] = MatrixXd::Zero(4, 3);
  EXPECT_THAT((*block)->ImportState(bad).message(), HasSubstr("momentum"));
  bad = before;
  bad.tensors.erase("right_basis");
  EXPECT_FALSE((*block)->ImportState(bad).ok());
  bad = before;
  bad.scalars["step"] = -2;
  EXPECT_FALSE((*block)->ImportState(bad).ok());
  bad = before;
  bad.scalars["step"] = 0;  // bases present at step 0
  EXPECT_FALSE((*block)->ImportState(bad).ok());
  EXPECT_TRUE(SameState(before, (*block)->ExportState()));
}

TEST(SoapBlock, FirstStepWithoutEngineIsAnErrorNamingTheBlock) {
  auto block = NewSoapBlock("w", {3, 3}, SoapOptions{}, Precision::kFloat32);
  DenseStepInput in;
  in.gradient = MatrixXd::Ones(3, 3);
  in.params = MatrixXd::Ones(3, 3);
  StepContext ctx{.step = 1};
  EXPECT_THAT((*block)->Propose(in, ctx).status().message(),
              HasSubstr("block \"w\": has no inversion engine"));
}

TEST(SoapBlock, OptionsAreValidated) {
  auto bad = [](auto edit) {
    SoapOptions o;
    edit(o);
    return ValidateSoapOptions({3, 3}, o);
  };
  EXPECT_THAT(bad([](SoapOptions& o) { o.beta2 = 1; }).message(), HasSubstr("soap.beta2"));
  EXPECT_THAT(bad([](SoapOptions& o) { o.beta1 = std::nan(""); }).message(), HasSubstr("beta1"));
  EXPECT_THAT(bad([](SoapOptions& o) { o.shampoo_beta = -0.1; }).message(),
              HasSubstr("shampoo_beta"));
  EXPECT_THAT(bad([](SoapOptions& o) { o.epsilon = 0; }).message(), HasSubstr("epsilon"));
  EXPECT_THAT(bad([](SoapOptions& o) { o.precondition_frequency = 0; }).message(),
              HasSubstr("precondition_frequency"));
  EXPECT_THAT(bad([](SoapOptions& o) { o.max_precond_dim = 0; }).message(),
              HasSubstr("max_precond_dim"));
  EXPECT_THAT(bad([](SoapOptions& o) { o.view_rows = 2; }).message(), HasSubstr("view_rows"));
  EXPECT_TRUE(bad([](SoapOptions&) {}).ok());
  EXPECT_FALSE(ValidateSoapOptions({0, 3}, SoapOptions{}).ok());
}

TEST(SoapBlock, StateBytesEstimateBoundsTheState) {
  SoapOptions o = Full();
  auto block = NewSoapBlock("w", {7, 5}, o, Precision::kFloat64);
  testing::EigenInversionEngine engine;
  DenseStepInput in;
  in.gradient = MatrixXd::Ones(7, 5);
  in.params = MatrixXd::Ones(7, 5);
  StepContext ctx{.step = 1, .engine = &engine};
  (*(*block)->Propose(in, ctx))->Commit(1);
  EXPECT_EQ((*block)->StateBytes(), EstimateSoapStateBytes({7, 5}, o, 8));
  o.max_precond_dim = 6;
  EXPECT_EQ(EstimateSoapStateBytes({7, 5}, o, 4), (2 * 35 + 2 * 25) * 4);
  EXPECT_EQ(EstimateSoapStateBytes({int64_t{1} << 40, int64_t{1} << 40}, o, 8),
            std::numeric_limits<int64_t>::max());
}

}  // namespace
}  // namespace natgrad::core
