// The StepExecutor's engine waits (server/service/step_executor.h): a task
// blocked in core::WaitForEngine gives its worker slot to queued tasks, up to
// kMaxThreadsPerSlot threads per slot; without yielding it keeps the slot.
#include "server/service/step_executor.h"

#include <atomic>
#include <chrono>
#include <future>
#include <memory>
#include <vector>

#include "Eigen/Core"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "gtest/gtest.h"
#include "server/core/engine_wait.h"
#include "server/engine/engine_factory.h"

namespace natgrad::service {
namespace {

// A deadlock would hang the test; this bounds it so the failure says which
// wait never finished (it is not a timing assertion: a pass takes ms).
constexpr absl::Duration kDeadlockGuard = absl::Seconds(60);

// An engine-like result the test releases, which counts the waits that
// really blocked on it (wait() runs only after the hook was told).
struct Gate {
  std::promise<void> promise;
  std::shared_future<void> future = promise.get_future().share();
  absl::Mutex mu;
  int blocked ABSL_GUARDED_BY(mu) = 0;
  std::atomic<bool> open{false};

  void Open() {
    open = true;
    promise.set_value();
  }
  // Returns false on the deadlock guard.
  bool AwaitBlocked(int n) {
    absl::MutexLock lock(&mu);
    want = n;
    return mu.AwaitWithTimeout(absl::Condition(this, &Gate::Reached), kDeadlockGuard);
  }

 private:
  int want ABSL_GUARDED_BY(mu) = 0;
  bool Reached() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) { return blocked >= want; }
};

struct GateFuture {
  Gate* gate;
  std::future_status wait_for(std::chrono::seconds d) const { return gate->future.wait_for(d); }
  void wait() const {
    {
      absl::MutexLock lock(&gate->mu);
      ++gate->blocked;
    }
    gate->future.wait();
  }
};

TEST(StepExecutor, TaskWaitingOnTheEngineYieldsItsOnlySlot) {
  // The first task waits for a result only the second task produces: with
  // one slot this finishes only if the waiting task gives its slot up.
  StepExecutor executor(StepExecutorOptions{.threads = 1});
  std::promise<int> produced;
  std::shared_future<int> result = produced.get_future().share();
  absl::Notification first_done, second_done;
  std::atomic<bool> saw_hook{false};
  executor.Submit([&] {
    saw_hook = core::CurrentEngineWaitHook() != nullptr;
    core::WaitForEngine(result);
    EXPECT_EQ(result.get(), 42);
    first_done.Notify();
  });
  executor.Submit([&] {
    produced.set_value(42);
    second_done.Notify();
  });
  const bool ok = first_done.WaitForNotificationWithTimeout(kDeadlockGuard);
  if (!ok && !second_done.HasBeenNotified()) produced.set_value(0);  // unstick teardown
  ASSERT_TRUE(ok) << "the waiting task kept the only slot: the second task never ran";
  ASSERT_TRUE(second_done.WaitForNotificationWithTimeout(kDeadlockGuard));
  EXPECT_TRUE(saw_hook);
  const StepExecutorStats s = executor.stats();
  EXPECT_EQ(s.tasks, 2);
  EXPECT_EQ(s.engine_waits, 1);      // the first task had to block
  EXPECT_EQ(s.threads_started, 2);   // the slot's thread and one spare
  EXPECT_GT(s.running_seconds, 0);
  EXPECT_LE(s.engine_wait_seconds, s.blocked_seconds);
}

TEST(StepExecutor, StepsInFlightAreBoundedPerSlot) {
  // One slot: kMaxThreadsPerSlot tasks can be blocked on the engine at once;
  // the next one starts only when one of them has finished.
  constexpr int kBound = StepExecutor::kMaxThreadsPerSlot;
  Gate gate;
  std::atomic<int> done{0};
  std::atomic<bool> last_started_before_open{false};
  {
    StepExecutor executor(StepExecutorOptions{.threads = 1});
    for (int i = 0; i < kBound + 1; ++i) {
      executor.Submit([&, i] {
        if (i == kBound && !gate.open) last_started_before_open = true;
        core::WaitForEngine(GateFuture{&gate});
        ++done;
      });
    }
    const bool blocked = gate.AwaitBlocked(kBound);
    EXPECT_TRUE(blocked) << "fewer than " << kBound << " tasks got to wait at once";
    const StepExecutorStats before = executor.stats();
    EXPECT_EQ(before.threads_started, kBound);
    EXPECT_EQ(before.engine_waits, kBound);
    EXPECT_EQ(before.tasks, kBound);  // the last one is still queued
    gate.Open();
  }  // the destructor runs the queued task and joins
  EXPECT_EQ(done, kBound + 1);
  EXPECT_FALSE(last_started_before_open) << "a task beyond the bound started";
}

TEST(StepExecutor, AResumedTaskWaitsForAFreeSlot) {
  // One slot: the first task's result arrives while the second task holds
  // the slot (blocked outside the engine, so it keeps it); the first may
  // compute again only once the second has finished.
  Gate gate;
  std::promise<void> release_second;
  std::shared_future<void> second_may_end = release_second.get_future().share();
  absl::Notification second_started;
  std::atomic<bool> first_resumed{false};
  std::atomic<bool> first_resumed_while_second_ran{false};
  {
    StepExecutor executor(StepExecutorOptions{.threads = 1});
    executor.Submit([&] {
      core::WaitForEngine(GateFuture{&gate});
      first_resumed = true;
    });
    executor.Submit([&] {
      second_started.Notify();
      second_may_end.wait();  // not an engine wait: the slot stays taken
      first_resumed_while_second_ran = first_resumed.load();
    });
    EXPECT_TRUE(second_started.WaitForNotificationWithTimeout(kDeadlockGuard));
    gate.Open();
    release_second.set_value();
  }
  EXPECT_TRUE(first_resumed);
  EXPECT_FALSE(first_resumed_while_second_ran) << "two tasks computed in one slot";
}

TEST(StepExecutor, AWaitingStepsSlotIsHandedOnAtOnce) {
  // One slot, two rounds of: a task blocks on the engine while a second is
  // queued, and the second releases it. The first round starts the spare
  // thread; in the second both threads exist, so the waiting task's slot
  // goes to the queued one inside BeginEngineWait, under the pool's lock:
  // not one instant passes with the slot free and a step queued. (Before
  // slots were handed over, the queued task waited for a parked thread to
  // wake and find it, and that time counted here.)
  StepExecutor executor(StepExecutorOptions{.threads = 1});
  StepExecutorStats before;
  for (int round = 0; round < 2; ++round) {
    if (round == 1) before = executor.stats();
    Gate gate;
    absl::Notification first_done, second_done;
    executor.Submit([&] {
      core::WaitForEngine(GateFuture{&gate});
      first_done.Notify();
    });
    executor.Submit([&] {
      gate.Open();
      second_done.Notify();
    });
    ASSERT_TRUE(first_done.WaitForNotificationWithTimeout(kDeadlockGuard));
    ASSERT_TRUE(second_done.WaitForNotificationWithTimeout(kDeadlockGuard));
  }
  const StepExecutorStats after = executor.stats();
  EXPECT_EQ(after.threads_started, 2);
  EXPECT_EQ(after.tasks - before.tasks, 2);
  EXPECT_EQ(after.engine_waits - before.engine_waits, 1) << "the first task did not block";
  // The second task was handed to the parked thread, and the first task's
  // resumption was handed the slot the second freed (unless its result was
  // there before the second ended: then it found the slot free itself).
  EXPECT_GE(after.handoffs - before.handoffs, 1);
  EXPECT_EQ(after.engine_wait_queued_seconds, before.engine_wait_queued_seconds);
  EXPECT_GE(after.handoff_seconds, before.handoff_seconds);
}

TEST(StepExecutor, WithoutYieldingAWaitingTaskKeepsItsSlot) {
  Gate gate;
  std::atomic<bool> second_started_before_open{false};
  StepExecutor executor(StepExecutorOptions{.threads = 1, .yield_engine_waits = false});
  absl::Notification second_done;
  executor.Submit([&] { core::WaitForEngine(GateFuture{&gate}); });
  executor.Submit([&] {
    if (!gate.open) second_started_before_open = true;
    second_done.Notify();
  });
  ASSERT_TRUE(gate.AwaitBlocked(1));
  gate.Open();
  ASSERT_TRUE(second_done.WaitForNotificationWithTimeout(kDeadlockGuard));
  EXPECT_FALSE(second_started_before_open);
  const StepExecutorStats s = executor.stats();
  EXPECT_EQ(s.threads_started, 1);
  EXPECT_EQ(s.engine_waits, 1);
  // The slot was held idle for the whole wait.
  EXPECT_GT(s.blocked_seconds, 0);
  EXPECT_EQ(s.engine_wait_seconds, s.blocked_seconds);
}

TEST(StepExecutor, WaitsOffThePoolJustBlock) {
  EXPECT_EQ(core::CurrentEngineWaitHook(), nullptr);
  std::promise<int> p;
  std::future<int> f = p.get_future();
  std::thread producer([&] { p.set_value(7); });
  core::WaitForEngine(f);  // no hook on this thread: a plain wait
  EXPECT_EQ(f.get(), 7);
  producer.join();
}

TEST(StepExecutor, ManyTasksOnTheRealEngineAllComplete) {
  // Steps-like tasks: each submits decompositions to a real CPU engine and
  // waits through the hook; two slots, more tasks than the thread bound.
  engine::EngineOptions eo;
  eo.backend = "cpu";
  auto created = engine::CreateInversionEngine(eo);
  ASSERT_TRUE(created.ok()) << created.status();
  engine::InversionEngine* engine = created->engine.get();
  constexpr int kTasks = 64;
  std::vector<double> trace(kTasks, 0);
  {
    StepExecutor executor(StepExecutorOptions{.threads = 2});
    for (int i = 0; i < kTasks; ++i) {
      executor.Submit([&, i] {
        const int n = 8 + i % 3;
        Eigen::MatrixXd a = Eigen::MatrixXd::Identity(n, n) * (1.0 + i);
        auto f = engine->Submit(a, engine::DecompositionKind::kCholeskyInverse);
        core::WaitForEngine(f);
        auto r = f.get();
        ASSERT_TRUE(r.ok()) << r.status();
        trace[i] = r->matrix.trace();
      });
    }
  }
  for (int i = 0; i < kTasks; ++i) {
    const int n = 8 + i % 3;
    EXPECT_NEAR(trace[i], n / (1.0 + i), 1e-12) << "task " << i;
  }
}

}  // namespace
}  // namespace natgrad::service
