// One GaussianBlock step (Propose + Commit), float64: the client sends (m, S)
// or (m, L) with the gradient in its parametrisation, the path with the most
// factorisations. Args: M, L (copies), parametrisation, threading: 0 no
// compute pool (copies one after another, OpenBLAS at its default thread
// count), 1 a ComputePool of one thread per core with OpenBLAS pinned to 1
// (copies side by side, each single-threaded), 2 the pool with OpenBLAS at
// its default (copies side by side, their BLAS calls queueing for OpenBLAS's
// threads). Real time.
#include <memory>
#include <random>

#include "Eigen/Cholesky"
#include "Eigen/Core"
#include "benchmark/benchmark.h"
#include "server/blocks/gaussian/math/gaussian_block.h"
#include "server/core/schedule.h"
#include "server/linalg/compute_pool.h"
#include "server/linalg/thread_policy.h"

namespace natgrad::core {
namespace {

GaussianStepInput MakeInput(int m, int copies, GaussianParametrization p) {
  std::mt19937 rng(1);
  std::normal_distribution<double> normal;
  const auto random = [&](int r, int c) {
    Eigen::MatrixXd x(r, c);
    for (int j = 0; j < c; ++j)
      for (int i = 0; i < r; ++i) x(i, j) = normal(rng);
    return x;
  };
  GaussianStepInput in;
  in.gradient_space = GaussianStepInput::GradientSpace::kParametrization;
  for (int c = 0; c < copies; ++c) {
    const Eigen::MatrixXd a = random(m, m) / std::sqrt(double(m));
    const Eigen::MatrixXd s =
        a * a.transpose() + Eigen::MatrixXd::Identity(m, m);
    in.param1.push_back(random(m, 1));
    in.param2.push_back(p == GaussianParametrization::kMeanCholesky
                            ? Eigen::MatrixXd(s.llt().matrixL())
                            : s);
    in.grad1.push_back(1e-2 * random(m, 1));
    const Eigen::MatrixXd g = random(m, m);
    in.grad2.push_back(1e-3 * (g + g.transpose()));
  }
  return in;
}

void BM_GaussianStep(benchmark::State& state) {
  const int m = static_cast<int>(state.range(0));
  const int copies = static_cast<int>(state.range(1));
  const auto p = static_cast<GaussianParametrization>(state.range(2));
  GaussianOptions o;
  o.dim = m;
  o.copies = copies;
  o.parametrization = p;
  o.gamma = ConstantSchedule(0.1);
  auto block = NewGaussianBlock("q_u", o);
  if (!block.ok()) {
    state.SkipWithError(std::string(block.status().message()).c_str());
    return;
  }
  const GaussianStepInput input = MakeInput(m, copies, p);
  static linalg::ComputePool pool(0);
  const int mode = static_cast<int>(state.range(3));
  const bool use_pool = mode != 0;
  linalg::SetBlasThreads(mode == 1 ? 1 : linalg::BlasMaxThreads());
  StepContext ctx;
  ctx.step = 1;
  ctx.compute_pool = use_pool ? &pool : nullptr;
  for (auto _ : state) {
    auto pending = (*block)->Propose(input, ctx);
    if (!pending.ok()) {
      state.SkipWithError(std::string(pending.status().message()).c_str());
      return;
    }
    benchmark::DoNotOptimize((*pending)->Commit(1.0));
  }
  state.SetLabel(std::string(GaussianParametrizationName(p)) +
                 (mode == 0 ? " nopool" : mode == 1 ? " pool" : " pool_blasN"));
  state.counters["copies_per_s"] = benchmark::Counter(
      copies, benchmark::Counter::kIsIterationInvariantRate);
}

void Args(benchmark::internal::Benchmark* b) {
  for (int p : {static_cast<int>(GaussianParametrization::kMeanCovariance),
                static_cast<int>(GaussianParametrization::kMeanCholesky)})
    for (int m : {64, 256, 1024})
      for (int copies : {1, 8})
        for (int mode : {0, 1, 2}) b->Args({m, copies, p, mode});
}
BENCHMARK(BM_GaussianStep)->Apply(Args)->UseRealTime()->Unit(benchmark::kMillisecond);

}  // namespace
}  // namespace natgrad::core

BENCHMARK_MAIN();
