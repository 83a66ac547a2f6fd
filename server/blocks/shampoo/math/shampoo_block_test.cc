// ShampooBlock against an independent dense oracle: a second transcription of
// the algorithm (docs/math.md, Shampoo) in double with explicit matrix powers
// from Eigen's SelfAdjointEigenSolver of (X_hat + eps I).
#include "server/blocks/shampoo/math/shampoo_block.h"

#include <cmath>
#include <random>

#include "Eigen/Eigenvalues"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/blocks/internal/math/testing/dense_block_testing.h"
#include "server/engine/testing/eigen_inversion_engine.h"

namespace natgrad::core {
namespace {

using ::testing::HasSubstr;
using dense_block_testing::Random;
using dense_block_testing::RandomFloat;
using dense_block_testing::RelErr;
using dense_block_testing::SameState;
using dense_block_testing::ExpectBadStepsRefused;
using dense_block_testing::ExpectExportImportContinuesExactly;
using Eigen::MatrixXd;

struct Oracle {
  ShampooOptions o;
  int64_t rows, cols, n = 0;
  MatrixXd m, v;
  std::vector<std::vector<MatrixXd>> L, R, Lp, Rp;  // [row tile][col tile]
  std::vector<std::pair<int64_t, int64_t>> rt, ct;
  bool have_roots = false;

  Oracle(const ShampooOptions& opts, int64_t r, int64_t c) : o(opts), rows(r), cols(c) {
    m = MatrixXd::Zero(r, c);
    v = MatrixXd::Zero(r, c);
    for (int64_t b = 0; b < r; b += o.max_preconditioner_dim)
      rt.push_back({b, std::min(o.max_preconditioner_dim, r - b)});
    for (int64_t b = 0; b < c; b += o.max_preconditioner_dim)
      ct.push_back({b, std::min(o.max_preconditioner_dim, c - b)});
    L.assign(rt.size(), std::vector<MatrixXd>(ct.size()));
    R = Lp = Rp = L;
    for (size_t i = 0; i < rt.size(); ++i)
      for (size_t j = 0; j < ct.size(); ++j) {
        L[i][j] = MatrixXd::Zero(rt[i].second, rt[i].second);
        R[i][j] = MatrixXd::Zero(ct[j].second, ct[j].second);
      }
  }

  static MatrixXd Power(const MatrixXd& x, double eps, double p) {
    const MatrixXd damped = x + eps * MatrixXd::Identity(x.rows(), x.cols());
    Eigen::SelfAdjointEigenSolver<MatrixXd> es(damped);
    // The same clamp as the engine's (negative round-off eigenvalues are 0).
    Eigen::VectorXd s = es.eigenvalues().array().max(eps).pow(p);
    return es.eigenvectors() * s.asDiagonal() * es.eigenvectors().transpose();
  }

  MatrixXd Step(const MatrixXd& g, const MatrixXd& w, double lr, double wd) {
    ++n;
    const double c1 = o.bias_correction ? 1 - std::pow(o.beta1, n) : 1;
    m = o.beta1 * m + (1 - o.beta1) * g;
    const MatrixXd mh = m / c1;
    MatrixXd dir;
    if (rows == 1 || cols == 1) {
      const double c2 = o.bias_correction ? 1 - std::pow(o.beta2, n) : 1;
      v = o.beta2 * v + (1 - o.beta2) * g.cwiseProduct(g);
      dir = mh.array() / (v.array() / c2 + o.epsilon).sqrt();
    } else {
      MatrixXd graft = mh;
      if (o.grafting == ShampooGrafting::kAdam) {
        const double c2 = o.bias_correction ? 1 - std::pow(o.grafting_beta2, n) : 1;
        v = o.grafting_beta2 * v + (1 - o.grafting_beta2) * g.cwiseProduct(g);
        graft = mh.array() / ((v.array() / c2).sqrt() + o.grafting_epsilon);
      }
      const double c2 = o.bias_correction ? 1 - std::pow(o.beta2, n) : 1;
      const double root = o.inverse_root_override ? o.inverse_root_override : 4;
      const bool pre = n >= o.start_preconditioning_step;
      const bool refresh =
          pre && (!have_roots || (n - o.start_preconditioning_step) % o.precondition_frequency == 0);
      dir = graft;
      for (size_t i = 0; i < rt.size(); ++i)
        for (size_t j = 0; j < ct.size(); ++j) {
          const MatrixXd gt = g.block(rt[i].first, ct[j].first, rt[i].second, ct[j].second);
          L[i][j] = o.beta2 * L[i][j] + (1 - o.beta2) * gt * gt.transpose();
          R[i][j] = o.beta2 * R[i][j] + (1 - o.beta2) * gt.transpose() * gt;
          if (refresh) {
            Lp[i][j] = Power(L[i][j] / c2, o.epsilon, -1.0 / root);
            Rp[i][j] = Power(R[i][j] / c2, o.epsilon, -1.0 / root);
          }
          if (!pre) continue;
          MatrixXd p = Lp[i][j] *
                       mh.block(rt[i].first, ct[j].first, rt[i].second, ct[j].second) *
                       Rp[i][j];
          if (o.grafting != ShampooGrafting::kNone) {
            p *= graft.block(rt[i].first, ct[j].first, rt[i].second, ct[j].second).norm() /
                 p.norm();
          }
          dir.block(rt[i].first, ct[j].first, rt[i].second, ct[j].second) = p;
        }
      have_roots |= refresh;
    }
    return -lr * dir - lr * wd * w;
  }
};

ShampooOptions Full() {
  ShampooOptions o;
  o.learning_rate = *LinearWarmupSchedule(0.01, 0.1, 5);
  o.weight_decay = ConstantSchedule(0.01);
  o.beta1 = 0.9;
  o.beta2 = 0.95;
  o.epsilon = 1e-4;
  o.bias_correction = true;
  o.precondition_frequency = 3;
  o.start_preconditioning_step = 2;
  o.max_preconditioner_dim = 3;
  o.grafting = ShampooGrafting::kAdam;
  return o;
}

void CompareWithOracle(const ShampooOptions& o, int64_t rows, int64_t cols, Precision prec,
                       double tol, int steps = 9) {
  testing::EigenInversionEngine engine;
  auto block = NewShampooBlock("w", {rows, cols}, o, prec);
  ASSERT_TRUE(block.ok()) << block.status();
  Oracle oracle(o, rows, cols);
  std::mt19937 rng(7);
  for (int t = 1; t <= steps; ++t) {
    DenseStepInput in;
    const MatrixXd g = RandomFloat(rng, rows, cols), w = RandomFloat(rng, rows, cols);
    in.gradient = g;
    in.params = w;
    StepContext ctx;
    ctx.step = t;
    ctx.engine = &engine;
    auto p = (*block)->Propose(in, ctx);
    ASSERT_TRUE(p.ok()) << p.status();
    const MatrixXd got = (*p)->Commit(1.0).delta.ToMatrix<double>();
    const double lr = o.learning_rate ? o.learning_rate->Value(t) : 1e-3;
    const double wd = o.weight_decay ? o.weight_decay->Value(t) : 0;
    const MatrixXd want = oracle.Step(g, w, lr, wd);
    EXPECT_LE(RelErr(got, want), tol) << "step " << t;
  }
}

TEST(ShampooBlock, MayWaitForEngineExactlyOnRefreshSteps) {
  // Refreshes at steps 2, 5, 8 (start 2, frequency 3).
  testing::EigenInversionEngine engine;
  auto block = NewShampooBlock("w", {5, 4}, Full(), Precision::kFloat64);
  ASSERT_TRUE(block.ok()) << block.status();
  dense_block_testing::ExpectMayWaitExactlyWhenItSubmits(**block, engine, 5, 4, 9);
}

TEST(ShampooBlock, BlockedAdamGraftedBiasCorrectedMatchesOracleFloat64) {
  // 7 x 5 with max 3: row tiles 3, 3, 1 and column tiles 3, 2 (six tiles).
  CompareWithOracle(Full(), 7, 5, Precision::kFloat64, 1e-10);
}

TEST(ShampooBlock, SgdGraftingNoBiasCorrectionRootOverrideFloat64) {
  ShampooOptions o = Full();
  o.grafting = ShampooGrafting::kSgd;
  o.bias_correction = false;
  o.inverse_root_override = 2;
  o.precondition_frequency = 1;
  o.start_preconditioning_step = 1;
  CompareWithOracle(o, 4, 6, Precision::kFloat64, 1e-10);
}

TEST(ShampooBlock, UngraftedUnblockedFloat64) {
  ShampooOptions o = Full();
  o.grafting = ShampooGrafting::kNone;
  o.max_preconditioner_dim = 1024;
  CompareWithOracle(o, 5, 4, Precision::kFloat64, 1e-10);
}

TEST(ShampooBlock, DiagonalForVectorsFloat64) {
  CompareWithOracle(Full(), 6, 1, Precision::kFloat64, 1e-10);
  CompareWithOracle(Full(), 1, 6, Precision::kFloat64, 1e-10);
}

// Row-major re-reading of x as rows x cols (the wire's order).
MatrixXd Reshape(const MatrixXd& x, int64_t rows, int64_t cols) {
  Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> flat = x;
  return Eigen::Map<Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>(
      flat.data(), rows, cols);
}

TEST(ShampooBlock, MergedViewOfARank3TensorMatchesOracleFloat64) {
  // A [3, 2, 10] tensor arrives as 3 x 20; max 8 merges it to [6, 10].
  ShampooOptions o = Full();
  o.max_preconditioner_dim = 8;
  o.view_rows = ShampooMergedRows({3, 2, 10}, 8);
  ASSERT_EQ(o.view_rows, 6);
  testing::EigenInversionEngine engine;
  auto block = NewShampooBlock("conv", {3, 20}, o, Precision::kFloat64);
  ASSERT_TRUE(block.ok()) << block.status();
  Oracle oracle(o, 6, 10);
  std::mt19937 rng(9);
  for (int t = 1; t <= 7; ++t) {
    DenseStepInput in;
    const MatrixXd g = Random(rng, 3, 20), w = Random(rng, 3, 20);
    in.gradient = g;
    in.params = w;
    StepContext ctx{.step = t, .engine = &engine};
    auto p = (*block)->Propose(in, ctx);
    ASSERT_TRUE(p.ok()) << p.status();
    const MatrixXd got = (*p)->Commit(1.0).delta.ToMatrix<double>();
    const MatrixXd want = Reshape(
        oracle.Step(Reshape(g, 6, 10), Reshape(w, 6, 10), o.learning_rate->Value(t), 0.01), 3, 20);
    EXPECT_LE(RelErr(got, want), 1e-10) << "step " << t;
  }
  EXPECT_EQ((*block)->ExportState().tensors.at("momentum").rows(), 6);
}

TEST(ShampooBlock, MergeOfSmallDimensions) {
  EXPECT_EQ(ShampooMergedRows({3, 2, 10}, 8), 6);
  EXPECT_EQ(ShampooMergedRows({64, 3, 3, 3}, 1024), 576);  // [576, 3]
  EXPECT_EQ(ShampooMergedRows({2, 1, 3, 50}, 8), 6);      // ones dropped
  EXPECT_EQ(ShampooMergedRows({4, 2, 3, 5}, 8), 0);       // [8, 3, 5]: default view
  EXPECT_EQ(ShampooMergedRows({16, 3, 3}, 1024), 0);      // one group: default view
  EXPECT_EQ(ShampooMergedRows({4, 6}, 2), 0);             // rank 2 is kept
  ShampooOptions o;
  o.view_rows = 7;
  EXPECT_THAT(ValidateShampooOptions({3, 20}, o).message(), HasSubstr("view_rows"));
}

TEST(ShampooBlock, Float32WithinRelativeTolerance) {
  ShampooOptions o = Full();
  o.epsilon = 1e-2;  // keeps the roots well conditioned for float32
  CompareWithOracle(o, 7, 5, Precision::kFloat32, 1e-5);
  o.grafting = ShampooGrafting::kSgd;
  CompareWithOracle(o, 4, 6, Precision::kFloat32, 1e-5);
  CompareWithOracle(o, 6, 1, Precision::kFloat32, 1e-5);
}

TEST(ShampooBlock, RefreshSubmitsEveryTileFactorOnlyOnRefreshSteps) {
  ShampooOptions o = Full();  // start 2, frequency 3: refreshes at 2, 5, 8
  o.max_preconditioner_dim = 2;
  testing::EigenInversionEngine engine;
  auto block = NewShampooBlock("w", {8, 6}, o, Precision::kFloat64);
  ASSERT_TRUE(block.ok());
  std::mt19937 rng(3);
  std::vector<int> submitted;
  for (int t = 1; t <= 8; ++t) {
    DenseStepInput in;
    in.gradient = Random(rng, 8, 6);
    in.params = Random(rng, 8, 6);
    StepContext ctx{.step = t, .engine = &engine};
    auto p = (*block)->Propose(in, ctx);
    ASSERT_TRUE(p.ok());
    (*p)->Commit(1);
    submitted.push_back(engine.submitted());
  }
  // 4 x 3 tiles, two 2 x 2 factors each.
  EXPECT_EQ(submitted, (std::vector<int>{0, 24, 24, 24, 48, 48, 48, 72}));
}

TEST(ShampooBlock, ExportImportContinuesExactly) {
  for (Precision prec : {Precision::kFloat32, Precision::kFloat64}) {
    testing::EigenInversionEngine engine;
    ShampooOptions o = Full();
    auto a = NewShampooBlock("w", {7, 5}, o, prec);
    auto b = NewShampooBlock("w", {7, 5}, o, prec);
    // Step 7 uses the roots of step 5; step 8 refreshes.
    ExpectExportImportContinuesExactly(**a, **b, 7, 5, 6, 12, &engine);
  }
}

TEST(ShampooBlock, BadInputsAreRefusedAndChangeNothing) {
  testing::EigenInversionEngine engine;
  ShampooOptions o = Full();
  auto block = NewShampooBlock("fc1", {4, 3}, o, Precision::kFloat64);
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
  bad.tensors["left_factor.0"](0, 0) = std::nan("");
  EXPECT_FALSE((*block)->ImportState(bad).ok());
  bad = before;
  bad.tensors["second_moment"](0, 0) = -1;
  EXPECT_FALSE((*block)->ImportState(bad).ok());
  bad = before;
  bad.tensors["right_factor.0"] = MatrixXd::Zero(2, 2);
  EXPECT_THAT((*block)->ImportState(bad).message(), HasSubstr("right_factor.0"));
  bad = before;
  bad.tensors["left_factor.9"] = MatrixXd::Zero(4, 4);
  EXPECT_THAT((*block)->ImportState(bad).message(), HasSubstr("left_factor.9"));
  bad = before;
  bad.tensors.erase("right_root.0");
  EXPECT_FALSE((*block)->ImportState(bad).ok());
  bad = before;
  bad.scalars["step"] = -2;
  EXPECT_FALSE((*block)->ImportState(bad).ok());
  EXPECT_TRUE(SameState(before, (*block)->ExportState()));
}

TEST(ShampooBlock, RefreshWithoutEngineIsAnErrorNamingTheBlock) {
  auto block = NewShampooBlock("w", {3, 3}, ShampooOptions{}, Precision::kFloat32);
  DenseStepInput in;
  in.gradient = MatrixXd::Ones(3, 3);
  StepContext ctx{.step = 1};
  EXPECT_THAT((*block)->Propose(in, ctx).status().message(),
              HasSubstr("block \"w\": has no inversion engine"));
}

TEST(ShampooBlock, OptionsAreValidated) {
  auto bad = [](auto edit) {
    ShampooOptions o;
    edit(o);
    return ValidateShampooOptions({3, 3}, o);
  };
  EXPECT_THAT(bad([](ShampooOptions& o) { o.beta2 = 1; }).message(), HasSubstr("beta2"));
  EXPECT_THAT(bad([](ShampooOptions& o) { o.beta1 = std::nan(""); }).message(), HasSubstr("beta1"));
  EXPECT_THAT(bad([](ShampooOptions& o) { o.epsilon = 0; }).message(), HasSubstr("epsilon"));
  EXPECT_THAT(bad([](ShampooOptions& o) { o.precondition_frequency = 0; }).message(),
              HasSubstr("precondition_frequency"));
  EXPECT_THAT(bad([](ShampooOptions& o) { o.start_preconditioning_step = 0; }).message(),
              HasSubstr("start_preconditioning_step"));
  EXPECT_THAT(bad([](ShampooOptions& o) { o.max_preconditioner_dim = 0; }).message(),
              HasSubstr("max_preconditioner_dim"));
  EXPECT_THAT(bad([](ShampooOptions& o) { o.inverse_root_override = -1; }).message(),
              HasSubstr("inverse_root_override"));
  EXPECT_TRUE(bad([](ShampooOptions&) {}).ok());
  EXPECT_FALSE(ValidateShampooOptions({0, 3}, ShampooOptions{}).ok());
}

TEST(ShampooBlock, StateBytesEstimateBoundsTheState) {
  ShampooOptions o = Full();
  auto block = NewShampooBlock("w", {7, 5}, o, Precision::kFloat64);
  testing::EigenInversionEngine engine;
  DenseStepInput in;
  in.gradient = MatrixXd::Ones(7, 5);
  in.params = MatrixXd::Ones(7, 5);
  StepContext ctx{.step = 2, .engine = &engine};
  (*(*block)->Propose(in, ctx))->Commit(1);
  EXPECT_LE((*block)->StateBytes(), EstimateShampooStateBytes({7, 5}, o, 8));
  EXPECT_EQ(EstimateShampooStateBytes({int64_t{1} << 40, int64_t{1} << 40}, o, 8),
            std::numeric_limits<int64_t>::max());
}

}  // namespace
}  // namespace natgrad::core
