// How block math waits for the inversion engine (docs/architecture.md,
// "Waiting for the engine"). Every wait on an engine future goes through
// WaitForEngine. When the calling thread has an EngineWaitHook installed
// (the service's StepExecutor installs one on each of its worker threads),
// the wait is announced to it, so the pool can give the waiting step's worker
// slot to another queued step until the engine delivers; elsewhere (tests,
// the C ABI, benches, gRPC threads, compute-pool threads) it simply blocks.
//
// The hook is per thread, not carried by StepContext, on purpose: it
// accounts for the thread that blocks, so it must never be called from
// another one (a compute-pool thread running part of a step, say), and it
// also covers waits outside Propose (ExportState resolving a refresh in
// flight while a worker writes a checkpoint).
#ifndef NATGRAD_SERVER_CORE_ENGINE_WAIT_H_
#define NATGRAD_SERVER_CORE_ENGINE_WAIT_H_

#include <chrono>
#include <future>

namespace natgrad::core {

// "Managed blocking": told when the thread it is installed on is about to
// block on the engine and when it returned. Both are called on that thread,
// in pairs, never nested (a thread blocks on one future at a time).
class EngineWaitHook {
 public:
  virtual ~EngineWaitHook() = default;
  virtual void BeginEngineWait() = 0;
  virtual void EndEngineWait() = 0;
};

namespace internal {
inline EngineWaitHook*& ThreadEngineWaitHook() {
  thread_local EngineWaitHook* hook = nullptr;
  return hook;
}
}  // namespace internal

// The calling thread's hook, or nullptr.
inline EngineWaitHook* CurrentEngineWaitHook() { return internal::ThreadEngineWaitHook(); }

// Installs `hook` (may be null: none) on the calling thread for the scope's
// lifetime, restoring the previous one after.
class ScopedEngineWaitHook {
 public:
  explicit ScopedEngineWaitHook(EngineWaitHook* hook)
      : previous_(internal::ThreadEngineWaitHook()) {
    internal::ThreadEngineWaitHook() = hook;
  }
  ~ScopedEngineWaitHook() { internal::ThreadEngineWaitHook() = previous_; }
  ScopedEngineWaitHook(const ScopedEngineWaitHook&) = delete;
  ScopedEngineWaitHook& operator=(const ScopedEngineWaitHook&) = delete;

 private:
  EngineWaitHook* const previous_;
};

// True when `future` (std::future or std::shared_future) has its value.
template <typename Future>
bool EngineResultReady(const Future& future) {
  return future.wait_for(std::chrono::seconds(0)) == std::future_status::ready;
}

// Returns once `future` is ready (its get() will not block). A future that is
// ready already costs no hook call.
template <typename Future>
void WaitForEngine(const Future& future) {
  if (EngineResultReady(future)) return;
  EngineWaitHook* hook = CurrentEngineWaitHook();
  if (hook == nullptr) {
    future.wait();
    return;
  }
  hook->BeginEngineWait();
  future.wait();  // std::future::wait does not throw on a valid future
  hook->EndEngineWait();
}

}  // namespace natgrad::core

#endif  // NATGRAD_SERVER_CORE_ENGINE_WAIT_H_
