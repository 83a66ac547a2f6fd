#include "server/engine/cpu_backend.h"

#include <algorithm>
#include <exception>
#include <new>
#include <utility>

#include "server/linalg/thread_policy.h"

namespace natgrad::engine {
namespace {

int ResolveThreads(int requested) {
  if (requested > 0) return requested;
  const unsigned hw = std::thread::hardware_concurrency();
  return hw > 0 ? static_cast<int>(hw) : 1;
}

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
    : threads_(ResolveThreads(options.threads)),
      threaded_blas_min_n_(options.threaded_blas_min_n) {
  // The caller of Run is the pool's first thread.
  workers_.reserve(threads_ - 1);
  for (int i = 1; i < threads_; ++i) workers_.emplace_back([this] { WorkerLoop(); });
}

CpuBackend::~CpuBackend() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  work_cv_.notify_all();
  for (std::thread& t : workers_) t.join();
}

void CpuBackend::WorkerLoop() {
  uint64_t seen = 0;
  while (true) {
    const std::function<void(size_t)>* task;
    size_t count;
    {
      std::unique_lock<std::mutex> lock(mu_);
      work_cv_.wait(lock, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
      task = task_;
      count = count_;
    }
    for (size_t i; (i = next_.fetch_add(1)) < count;) (*task)(i);
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (--active_ == 0) done_cv_.notify_all();
    }
  }
}

void CpuBackend::ParallelFor(size_t count, const std::function<void(size_t)>& fn) {
  if (workers_.empty() || count <= 1) {
    for (size_t i = 0; i < count; ++i) fn(i);
    return;
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    task_ = &fn;
    count_ = count;
    next_.store(0);
    active_ = static_cast<int>(workers_.size());
    ++generation_;
  }
  work_cv_.notify_all();
  for (size_t i; (i = next_.fetch_add(1)) < count;) fn(i);
  std::unique_lock<std::mutex> lock(mu_);
  done_cv_.wait(lock, [&] { return active_ == 0; });
  task_ = nullptr;
}

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
  const bool streaming = threads_ > 1 && now - last_parallel_end_ < kStreamingWindow;
  if (static_cast<int64_t>(jobs.size()) < threads_ && n >= threaded_blas_min_n_ &&
      !streaming) {
    linalg::SetBlasThreads(threads_);
    for (BatchJob<Scalar>& job : jobs) RunOne(kind, job);
    return;
  }
  // One matrix per thread; OpenBLAS must not fork inside each call, or the
  // calls contend for its single thread pool.
  linalg::SetBlasThreads(1);
  ParallelFor(jobs.size(), [&](size_t i) { RunOne(kind, jobs[i]); });
  if (jobs.size() > 1) last_parallel_end_ = std::chrono::steady_clock::now();
}

void CpuBackend::Run(DecompositionKind kind, absl::Span<BatchJob<float>> jobs) {
  RunImpl<float>(kind, jobs);
}
void CpuBackend::Run(DecompositionKind kind, absl::Span<BatchJob<double>> jobs) {
  RunImpl<double>(kind, jobs);
}

}  // namespace natgrad::engine
