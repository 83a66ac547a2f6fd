// One block's Propose + Commit, EKFAC against K-FAC (eigen-exact damping) on
// the same raw statistics, float32 state, on steps that do not refresh the
// decomposition (inverse_period 10^9 after a first step), so what is timed
// is the per-step work: factor EMAs, preconditioning and, for EKFAC, the
// rotations of the statistics and the scaling estimate. Dense layers
// (T = 1) and unfolded convolutions (T > 1, the exact per-example
// estimator). Arguments: d_in, d_out, n (examples), T (locations).
#include <memory>
#include <random>

#include "benchmark/benchmark.h"
#include "server/blocks/ekfac/math/ekfac_block.h"
#include "server/blocks/kfac_dense/math/kfac_dense_block.h"
#include "server/engine/testing/eigen_inversion_engine.h"

namespace natgrad::core {
namespace {

class Const final : public Schedule {
 public:
  explicit Const(double v) : v_(v) {}
  double Value(int64_t) const override { return v_; }

 private:
  double v_;
};

Eigen::MatrixXd Random(int64_t r, int64_t c, std::mt19937& rng) {
  std::normal_distribution<double> normal;
  Eigen::MatrixXd m(r, c);
  for (int64_t j = 0; j < c; ++j)
    for (int64_t i = 0; i < r; ++i) m(i, j) = normal(rng);
  return m;
}

template <bool kEkfac>
void BM_Step(benchmark::State& state) {
  const int64_t d_in = state.range(0), d_out = state.range(1), n = state.range(2),
                T = state.range(3);
  std::unique_ptr<ParameterBlock> block;
  if constexpr (kEkfac) {
    EkfacOptions o;
    o.d_in = d_in;
    o.d_out = d_out;
    o.has_bias = true;
    o.inverse_period = 1000000000;
    o.locations = T;
    o.damping = std::make_shared<Const>(1e-2);
    block = *NewEkfacBlock("b", o, Precision::kFloat32);
  } else {
    KfacDenseOptions o;
    o.d_in = d_in;
    o.d_out = d_out;
    o.has_bias = true;
    o.inverse_period = 1000000000;
    o.locations = T;
    o.damping_mode = KfacDampingMode::kEigenExact;
    o.damping = std::make_shared<Const>(1e-2);
    block = *NewKfacDenseBlock("b", o, Precision::kFloat32);
  }
  std::mt19937 rng(1);
  KfacStepInput in;
  in.gradient = Random(d_out, d_in + 1, rng);
  KfacStatisticsInput k;
  k.activations = Random(n * T, d_in, rng);
  k.output_gradients = Random(n * T, d_out, rng);
  k.num_examples = n * T;
  in.kfac = k;
  testing::EigenInversionEngine engine;
  StepContext ctx;
  ctx.engine = &engine;
  ctx.step = 1;
  (*block->Propose(in, ctx))->Commit(1.0);  // the one decomposition
  for (auto _ : state) {
    ++ctx.step;
    auto p = block->Propose(in, ctx);
    benchmark::DoNotOptimize((*p)->Commit(1.0).delta.data());
  }
}

void Shapes(benchmark::internal::Benchmark* b) {
  b->Args({256, 256, 128, 1})->Args({1024, 512, 128, 1})->Args({288, 64, 32, 64})
      ->Args({576, 128, 32, 16})->Unit(benchmark::kMillisecond);
}

BENCHMARK(BM_Step<true>)->Name("ekfac")->Apply(Shapes);
BENCHMARK(BM_Step<false>)->Name("kfac_dense_eigen")->Apply(Shapes);

}  // namespace
}  // namespace natgrad::core

BENCHMARK_MAIN();
