#include "server/linalg/compute_pool.h"

#include <algorithm>
#include <atomic>

namespace natgrad::linalg {

struct ComputePool::Job {
  Job(size_t n, absl::FunctionRef<void(size_t)> fn) : n(n), fn(fn) {}
  const size_t n;
  const absl::FunctionRef<void(size_t)> fn;
  std::atomic<size_t> next{0};
  int helpers = 0;  // workers inside RunShare for this job (under mu_)
  std::condition_variable helpers_done;
};

ComputePool::ComputePool(int parallelism) {
  if (parallelism <= 0) {
    parallelism = std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
  }
  workers_.reserve(parallelism - 1);
  for (int i = 1; i < parallelism; ++i) workers_.emplace_back([this] { WorkerLoop(); });
}

ComputePool::~ComputePool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  work_cv_.notify_all();
  for (std::thread& t : workers_) t.join();
}

void ComputePool::RunShare(Job& job) {
  for (size_t i; (i = job.next.fetch_add(1, std::memory_order_relaxed)) < job.n;) job.fn(i);
}

void ComputePool::WorkerLoop() {
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    work_cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
    if (stop_) return;
    Job* job = queue_.front();
    ++job->helpers;
    lock.unlock();
    RunShare(*job);
    lock.lock();
    // Every index is handed out: no one else should pick this job up. (Its
    // caller may have removed it already.)
    auto it = std::find(queue_.begin(), queue_.end(), job);
    if (it != queue_.end()) queue_.erase(it);
    // Notified under mu_, so the caller cannot destroy the job before this
    // worker is done with it.
    if (--job->helpers == 0) job->helpers_done.notify_one();
  }
}

void ComputePool::ParallelFor(size_t n, absl::FunctionRef<void(size_t)> fn) {
  if (workers_.empty() || n <= 1) {
    for (size_t i = 0; i < n; ++i) fn(i);
    return;
  }
  Job job(n, fn);
  {
    std::lock_guard<std::mutex> lock(mu_);
    queue_.push_back(&job);
  }
  // The caller takes one share; wake at most one worker per other index.
  if (n - 1 >= workers_.size()) {
    work_cv_.notify_all();
  } else {
    for (size_t i = 0; i + 1 < n; ++i) work_cv_.notify_one();
  }
  RunShare(job);
  std::unique_lock<std::mutex> lock(mu_);
  // After this no worker can join; wait for those inside RunShare.
  auto it = std::find(queue_.begin(), queue_.end(), &job);
  if (it != queue_.end()) queue_.erase(it);
  job.helpers_done.wait(lock, [&] { return job.helpers == 0; });
}

}  // namespace natgrad::linalg
