#include "server/service/step_executor.h"

#include <algorithm>
#include <utility>

#include "server/service/service_metrics.h"

namespace natgrad::service {

class StepExecutor::Worker final : public core::EngineWaitHook {
 public:
  explicit Worker(StepExecutor* executor) : executor_(executor) {}

  void BeginEngineWait() override { executor_->BeginEngineWait(); }
  void EndEngineWait() override { executor_->EndEngineWait(*this); }

  StepExecutor* const executor_;
  // Written under the pool's lock by HandLocked and DispatchLocked: a slot
  // was handed to this thread (parked or resuming), with `task` when it was
  // parked.
  bool handed = false;
  std::function<void()> task;
};

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
  AdvanceLocked();
  queue_.push_back(std::move(task));
  DispatchLocked();
}

StepExecutorStats StepExecutor::GainLocked(double dt) const {
  StepExecutorStats g;
  if (dt <= 0) return g;
  g.running_seconds = running_ * dt;
  g.handoff_seconds = handing_ * dt;
  g.engine_wait_seconds = std::clamp(slots_ - running_ - handing_, 0, waiting_) * dt;
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
  s.handoff_seconds += g.handoff_seconds;
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
  stats_.handoff_seconds += g.handoff_seconds;
  stats_.engine_wait_seconds += g.engine_wait_seconds;
  stats_.engine_wait_queued_seconds += g.engine_wait_queued_seconds;
  stats_.blocked_seconds += g.blocked_seconds;
  unflushed_running_ += g.running_seconds;
  unflushed_handoff_ += g.handoff_seconds;
  unflushed_engine_wait_ += g.engine_wait_seconds - g.engine_wait_queued_seconds;
  unflushed_engine_wait_queued_ += g.engine_wait_queued_seconds;
}

void StepExecutor::HandLocked(Worker& to) {
  to.handed = true;
  ++handing_;
  ++stats_.handoffs;
}

void StepExecutor::DispatchLocked() {
  while (HeldSlotsLocked() < slots_) {
    if (!resuming_.empty()) {
      Worker* w = resuming_.front();
      resuming_.pop_front();
      HandLocked(*w);
    } else if (!queue_.empty() && !parked_.empty()) {
      Worker* w = parked_.back();
      parked_.pop_back();
      w->task = std::move(queue_.front());
      queue_.pop_front();
      ++stats_.tasks;
      HandLocked(*w);
    } else {
      break;
    }
  }
  StartThreadsLocked();
}

void StepExecutor::StartThreadsLocked() {
  if (stopping_ && queue_.empty()) return;
  // Dispatch gave every free slot it could away: slots still free with tasks
  // queued have no parked thread to take them.
  const int startable = std::min(static_cast<int>(queue_.size()),
                                 std::max(0, slots_ - HeldSlotsLocked()));
  while (starting_ < startable && static_cast<int>(workers_.size()) < max_threads_) {
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
  // Yielding, the slot is free now and goes at once to a resuming step or a
  // queued task (without yielding the wait holds it: nothing is free).
  DispatchLocked();
}

void StepExecutor::EndEngineWait(Worker& self) {
  absl::MutexLock lock(&mu_);
  AdvanceLocked();
  --waiting_;
  // Yielding, the step takes a slot back before computing again, ahead of
  // queued tasks: never more than slots_ tasks compute at once, and a step in
  // flight finishes before a new one starts. A free slot is taken at once
  // (nobody resumes ahead: they would hold it), else the next freed slot is
  // handed over, oldest resumer first.
  if (yield_ && HeldSlotsLocked() >= slots_) {
    self.handed = false;
    resuming_.push_back(&self);
    mu_.Await(absl::Condition(&self.handed));
    self.handed = false;
    AdvanceLocked();
    --handing_;
  }
  ++running_;
}

void StepExecutor::FlushMetrics() {
  double running, handoff, idle, idle_queued;
  {
    absl::MutexLock lock(&mu_);
    running = std::exchange(unflushed_running_, 0);
    handoff = std::exchange(unflushed_handoff_, 0);
    idle = std::exchange(unflushed_engine_wait_, 0);
    idle_queued = std::exchange(unflushed_engine_wait_queued_, 0);
  }
  metrics_->WorkerTime(running, handoff, idle, idle_queued);
}

void StepExecutor::Run() {
  Worker self(this);
  // Block math on this thread announces its engine waits to this pool.
  core::ScopedEngineWaitHook hook(&self);
  mu_.Lock();
  --starting_;
  for (;;) {
    std::function<void()> task;
    if (!queue_.empty() && resuming_.empty() && HeldSlotsLocked() < slots_) {
      // A slot is free for this thread itself (it just ended a task, or is
      // new): no handoff needed.
      AdvanceLocked();
      task = std::move(queue_.front());
      queue_.pop_front();
      ++stats_.tasks;
    } else if (stopping_ && queue_.empty()) {
      break;
    } else {
      parked_.push_back(&self);
      mu_.Await(absl::Condition(
          +[](Worker* w) ABSL_EXCLUSIVE_LOCKS_REQUIRED(w->executor_->mu_) {
            return w->handed || (w->executor_->stopping_ && w->executor_->queue_.empty());
          },
          &self));
      if (!self.handed) {  // stopping and drained
        parked_.erase(std::find(parked_.begin(), parked_.end(), &self));
        break;
      }
      self.handed = false;
      AdvanceLocked();
      --handing_;
      task = std::move(self.task);
      self.task = nullptr;
    }
    ++running_;
    mu_.Unlock();
    task();
    task = nullptr;  // its captures go outside the lock
    mu_.Lock();
    AdvanceLocked();
    --running_;
    // The freed slot goes to the oldest step resuming from the engine, if
    // any; else this thread takes the next queued task itself.
    if (!resuming_.empty()) DispatchLocked();
    if (metrics_ != nullptr) {
      mu_.Unlock();
      FlushMetrics();
      mu_.Lock();
    }
  }
  mu_.Unlock();
}

}  // namespace natgrad::service
