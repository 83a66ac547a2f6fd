// engine_bench: the inversion engine against the obvious alternatives, in one
// run so the ratios are comparable (server/engine/README.md).
//
//   Engine/<kind>/n/batch       BatchingInversionEngine (CPU backend), batch
//                               matrices submitted together, wait for all
//   LapackeSeq/<kind>/n/batch   a plain loop of LAPACKE ?syevd / ?potrf+?potri,
//                               OpenBLAS at its default thread count
//   Eigen/<kind>/n/batch        Eigen SelfAdjointEigenSolver / LLT solve(I),
//                               one after another
//   BlasThreads/<kind>/n/t      one matrix with OpenBLAS at 1 or all threads
//                               (informs threaded_blas_min_n)
//   Sessions/<sessions>         K-FAC-like inverse step: each session submits
//                               its A and G factors (eigh, float32, n=256) at
//                               once and waits; 32 sessions vs 1 alone;
//                               SessionsDirect/N does the same with each
//                               session calling LAPACKE itself (no engine,
//                               OpenBLAS at 1 thread)
//
// float32 throughout (the default dtype). items_per_second = matrices/s;
// GFLOP/s uses nominal counts: eigh 9n³ (Golub & Van Loan, symmetric QR with
// vectors; syevd does fewer, so this is "equivalent" GFLOP/s), Cholesky
// inverse n³ (potrf n³/3 + potri 2n³/3).
//
// Size limits so the full run stays within minutes on 2 cores: Engine and
// LapackeSeq run batch·n³ ≤ 16·1024³ (so n=2048 only at batch 1, n=1024 up to
// batch 16); Eigen, several times slower, runs batch·n³ ≤ 16·512³ (so not at
// n=512 batch 64, n=1024 batch 16/64, nor n=2048 at all). Skipped cases say
// so in the output. The whole run takes about 80 s on 2 cores.
#include <cmath>
#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "Eigen/Cholesky"
#include "Eigen/Core"
#include "Eigen/Eigenvalues"
#include "benchmark/benchmark.h"
#include "server/engine/batching_engine.h"
#include "server/engine/cpu_backend.h"
#include "server/engine/lapack_kernels.h"
#include "server/linalg/cblas_lapacke.h"
#include "server/linalg/thread_policy.h"

namespace natgrad::engine {
namespace {

constexpr double kCapFast = 16.0 * 1024 * 1024 * 1024;  // batch·n³ limit
constexpr double kCapEigen = 16.0 * 512 * 512 * 512;

Eigen::MatrixXf Spd(int n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  Eigen::MatrixXf m(n, n);
  for (int j = 0; j < n; ++j)
    for (int i = 0; i < n; ++i) m(i, j) = normal(rng);
  Eigen::MatrixXf a = m * m.transpose() / static_cast<float>(n);
  a.diagonal().array() += 0.5f;
  return a;
}

std::vector<Eigen::MatrixXf> Inputs(int n, int batch) {
  std::vector<Eigen::MatrixXf> v;
  v.reserve(batch);
  const Eigen::MatrixXf a = Spd(n, n);
  // Distinct matrices would cost more set-up memory for nothing: the solvers
  // do the same work on copies of one matrix.
  for (int i = 0; i < batch; ++i) v.push_back(a);
  return v;
}

double Flops(DecompositionKind kind, int n) {
  const double n3 = static_cast<double>(n) * n * n;
  return kind == DecompositionKind::kEigh ? 9.0 * n3 : n3;
}

void SetCounters(benchmark::State& state, DecompositionKind kind, int n, int batch) {
  const double matrices = static_cast<double>(state.iterations()) * batch;
  state.SetItemsProcessed(static_cast<int64_t>(matrices));
  state.counters["GFLOP/s"] = benchmark::Counter(matrices * Flops(kind, n) * 1e-9,
                                                 benchmark::Counter::kIsRate);
}

bool Skip(benchmark::State& state, int n, int batch, double cap) {
  if (static_cast<double>(batch) * n * n * n <= cap) return false;
  state.SkipWithError("skipped: batch*n^3 over this method's cap (keeps the run short)");
  for (auto _ : state) {
  }
  return true;
}

EngineOptions BenchEngineOptions() {
  EngineOptions o;
  o.batch_window_us = 200;
  o.max_batch = 64;
  return o;
}

void BM_Engine(benchmark::State& state, DecompositionKind kind) {
  const int n = static_cast<int>(state.range(0));
  const int batch = static_cast<int>(state.range(1));
  if (Skip(state, n, batch, kCapFast)) return;
  const EngineOptions options = BenchEngineOptions();
  BatchingInversionEngine engine(std::make_unique<CpuBackend>(), options);
  const std::vector<Eigen::MatrixXf> inputs = Inputs(n, batch);
  std::vector<DecompositionFuture<float>> futures(batch);
  for (auto _ : state) {
    for (int i = 0; i < batch; ++i) futures[i] = engine.Submit(inputs[i], kind);
    for (auto& f : futures) {
      auto r = f.get();
      if (!r.ok()) state.SkipWithError(std::string(r.status().message()).c_str());
      benchmark::DoNotOptimize(r);
    }
  }
  SetCounters(state, kind, n, batch);
  const EngineStats s = engine.stats();
  state.counters["mean_batch"] =
      s.batches > 0 ? static_cast<double>(s.batched_jobs) / s.batches : 0;
}

void BM_LapackeSeq(benchmark::State& state, DecompositionKind kind) {
  const int n = static_cast<int>(state.range(0));
  const int batch = static_cast<int>(state.range(1));
  if (Skip(state, n, batch, kCapFast)) return;
  linalg::SetBlasThreads(linalg::BlasMaxThreads());  // OpenBLAS's default, as a naive user has it
  const std::vector<Eigen::MatrixXf> inputs = Inputs(n, batch);
  Eigen::VectorXf w(n);
  for (auto _ : state) {
    for (int i = 0; i < batch; ++i) {
      Eigen::MatrixXf a = inputs[i];
      int info;
      if (kind == DecompositionKind::kEigh) {
        info = LAPACKE_ssyevd(LAPACK_COL_MAJOR, 'V', 'L', n, a.data(), n, w.data());
      } else {
        info = LAPACKE_spotrf(LAPACK_COL_MAJOR, 'L', n, a.data(), n);
        if (info == 0) info = LAPACKE_spotri(LAPACK_COL_MAJOR, 'L', n, a.data(), n);
      }
      if (info != 0) state.SkipWithError("LAPACK failed");
      benchmark::DoNotOptimize(a.data());
    }
  }
  SetCounters(state, kind, n, batch);
}

void BM_Eigen(benchmark::State& state, DecompositionKind kind) {
  const int n = static_cast<int>(state.range(0));
  const int batch = static_cast<int>(state.range(1));
  if (Skip(state, n, batch, kCapEigen)) return;
  const std::vector<Eigen::MatrixXf> inputs = Inputs(n, batch);
  const Eigen::MatrixXf eye = Eigen::MatrixXf::Identity(n, n);
  for (auto _ : state) {
    for (int i = 0; i < batch; ++i) {
      if (kind == DecompositionKind::kEigh) {
        Eigen::SelfAdjointEigenSolver<Eigen::MatrixXf> es(inputs[i]);
        benchmark::DoNotOptimize(es.eigenvectors().data());
      } else {
        Eigen::MatrixXf inv = inputs[i].llt().solve(eye);
        benchmark::DoNotOptimize(inv.data());
      }
    }
  }
  SetCounters(state, kind, n, batch);
}

void Grid(benchmark::internal::Benchmark* b) {
  for (int n : {64, 256, 512, 1024, 2048}) {
    for (int batch : {1, 16, 64}) b->Args({n, batch});
  }
  b->ArgNames({"n", "batch"})->UseRealTime()->Unit(benchmark::kMillisecond);
}

BENCHMARK_CAPTURE(BM_Engine, eigh, DecompositionKind::kEigh)->Apply(Grid);
BENCHMARK_CAPTURE(BM_LapackeSeq, eigh, DecompositionKind::kEigh)->Apply(Grid);
BENCHMARK_CAPTURE(BM_Eigen, eigh, DecompositionKind::kEigh)->Apply(Grid);
BENCHMARK_CAPTURE(BM_Engine, cholinv, DecompositionKind::kCholeskyInverse)->Apply(Grid);
BENCHMARK_CAPTURE(BM_LapackeSeq, cholinv, DecompositionKind::kCholeskyInverse)->Apply(Grid);
BENCHMARK_CAPTURE(BM_Eigen, cholinv, DecompositionKind::kCholeskyInverse)->Apply(Grid);

void BM_BlasThreads(benchmark::State& state, DecompositionKind kind) {
  const int n = static_cast<int>(state.range(0));
  const int threads = state.range(1) == 0 ? linalg::BlasMaxThreads() : 1;
  linalg::SetBlasThreads(threads);
  const Eigen::MatrixXf input = Spd(n, 1);
  Eigen::VectorXf w(n);
  for (auto _ : state) {
    Eigen::MatrixXf a = input;
    if (kind == DecompositionKind::kEigh) {
      LAPACKE_ssyevd(LAPACK_COL_MAJOR, 'V', 'L', n, a.data(), n, w.data());
    } else {
      LAPACKE_spotrf(LAPACK_COL_MAJOR, 'L', n, a.data(), n);
      LAPACKE_spotri(LAPACK_COL_MAJOR, 'L', n, a.data(), n);
    }
    benchmark::DoNotOptimize(a.data());
  }
  state.counters["blas_threads"] = threads;
  SetCounters(state, kind, n, 1);
}
// second arg: 0 = all cores, 1 = one thread
BENCHMARK_CAPTURE(BM_BlasThreads, eigh, DecompositionKind::kEigh)
    ->ArgsProduct({{128, 256, 512, 1024, 2048}, {1, 0}})
    ->ArgNames({"n", "all_threads0"})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_BlasThreads, cholinv, DecompositionKind::kCholeskyInverse)
    ->ArgsProduct({{128, 256, 512, 1024, 2048}, {1, 0}})
    ->ArgNames({"n", "all_threads0"})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);

constexpr int kSessionN = 256;

// Each session: submit A and G, wait for both (what a K-FAC block does at its
// inverse step). Sessions run on their own threads and start together.
void BM_Sessions(benchmark::State& state) {
  const int sessions = static_cast<int>(state.range(0));
  BatchingInversionEngine engine(std::make_unique<CpuBackend>(), BenchEngineOptions());
  const Eigen::MatrixXf a = Spd(kSessionN, 1);
  const Eigen::MatrixXf g = Spd(kSessionN, 2);
  double latency_sum = 0;
  for (auto _ : state) {
    std::vector<double> latency(sessions);
    std::vector<std::thread> threads;
    threads.reserve(sessions);
    for (int s = 0; s < sessions; ++s) {
      threads.emplace_back([&, s] {
        const auto t0 = std::chrono::steady_clock::now();
        auto fa = engine.Submit(a, DecompositionKind::kEigh);
        auto fg = engine.Submit(g, DecompositionKind::kEigh);
        auto ra = fa.get();
        auto rg = fg.get();
        benchmark::DoNotOptimize(ra);
        benchmark::DoNotOptimize(rg);
        latency[s] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      });
    }
    for (auto& t : threads) t.join();
    for (double l : latency) latency_sum += l;
  }
  SetCounters(state, DecompositionKind::kEigh, kSessionN, 2 * sessions);
  state.counters["session_latency_ms"] =
      1e3 * latency_sum / (static_cast<double>(state.iterations()) * sessions);
  const EngineStats s = engine.stats();
  state.counters["mean_batch"] =
      s.batches > 0 ? static_cast<double>(s.batched_jobs) / s.batches : 0;
}
BENCHMARK(BM_Sessions)->Arg(1)->Arg(32)->ArgName("sessions")->UseRealTime()->Unit(
    benchmark::kMillisecond);

// The same sessions without the engine: each thread calls LAPACKE itself.
// OpenBLAS at 1 thread: at its threaded default, 32 concurrent callers took
// over two minutes for one iteration here (its workers spin and contend), so
// that variant is not run.
void BM_SessionsDirect(benchmark::State& state) {
  const int sessions = static_cast<int>(state.range(0));
  linalg::SetBlasThreads(1);
  const Eigen::MatrixXf a = Spd(kSessionN, 1);
  const Eigen::MatrixXf g = Spd(kSessionN, 2);
  double latency_sum = 0;
  for (auto _ : state) {
    std::vector<double> latency(sessions);
    std::vector<std::thread> threads;
    for (int s = 0; s < sessions; ++s) {
      threads.emplace_back([&, s] {
        const auto t0 = std::chrono::steady_clock::now();
        Eigen::VectorXf w(kSessionN);
        for (const Eigen::MatrixXf* m : {&a, &g}) {
          Eigen::MatrixXf x = *m;
          LAPACKE_ssyevd(LAPACK_COL_MAJOR, 'V', 'L', kSessionN, x.data(), kSessionN, w.data());
          benchmark::DoNotOptimize(x.data());
        }
        latency[s] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      });
    }
    for (auto& t : threads) t.join();
    for (double l : latency) latency_sum += l;
  }
  SetCounters(state, DecompositionKind::kEigh, kSessionN, 2 * sessions);
  state.counters["session_latency_ms"] =
      1e3 * latency_sum / (static_cast<double>(state.iterations()) * sessions);
}
BENCHMARK(BM_SessionsDirect)->Arg(1)->Arg(32)->ArgName("sessions")->UseRealTime()->Unit(
    benchmark::kMillisecond);

}  // namespace
}  // namespace natgrad::engine

BENCHMARK_MAIN();
