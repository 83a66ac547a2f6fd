#include "server/service/step_executor.h"

#include <algorithm>
#include <utility>

#include "server/service/service_metrics.h"

namespace natgrad::service {

StepExecutor::StepExecutor(StepExecutorOptions options)
    : slots_(options.threads > 0 ? options.threads
                                 : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()))),
      max_threads_(options.yield_engine_waits ? slots_ * kMaxThreadsPerSlot : slots_),
      yield_(options.yield_engine_waits),
      metrics_(options.metrics) {
  absl::MutexLock lock(&mu_);
  last_ = Clock::now();
  for (int i = 0; i < slots_; ++i) {
    ++starting_;
    workers_.emplace_back([this] { Run(); });
  }
  stats_.threads_started = slots_;
}

StepExecutor::~StepExecutor() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  // A task still draining may start a spare thread (it appends to workers_),
  // so join by index until every started thread is joined.
  for (size_t i = 0;; ++i) {
    std::thread t;
    {
      absl::MutexLock lock(&mu_);
      if (i >= workers_.size()) break;
      t = std::move(workers_[i]);
    }
    t.join();
  }
}

void StepExecutor::Submit(std::function<void()> task) {
  absl::MutexLock lock(&mu_);
  queue_.push_back(std::move(task));
  StartThreadsLocked();
}

StepExecutorStats StepExecutor::GainLocked(double dt) const {
  StepExecutorStats g;
  if (dt <= 0) return g;
  g.running_seconds = running_ * dt;
  g.engine_wait_seconds = std::clamp(slots_ - running_, 0, waiting_) * dt;
  g.blocked_seconds = waiting_ * dt;
  if (!queue_.empty()) g.engine_wait_queued_seconds = g.engine_wait_seconds;
  return g;
}

StepExecutorStats StepExecutor::stats() const {
  absl::MutexLock lock(&mu_);
  StepExecutorStats s = stats_;
  const StepExecutorStats g =
      GainLocked(std::chrono::duration<double>(Clock::now() - last_).count());
  s.running_seconds += g.running_seconds;
  s.engine_wait_seconds += g.engine_wait_seconds;
  s.engine_wait_queued_seconds += g.engine_wait_queued_seconds;
  s.blocked_seconds += g.blocked_seconds;
  return s;
}

void StepExecutor::AdvanceLocked() {
  const Clock::time_point now = Clock::now();
  const StepExecutorStats g = GainLocked(std::chrono::duration<double>(now - last_).count());
  last_ = now;
  stats_.running_seconds += g.running_seconds;
  stats_.engine_wait_seconds += g.engine_wait_seconds;
  stats_.engine_wait_queued_seconds += g.engine_wait_queued_seconds;
  stats_.blocked_seconds += g.blocked_seconds;
  unflushed_running_ += g.running_seconds;
  unflushed_engine_wait_ += g.engine_wait_seconds - g.engine_wait_queued_seconds;
  unflushed_engine_wait_queued_ += g.engine_wait_queued_seconds;
}

void StepExecutor::StartThreadsLocked() {
  if (stopping_ && queue_.empty()) return;
  const int startable = std::min(static_cast<int>(queue_.size()),
                                 std::max(0, slots_ - HeldSlotsLocked() - resuming_));
  while (parked_ + starting_ < startable && static_cast<int>(workers_.size()) < max_threads_) {
    ++starting_;
    ++stats_.threads_started;
    workers_.emplace_back([this] { Run(); });
  }
}

void StepExecutor::BeginEngineWait() {
  absl::MutexLock lock(&mu_);
  AdvanceLocked();
  --running_;
  ++waiting_;
  ++stats_.engine_waits;
  // The slot is free now: a parked thread takes the next queued step when
  // the lock is released (its Await condition holds), or a spare starts.
  if (yield_) StartThreadsLocked();
}

void StepExecutor::EndEngineWait() {
  absl::MutexLock lock(&mu_);
  AdvanceLocked();
  --waiting_;
  if (yield_) {
    // Back into a slot before computing again, ahead of queued tasks (they
    // wait while resuming_ > 0): never more than slots_ tasks compute at
    // once, and a step in flight finishes before a new one starts.
    ++resuming_;
    mu_.Await(absl::Condition(
        +[](StepExecutor* e) ABSL_EXCLUSIVE_LOCKS_REQUIRED(e->mu_) {
          return e->running_ < e->slots_;
        },
        this));
    --resuming_;
    AdvanceLocked();
  }
  ++running_;
}

void StepExecutor::FlushMetrics() {
  double running, idle, idle_queued;
  {
    absl::MutexLock lock(&mu_);
    running = std::exchange(unflushed_running_, 0);
    idle = std::exchange(unflushed_engine_wait_, 0);
    idle_queued = std::exchange(unflushed_engine_wait_queued_, 0);
  }
  metrics_->WorkerTime(running, idle, idle_queued);
}

void StepExecutor::Run() {
  // Block math on this thread announces its engine waits to this pool.
  core::ScopedEngineWaitHook hook(this);
  mu_.Lock();
  --starting_;
  for (;;) {
    ++parked_;
    mu_.Await(absl::Condition(
        +[](StepExecutor* e) ABSL_EXCLUSIVE_LOCKS_REQUIRED(e->mu_) {
          return (e->stopping_ && e->queue_.empty()) ||
                 (!e->queue_.empty() && e->resuming_ == 0 &&
                  e->HeldSlotsLocked() < e->slots_);
        },
        this));
    --parked_;
    if (queue_.empty()) break;  // stopping and drained
    std::function<void()> task = std::move(queue_.front());
    queue_.pop_front();
    AdvanceLocked();
    ++running_;
    ++stats_.tasks;
    mu_.Unlock();
    task();
    task = nullptr;  // its captures go outside the lock
    mu_.Lock();
    AdvanceLocked();
    --running_;
    if (metrics_ != nullptr) {
      mu_.Unlock();
      FlushMetrics();
      mu_.Lock();
    }
  }
  mu_.Unlock();
}

}  // namespace natgrad::service
