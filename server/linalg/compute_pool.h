// A fixed set of threads for the data-parallel parts of the block math
// (product panels, the Gaussian block's copies). Created once, by the server
// at start-up or by a test or bench, and passed down (core::StepContext::
// compute_pool); see thread_policy.h for how it relates to OpenBLAS's threads.
#ifndef NATGRAD_SERVER_LINALG_COMPUTE_POOL_H_
#define NATGRAD_SERVER_LINALG_COMPUTE_POOL_H_

#include <condition_variable>
#include <cstddef>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/functional/function_ref.h"

namespace natgrad::linalg {

class ComputePool {
 public:
  // `parallelism` threads take part in each ParallelFor: the caller and
  // parallelism - 1 workers started here (the only threads this class ever
  // starts). <= 0: one per hardware thread.
  explicit ComputePool(int parallelism = 0);
  // Joins the workers. No ParallelFor may be in progress.
  ~ComputePool();
  ComputePool(const ComputePool&) = delete;
  ComputePool& operator=(const ComputePool&) = delete;

  int parallelism() const { return static_cast<int>(workers_.size()) + 1; }

  // Calls fn(i) exactly once for every i in [0, n) and returns when all calls
  // have returned. The caller runs indices itself; idle workers join in.
  // Indices are handed out in increasing order (one shared counter), so a
  // caller may skip indices past a failure it has seen. Safe to call from
  // several threads at once (each call is its own job; workers serve jobs in
  // the order they arrived) and from inside fn (the nested call can always
  // finish on its own caller, so it cannot deadlock). fn must not throw.
  void ParallelFor(size_t n, absl::FunctionRef<void(size_t)> fn);

 private:
  struct Job;
  void WorkerLoop();
  static void RunShare(Job& job);

  std::mutex mu_;
  std::condition_variable work_cv_;
  std::vector<Job*> queue_;  // jobs with indices possibly left, oldest first
  bool stop_ = false;
  std::vector<std::thread> workers_;
};

// The parallelism a null-or-not pool offers: 1 for nullptr.
inline int Parallelism(const ComputePool* pool) {
  return pool == nullptr ? 1 : pool->parallelism();
}

}  // namespace natgrad::linalg

#endif  // NATGRAD_SERVER_LINALG_COMPUTE_POOL_H_
