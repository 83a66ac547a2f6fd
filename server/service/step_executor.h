// A fixed pool of threads that apply steps, so block math never runs on
// gRPC's callback threads (callbacks must not block; scripts/setup).
#ifndef NATGRAD_SERVER_SERVICE_STEP_EXECUTOR_H_
#define NATGRAD_SERVER_SERVICE_STEP_EXECUTOR_H_

#include <deque>
#include <functional>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"

namespace natgrad::service {

class StepExecutor {
 public:
  // threads <= 0 means one per hardware thread.
  explicit StepExecutor(int threads);
  ~StepExecutor();  // runs what is queued, then joins

  StepExecutor(const StepExecutor&) = delete;
  StepExecutor& operator=(const StepExecutor&) = delete;

  void Submit(std::function<void()> task);
  int threads() const { return static_cast<int>(workers_.size()); }

 private:
  void Run();

  absl::Mutex mu_;
  std::deque<std::function<void()>> queue_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> workers_;
};

}  // namespace natgrad::service

#endif  // NATGRAD_SERVER_SERVICE_STEP_EXECUTOR_H_
