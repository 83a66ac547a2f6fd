#include "server/engine/cpu_backend.h"

#include <algorithm>
#include <exception>
#include <new>
#include <utility>

#include "server/linalg/thread_policy.h"

namespace natgrad::engine {
namespace {

template <typename Scalar>
void RunOne(DecompositionKind kind, BatchJob<Scalar>& job) {
  try {
    job.result = DecomposeLapack<Scalar>(std::move(job.matrix), kind);
  } catch (const std::bad_alloc&) {
    job.result = absl::ResourceExhaustedError("out of memory in the CPU backend");
  } catch (const std::exception& e) {
    job.result = absl::InternalError(e.what());
  }
}

}  // namespace

CpuBackend::CpuBackend(CpuBackendOptions options)
    : pool_(options.threads),  // <= 0: one per core
      threaded_blas_min_n_(options.threaded_blas_min_n) {}

CpuBackend::~CpuBackend() = default;

template <typename Scalar>
void CpuBackend::RunImpl(DecompositionKind kind, absl::Span<BatchJob<Scalar>> jobs) {
  if (jobs.empty()) return;
  std::lock_guard<std::mutex> run_lock(run_mu_);
  const int64_t n = jobs.front().matrix.rows();
  const auto now = std::chrono::steady_clock::now();
  // Too few matrices to fill the cores: let OpenBLAS split each one, unless
  // a pool-parallel batch ended moments ago (a stream of batches, this one
  // its straggler or first part). After a threaded call OpenBLAS's pthread
  // workers spin on sched_yield for 2^28 cycles (~0.1 s, OPENBLAS_THREAD_TIMEOUT
  // is read only at load) and would steal a core from the next pool-parallel
  // batch: measured 56 vs 87 matrices/s at n=1024, batch 16.
  const int threads = pool_.parallelism();
  const bool streaming = threads > 1 && now - last_parallel_end_ < kStreamingWindow;
  if (static_cast<int64_t>(jobs.size()) < threads && n >= threaded_blas_min_n_ &&
      !streaming) {
    linalg::SetBlasThreads(threads);
    for (BatchJob<Scalar>& job : jobs) RunOne(kind, job);
    // Back to one thread at once: outside these calls OpenBLAS is meant to
    // run single-threaded, the block math's compute pool providing the
    // parallelism (server/linalg/thread_policy.h). Left at `threads`, the
    // pool's panel calls would queue for OpenBLAS's threads (measured 2x
    // slower for a d=1024 factor update).
    linalg::SetBlasThreads(1);
    return;
  }
  // One matrix per thread; OpenBLAS must not fork inside each call, or the
  // calls contend for its single thread pool.
  linalg::SetBlasThreads(1);
  pool_.ParallelFor(jobs.size(), [&](size_t i) { RunOne(kind, jobs[i]); });
  if (jobs.size() > 1) last_parallel_end_ = std::chrono::steady_clock::now();
}

void CpuBackend::Run(DecompositionKind kind, absl::Span<BatchJob<float>> jobs) {
  RunImpl<float>(kind, jobs);
}
void CpuBackend::Run(DecompositionKind kind, absl::Span<BatchJob<double>> jobs) {
  RunImpl<double>(kind, jobs);
}

}  // namespace natgrad::engine
