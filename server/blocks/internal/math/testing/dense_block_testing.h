// Test helpers shared by the dense-gradient blocks' math tests (shampoo,
// soap): random inputs, a relative error, state equality, the step inputs
// every such block must refuse without changing its state, an
// export/import round trip that must continue exactly, and MayWaitForEngine
// against the engine's submissions. Test only.
#ifndef NATGRAD_SERVER_BLOCKS_INTERNAL_MATH_TESTING_DENSE_BLOCK_TESTING_H_
#define NATGRAD_SERVER_BLOCKS_INTERNAL_MATH_TESTING_DENSE_BLOCK_TESTING_H_

#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "Eigen/Core"
#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/core/block.h"
#include "server/engine/inversion_engine.h"

namespace natgrad::core::dense_block_testing {

// Standard normal entries.
inline Eigen::MatrixXd Random(std::mt19937& rng, int64_t r, int64_t c) {
  std::normal_distribution<double> d;
  Eigen::MatrixXd m(r, c);
  for (int64_t i = 0; i < m.size(); ++i) m.data()[i] = d(rng);
  return m;
}

// Values exactly representable in float, so both precisions see one input.
inline Eigen::MatrixXd RandomFloat(std::mt19937& rng, int64_t r, int64_t c) {
  return Random(rng, r, c).cast<float>().cast<double>();
}

inline double RelErr(const Eigen::MatrixXd& got, const Eigen::MatrixXd& want) {
  return (got - want).cwiseAbs().maxCoeff() / want.cwiseAbs().maxCoeff();
}

inline bool SameState(const BlockState& x, const BlockState& y) {
  if (x.scalars != y.scalars || x.tensors.size() != y.tensors.size()) return false;
  for (const auto& [k, v] : x.tensors) {
    auto it = y.tensors.find(k);
    if (it == y.tensors.end() || it->second != v) return false;
  }
  return true;
}

// Steps block (named name, rows x cols, rows != cols, with weight decay) must
// refuse at ctx: a transposed gradient, a NaN in it, missing params, a
// negative learning-rate override, and a gradient whose factor overflows.
// The caller checks that its state did not change.
inline void ExpectBadStepsRefused(ParameterBlock& block, const std::string& name, int64_t rows,
                                  int64_t cols, const StepContext& ctx, std::mt19937& rng) {
  using ::testing::HasSubstr;
  {
    DenseStepInput in;
    in.gradient = Random(rng, cols, rows);
    in.params = Random(rng, rows, cols);
    EXPECT_THAT(block.Propose(in, ctx).status().message(),
                HasSubstr(absl::StrCat("block \"", name, "\": gradient")));
  }
  {
    DenseStepInput in;
    Eigen::MatrixXd g = Random(rng, rows, cols);
    g(1, 1) = std::nan("");
    in.gradient = g;
    in.params = Random(rng, rows, cols);
    EXPECT_FALSE(block.Propose(in, ctx).ok());
  }
  {
    DenseStepInput in;
    in.gradient = Random(rng, rows, cols);  // weight decay without params
    EXPECT_THAT(block.Propose(in, ctx).status().message(),
                HasSubstr(absl::StrCat("block \"", name, "\": params")));
  }
  {
    DenseStepInput in;
    in.gradient = Random(rng, rows, cols);
    in.params = Random(rng, rows, cols);
    in.learning_rate = -1;
    EXPECT_FALSE(block.Propose(in, ctx).ok());
  }
  {
    DenseStepInput in;
    in.gradient = Random(rng, rows, cols) * 1e200;  // G G^T overflows
    in.params = Random(rng, rows, cols);
    EXPECT_THAT(block.Propose(in, ctx).status().message(), HasSubstr("non-finite"));
  }
}

// a and b are two fresh blocks of one config, rows x cols. a takes steps
// 1..split; b imports a's state (and must hold as many bytes); then both take
// steps split + 1..last, which must give the same deltas exactly.
inline void ExpectExportImportContinuesExactly(ParameterBlock& a, ParameterBlock& b, int64_t rows,
                                               int64_t cols, int split, int last,
                                               engine::InversionEngine* engine) {
  std::mt19937 rng(11);
  std::vector<Eigen::MatrixXd> gs, ws;
  for (int t = 0; t < last; ++t) {
    gs.push_back(Random(rng, rows, cols));
    ws.push_back(Random(rng, rows, cols));
  }
  auto step = [&](ParameterBlock& blk, int t) {
    DenseStepInput in;
    in.gradient = gs[t - 1];
    in.params = ws[t - 1];
    StepContext ctx{.step = t, .engine = engine};
    return (*blk.Propose(in, ctx))->Commit(1).delta.ToMatrix<double>();
  };
  for (int t = 1; t <= split; ++t) step(a, t);
  ASSERT_TRUE(b.ImportState(a.ExportState()).ok());
  EXPECT_EQ(b.StateBytes(), a.StateBytes());
  for (int t = split + 1; t <= last; ++t) EXPECT_EQ(step(a, t), step(b, t)) << "step " << t;
}

// MayWaitForEngine(t), asked before each of `steps` committed steps, is true
// exactly on the steps whose Propose submits to `engine` (a counting engine
// double with submitted(), e.g. testing::EigenInversionEngine): a session
// proposes the others side by side on pool threads, where an engine wait
// would block.
template <typename CountingEngine>
void ExpectMayWaitExactlyWhenItSubmits(ParameterBlock& blk, CountingEngine& engine, int64_t rows,
                                       int64_t cols, int steps) {
  std::mt19937 rng(11);
  int waits = 0;
  for (int t = 1; t <= steps; ++t) {
    DenseStepInput in;
    in.gradient = Random(rng, rows, cols);
    in.params = Random(rng, rows, cols);  // weight decay reads them
    StepContext ctx{.step = t, .engine = &engine};
    const bool may = blk.MayWaitForEngine(t);
    const int before = engine.submitted();
    auto p = blk.Propose(in, ctx);
    ASSERT_TRUE(p.ok()) << p.status();
    EXPECT_EQ(may, engine.submitted() > before) << "step " << t;
    waits += may;
    (*p)->Commit(1);
  }
  EXPECT_GT(waits, 0);
  EXPECT_LT(waits, steps);  // the plan has steps of both kinds
}

}  // namespace natgrad::core::dense_block_testing

#endif  // NATGRAD_SERVER_BLOCKS_INTERNAL_MATH_TESTING_DENSE_BLOCK_TESTING_H_
