// K-FAC dense block kernels at d in {256, 1024, 2048}, float32 (the default
// state precision), beside plain d x d GEMMs of the same run: Eigen's
// (single-threaded) and OpenBLAS's through linalg::Gemm (the path the
// kernels take for large products). Every benchmark reports "flops" (a
// nominal count per iteration, as a rate) so its figure reads as a fraction
// of the GEMM rate:
//   gemm                 C = A B (Eigen)                  2 d^3
//   blas_gemm            C = A B (linalg::Gemm)           2 d^3
//   factor_update        A <- rho A + (1-rho) xbar^T xbar / n, n = d rows
//                        (SYRK, one triangle)             d^3
//   eigh                 Eigen SelfAdjointEigenSolver (the test engine;
//                        the real engine is LAPACK ?syevd) 9 d^3 (nominal)
//   cholesky_inverse     LLT + solve against I            7/3 d^3
//   precondition_eigen   Q_G [(Q_G^T X Q_A) / (s s^T + l)] Q_A^T  8 d^3
//   precondition_factored G^-1 X A^-1                     4 d^3
//
// The BLAS-backed ones (blas_gemm, factor_update, precondition_*) take a
// second argument, the threading (server/linalg/thread_policy.h):
//   0 nopool     no compute pool, OpenBLAS at its default thread count: one
//                BLAS call that OpenBLAS threads (what the engine leaves
//                after a lone large decomposition)
//   1 pool       a ComputePool of one thread per core, OpenBLAS pinned to 1
//                (the engine streaming batches): products split into panels
//   2 pool_blasN the pool with OpenBLAS at its default: panels whose BLAS
//                calls queue for OpenBLAS's threads (the overlap case)
// Real time is the figure to read (the work runs on several threads).
#include <benchmark/benchmark.h>

#include "server/blocks/kfac_dense/math/kfac_kernels.h"
#include "server/engine/testing/eigen_inversion_engine.h"
#include "server/linalg/compute_pool.h"
#include "server/linalg/products.h"
#include "server/linalg/thread_policy.h"

namespace natgrad::core {
namespace {

using Matrix = kfac::Matrix<float>;
using Vector = kfac::Vector<float>;
using testing::EigenInversionEngine;

// The pool for the threading in state.range(1) (nullptr for 0), with
// OpenBLAS's thread count set to match.
linalg::ComputePool* Threading(benchmark::State& state) {
  static linalg::ComputePool pool(0);
  const int mode = static_cast<int>(state.range(1));
  linalg::SetBlasThreads(mode == 1 ? 1 : linalg::BlasMaxThreads());
  state.SetLabel(mode == 0 ? "nopool" : mode == 1 ? "pool" : "pool_blasN");
  return mode == 0 ? nullptr : &pool;
}

void SetFlops(benchmark::State& state, double flops) {
  state.counters["flops"] = benchmark::Counter(
      flops, benchmark::Counter::kIsIterationInvariantRate);
}

Matrix Spd(int d) {
  const Matrix x = Matrix::Random(2 * d, d);
  Matrix a = x.transpose() * x / static_cast<float>(2 * d);
  a.diagonal().array() += 1e-3f;
  return a;
}

void BM_Gemm(benchmark::State& state) {
  const int d = state.range(0);
  const Matrix a = Matrix::Random(d, d), b = Matrix::Random(d, d);
  Matrix c(d, d);
  for (auto _ : state) {
    c.noalias() = a * b;
    benchmark::DoNotOptimize(c.data());
  }
  SetFlops(state, 2.0 * d * d * d);
}

void BM_BlasGemm(benchmark::State& state) {
  const int d = state.range(0);
  const Matrix a = Matrix::Random(d, d), b = Matrix::Random(d, d);
  Matrix c(d, d);
  linalg::ComputePool* pool = Threading(state);
  for (auto _ : state) {
    linalg::Gemm<float>(false, false, d, d, d, 1.0f, a.data(), d, b.data(), d,
                        0.0f, c.data(), d, pool);
    benchmark::DoNotOptimize(c.data());
  }
  SetFlops(state, 2.0 * d * d * d);
}

void BM_FactorUpdate(benchmark::State& state) {
  const int d = state.range(0);
  const Matrix x = Matrix::Random(d, d - 1);  // d rows, d_in + bias = d
  Matrix ema = Matrix::Zero(d, d);
  linalg::ComputePool* pool = Threading(state);
  for (auto _ : state) {
    ema = 0.95f * ema + 0.05f * kfac::GramFactor<float>(x, true, float(d), pool);
    benchmark::DoNotOptimize(ema.data());
  }
  SetFlops(state, 1.0 * d * d * d);
}

void BM_Eigh(benchmark::State& state) {
  const int d = state.range(0);
  const Matrix a = Spd(d);
  for (auto _ : state) {
    auto r = EigenInversionEngine::Decompose<float>(
        a, engine::DecompositionKind::kEigh);
    benchmark::DoNotOptimize(r);
  }
  SetFlops(state, 9.0 * d * d * d);
}

void BM_CholeskyInverse(benchmark::State& state) {
  const int d = state.range(0);
  const Matrix a = Spd(d);
  for (auto _ : state) {
    auto r = EigenInversionEngine::Decompose<float>(
        a, engine::DecompositionKind::kCholeskyInverse);
    benchmark::DoNotOptimize(r);
  }
  SetFlops(state, 7.0 / 3.0 * d * d * d);
}

void BM_PreconditionEigen(benchmark::State& state) {
  const int d = state.range(0);
  auto ea = EigenInversionEngine::Decompose<float>(
      Spd(d), engine::DecompositionKind::kEigh);
  const Matrix grad = Matrix::Random(d, d);
  linalg::ComputePool* pool = Threading(state);
  for (auto _ : state) {
    Matrix v = kfac::PreconditionEigen<float>(ea->matrix, ea->eigenvalues,
                                              ea->matrix, ea->eigenvalues,
                                              grad, 1e-3f, pool);
    benchmark::DoNotOptimize(v.data());
  }
  SetFlops(state, 8.0 * d * d * d);
}

void BM_PreconditionFactored(benchmark::State& state) {
  const int d = state.range(0);
  const Matrix inv = Spd(d), grad = Matrix::Random(d, d);
  linalg::ComputePool* pool = Threading(state);
  for (auto _ : state) {
    Matrix v = kfac::PreconditionFactored<float>(inv, inv, grad, pool);
    benchmark::DoNotOptimize(v.data());
  }
  SetFlops(state, 4.0 * d * d * d);
}

#define KFAC_SIZES ->Arg(256)->Arg(1024)->Arg(2048)->Unit(benchmark::kMillisecond)
#define KFAC_SIZES_THREADING                                     \
  ->ArgsProduct({{256, 1024, 2048}, {0, 1, 2}})->UseRealTime()   \
      ->Unit(benchmark::kMillisecond)
BENCHMARK(BM_Gemm) KFAC_SIZES;
BENCHMARK(BM_BlasGemm) KFAC_SIZES_THREADING;
BENCHMARK(BM_FactorUpdate) KFAC_SIZES_THREADING;
BENCHMARK(BM_Eigh) KFAC_SIZES;
BENCHMARK(BM_CholeskyInverse) KFAC_SIZES;
BENCHMARK(BM_PreconditionEigen) KFAC_SIZES_THREADING;
BENCHMARK(BM_PreconditionFactored) KFAC_SIZES_THREADING;

}  // namespace
}  // namespace natgrad::core

BENCHMARK_MAIN();
