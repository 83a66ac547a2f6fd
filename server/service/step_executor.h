// The pool that applies steps, so block math never runs on gRPC's callback
// threads (callbacks must not block; scripts/setup).
//
// It has `threads` worker slots: at most that many tasks compute at once.
// A task that blocks on the inversion engine (core::WaitForEngine, through
// the core::EngineWaitHook each worker thread carries) gives its slot up for
// the wait, so another queued step (another session's: a session has at
// most one step in flight) computes in it meanwhile, on a parked or newly
// started thread. When the engine delivers, the task takes a slot back
// before it computes again, ahead of queued tasks. Threads are started on
// demand, up to kMaxThreadsPerSlot per slot (which bounds the steps in
// flight), and stay parked for reuse.
//
// Slots change hands directly: whoever frees a slot (a step beginning an
// engine wait, a task ending) gives it, under the pool's lock, to the first
// step resuming from the engine, else to a parked thread together with the
// next queued task. A slot is therefore never free while a step could take
// it; what is left between giving it and the receiving thread running is the
// operating system's wake-up of that thread, counted on its own
// (StepExecutorStats::handoff_seconds).
//
// The waiting step keeps its own thread and stack (it does not run other
// steps nested inside its wait), so it holds no lock another step needs that
// it would not hold in a larger pool, it never waits behind a step nested
// above it, and it resumes as soon as its result is ready and a slot frees.
#ifndef NATGRAD_SERVER_SERVICE_STEP_EXECUTOR_H_
#define NATGRAD_SERVER_SERVICE_STEP_EXECUTOR_H_

#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "server/core/engine_wait.h"

namespace natgrad::service {

class ServiceMetrics;

struct StepExecutorOptions {
  // Worker slots; <= 0 means one per hardware thread.
  int threads = 0;
  // false: a task waiting on the engine keeps its slot (the pool before this
  // existed; for benchmarks and tests that compare).
  bool yield_engine_waits = true;
  // Optional: worker time is added to its counters as tasks end.
  ServiceMetrics* metrics = nullptr;
};

// Cumulative worker time (seconds of wall time summed over threads/slots).
struct StepExecutorStats {
  // Threads executing task code, not blocked on the engine.
  double running_seconds = 0;
  // Slot-seconds between a slot being handed to a thread (a parked one with
  // a queued task, or a step resuming from the engine) and that thread
  // running: the scheduler's wake-up latency, which the pool cannot shorten
  // (on loaded cores the woken thread waits for one).
  double handoff_seconds = 0;
  // Slot-seconds in which a slot was left idle because its step was blocked
  // on the engine: for every instant, min(steps blocked on the engine,
  // slots neither running a task nor handed to a thread). Zero means no
  // step's worker idled on the engine while it could have run something;
  // without yielding it is all of the blocked time.
  double engine_wait_seconds = 0;
  // The part of engine_wait_seconds in which steps were queued: they could
  // have used the idle slot (without yielding, or at the thread bound).
  double engine_wait_queued_seconds = 0;
  // Thread-seconds inside engine waits, whether or not the slot was reused.
  double blocked_seconds = 0;
  int64_t tasks = 0;
  int64_t engine_waits = 0;  // waits that blocked (the result was not ready)
  int64_t handoffs = 0;      // slots handed to another thread
  int threads_started = 0;   // slots plus spares started so far
};

class StepExecutor final {
 public:
  // At most this many threads per slot: a bound on steps in flight at once
  // (a session has at most one). With 8, 32 sessions inverting every step
  // on 2 slots left 1.36 slot-s idle with steps queued; 32 halved it
  // (concurrent_sessions_bench). Parked threads cost their stacks' address space.
  static constexpr int kMaxThreadsPerSlot = 32;

  explicit StepExecutor(StepExecutorOptions options);
  explicit StepExecutor(int threads) : StepExecutor(StepExecutorOptions{.threads = threads}) {}
  ~StepExecutor();  // runs what is queued, then joins

  StepExecutor(const StepExecutor&) = delete;
  StepExecutor& operator=(const StepExecutor&) = delete;

  void Submit(std::function<void()> task);
  int threads() const { return slots_; }
  StepExecutorStats stats() const;

 private:
  using Clock = std::chrono::steady_clock;
  // A worker thread's mailbox, on its stack in Run; it is also the thread's
  // core::EngineWaitHook.
  class Worker;

  // From a worker's hook, on that worker's thread, inside a task.
  void BeginEngineWait();
  // `self` is the calling thread's worker: its mailbox receives the slot.
  void EndEngineWait(Worker& self);

  void Run();
  // Gives every free slot away: to resuming steps first (oldest first), then
  // with the queued tasks to parked threads; then starts spare threads for
  // queued tasks that free slots are left for.
  void DispatchLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void HandLocked(Worker& to) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Integrates the time-weighted counters up to now.
  void AdvanceLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // What the counters gain over dt seconds in the current state.
  StepExecutorStats GainLocked(double dt) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Starts spare threads while queued tasks could take free slots but no
  // parked thread is left to take them.
  void StartThreadsLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  int HeldSlotsLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return running_ + handing_ + (yield_ ? 0 : waiting_);
  }
  // Hands the counters accumulated since the last flush to the metrics.
  void FlushMetrics();

  const int slots_;
  const int max_threads_;
  const bool yield_;
  ServiceMetrics* const metrics_;

  mutable absl::Mutex mu_;
  std::deque<std::function<void()>> queue_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  int running_ ABSL_GUARDED_BY(mu_) = 0;  // in a task, not in an engine wait
  int waiting_ ABSL_GUARDED_BY(mu_) = 0;  // in a task, blocked on the engine
  int handing_ ABSL_GUARDED_BY(mu_) = 0;  // handed a slot, not yet awake
  int starting_ ABSL_GUARDED_BY(mu_) = 0;  // started, not yet in Run's loop
  // Steps whose engine result came, waiting for a slot (oldest first).
  std::deque<Worker*> resuming_ ABSL_GUARDED_BY(mu_);
  // Threads in Run without a task (the latest parked is handed work first:
  // its stack is the warmest).
  std::vector<Worker*> parked_ ABSL_GUARDED_BY(mu_);
  std::vector<std::thread> workers_ ABSL_GUARDED_BY(mu_);
  Clock::time_point last_ ABSL_GUARDED_BY(mu_);
  StepExecutorStats stats_ ABSL_GUARDED_BY(mu_);
  // Not yet added to the metrics.
  double unflushed_running_ ABSL_GUARDED_BY(mu_) = 0;
  double unflushed_handoff_ ABSL_GUARDED_BY(mu_) = 0;
  double unflushed_engine_wait_ ABSL_GUARDED_BY(mu_) = 0;
  double unflushed_engine_wait_queued_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace natgrad::service

#endif  // NATGRAD_SERVER_SERVICE_STEP_EXECUTOR_H_
