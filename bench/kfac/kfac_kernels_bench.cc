// K-FAC dense block kernels at d in {256, 1024, 2048}, float32 (the default
// state precision), beside plain d x d GEMMs of the same run: Eigen's
// (single-threaded) and OpenBLAS's through kfac::BlasGemm (the path the
// kernels take for large products; threads as blas_products.h says). Every benchmark reports "flops" (a nominal count per iteration,
// as a rate) so its figure reads as a fraction of the GEMM rate:
//   gemm                 C = A B (Eigen)                  2 d^3
//   blas_gemm            C = A B (kfac::BlasGemm)         2 d^3
//   factor_update        A <- rho A + (1-rho) xbar^T xbar / n, n = d rows
//                        (SYRK, one triangle)             d^3
//   eigh                 Eigen SelfAdjointEigenSolver (the test engine;
//                        the real engine is LAPACK ?syevd) 9 d^3 (nominal)
//   cholesky_inverse     LLT + solve against I            7/3 d^3
//   precondition_eigen   Q_G [(Q_G^T X Q_A) / (s s^T + l)] Q_A^T  8 d^3
//   precondition_factored G^-1 X A^-1                     4 d^3
#include <benchmark/benchmark.h>

#include "server/core/kfac/kfac_kernels.h"
#include "server/core/kfac/testing/eigen_inversion_engine.h"

namespace natgrad::core {
namespace {

using Matrix = kfac::Matrix<float>;
using Vector = kfac::Vector<float>;
using testing::EigenInversionEngine;

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
  for (auto _ : state) {
    kfac::BlasGemm<float>(false, false, d, d, d, 1.0f, a.data(), d, b.data(),
                          d, 0.0f, c.data(), d);
    benchmark::DoNotOptimize(c.data());
  }
  SetFlops(state, 2.0 * d * d * d);
}

void BM_FactorUpdate(benchmark::State& state) {
  const int d = state.range(0);
  const Matrix x = Matrix::Random(d, d - 1);  // d rows, d_in + bias = d
  Matrix ema = Matrix::Zero(d, d);
  for (auto _ : state) {
    ema = 0.95f * ema + 0.05f * kfac::GramFactor<float>(x, true, float(d));
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
  for (auto _ : state) {
    Matrix v = kfac::PreconditionEigen<float>(ea->matrix, ea->eigenvalues,
                                              ea->matrix, ea->eigenvalues,
                                              grad, 1e-3f);
    benchmark::DoNotOptimize(v.data());
  }
  SetFlops(state, 8.0 * d * d * d);
}

void BM_PreconditionFactored(benchmark::State& state) {
  const int d = state.range(0);
  const Matrix inv = Spd(d), grad = Matrix::Random(d, d);
  for (auto _ : state) {
    Matrix v = kfac::PreconditionFactored<float>(inv, inv, grad);
    benchmark::DoNotOptimize(v.data());
  }
  SetFlops(state, 4.0 * d * d * d);
}

#define KFAC_SIZES ->Arg(256)->Arg(1024)->Arg(2048)->Unit(benchmark::kMillisecond)
BENCHMARK(BM_Gemm) KFAC_SIZES;
BENCHMARK(BM_BlasGemm) KFAC_SIZES;
BENCHMARK(BM_FactorUpdate) KFAC_SIZES;
BENCHMARK(BM_Eigh) KFAC_SIZES;
BENCHMARK(BM_CholeskyInverse) KFAC_SIZES;
BENCHMARK(BM_PreconditionEigen) KFAC_SIZES;
BENCHMARK(BM_PreconditionFactored) KFAC_SIZES;

}  // namespace
}  // namespace natgrad::core

BENCHMARK_MAIN();
