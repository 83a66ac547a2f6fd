// The Step stream of one session (gRPC route_guide's callback reactor shape).
// Reads a step's messages, hands each message before the last to the
// executor to be proposed while the next one is read, hands the last one to
// it to finish the step, queues the response, then reads the next step. At most one read and one write are
// outstanding; responses wait in a queue while a write is in flight, and no
// read starts while more than kMaxUnsentResponses wait (a client that never
// reads its responses holds a bounded amount of server memory). A stream
// that holds part of a step with no message for --partial_step_timeout, or
// that half-closes inside a step, ends with an error.
#ifndef NATGRAD_SERVER_SERVICE_STEP_REACTOR_H_
#define NATGRAD_SERVER_SERVICE_STEP_REACTOR_H_

#include <atomic>
#include <deque>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "grpcpp/alarm.h"
#include "grpcpp/grpcpp.h"
#include "natgrad/v1/step.pb.h"
#include "server/service/optimizer_service.h"
#include "server/service/step_assembler.h"
#include "server/wire/shared_memory.h"

namespace natgrad::service {

// Raw messages: the reactor decodes requests and encodes responses itself
// (see OptimizerServiceBase).
class StepReactor final : public grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
 public:
  StepReactor(const ServiceDependencies& deps, grpc::CallbackServerContext* context);

  void OnReadDone(bool ok) override;
  void OnWriteDone(bool ok) override;
  void OnCancel() override;
  void OnDone() override;

 private:
  // gRPC operations decided under mu_ and started after releasing it, since
  // gRPC may run a reaction inline on the calling thread.
  struct Actions {
    const grpc::ByteBuffer* write = nullptr;
    bool read = false;
    std::optional<grpc::Status> finish;
  };

  static constexpr size_t kMaxUnsentResponses = 4;

  absl::Status HandleMessage();
  // Copies the tensors request_ keeps in shared memory into it (their bytes
  // reserved against the memory budget) and checks its reply buffer, before
  // anything of the message is taken: a bad span changes nothing.
  absl::Status InlineSharedMemory();
  // The response to send: `response` with its tensors written into the
  // step's reply buffer, or `response` itself when it has none or the
  // write fails (the step is applied: its reply then travels inline).
  std::shared_ptr<const natgrad::v1::StepResponse> WithReplyBuffer(
      std::shared_ptr<const natgrad::v1::StepResponse> response,
      const std::optional<natgrad::v1::SharedMemorySpan>& buffer, int64_t step);
  // Executor work of this stream runs one task at a time, in the order
  // queued (a step's proposals, then its final task); each counts in busy_
  // from here until it has run.
  // False (nothing queued) once the stream has finished.
  bool RunInOrder(std::function<void()> task);
  void RunNextTask();
  // A message before the last: its blocks are proposed now.
  void ProposeEarly(int64_t step, std::vector<session::BlockStepData> blocks);
  void RunStep(AssembledStep step, int64_t reserved_bytes);
  // A fresh idle timer for the partial step, replacing the last one.
  void ArmPartialStepTimer();
  void OnPartialStepTimer(bool fired, uint64_t generation);
  // Finishes now if nothing is in flight, else once it completes.
  void FinishLocked(grpc::Status status, Actions& actions)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void MaybeWriteLocked(Actions& actions) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Apply(const Actions& actions);
  void Detach();

  const ServiceDependencies& deps_;
  grpc::CallbackServerContext* const context_;
  std::string tenant_;
  grpc::ByteBuffer read_buffer_;
  natgrad::v1::StepRequest request_;
  // The read completion of request_, taken before it is parsed (StepTiming).
  absl::Time received_;
  int64_t messages_read_ = 0;
  std::shared_ptr<session::Session> session_;
  std::optional<StepAssembler> assembler_;
  // The stream's shared-memory mappings (--shared_memory), made on first use.
  // Reads and the executor's reply writes may overlap across steps.
  absl::Mutex shared_memory_mu_;
  std::unique_ptr<wire::SharedMemoryRegions> shared_memory_ ABSL_GUARDED_BY(shared_memory_mu_);

  absl::Mutex mu_;
  // Encoded responses; the front one is being written while writing_.
  std::deque<grpc::ByteBuffer> writes_ ABSL_GUARDED_BY(mu_);
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  // Executor-side work in flight: a step being computed, or its gRPC
  // operations being started. The reactor cannot finish (and be deleted by
  // OnDone) while this is non-zero, because executor threads are not gRPC
  // reactions and gRPC does not wait for them.
  int busy_ ABSL_GUARDED_BY(mu_) = 0;
  // RunInOrder's queue, and whether its front task is on the executor.
  std::deque<std::function<void()>> tasks_ ABSL_GUARDED_BY(mu_);
  bool task_running_ ABSL_GUARDED_BY(mu_) = false;
  // The step whose earlier messages were proposed, and why it must fail
  // without reaching the session (memory ran out proposing, or the stream
  // began ending under a proposal so the blocks were not all handed over).
  // Touched only by RunInOrder's tasks, one at a time, and by OnDone once
  // none is left.
  std::unique_ptr<session::StepInProgress> in_progress_;
  absl::Status early_failure_;
  // When the stream's last executor task ended (RunNextTask, before the next
  // is submitted): a step queued behind its own early proposals is runnable
  // from then, not from its last message (StepTiming.queue_micros).
  absl::Time last_task_end_ = absl::InfinitePast();
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  // Released when finishing, before the client can see the status, so a
  // client that reconnects at once is not refused as a second stream.
  std::atomic<bool> attached_{false};
  std::optional<grpc::Status> pending_finish_ ABSL_GUARDED_BY(mu_);
  // A read waits for the unsent responses to drain (backpressure).
  bool read_deferred_ ABSL_GUARDED_BY(mu_) = false;
  // The step being assembled: its number, whether a message of it is held,
  // and the bytes of it reserved against the memory budget (touched by
  // gRPC reactions only, which gRPC runs one at a time per stream).
  bool partial_ ABSL_GUARDED_BY(mu_) = false;
  int64_t partial_step_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t reserved_bytes_ = 0;
  // Idle timers: each message of a partial step replaces the timer and
  // bumps the generation, so only the newest one can end the stream. The
  // reactor outlives every timer callback (OnDone waits for them).
  std::unique_ptr<grpc::Alarm> alarm_ ABSL_GUARDED_BY(mu_);
  uint64_t alarm_generation_ ABSL_GUARDED_BY(mu_) = 0;
  int alarms_pending_ ABSL_GUARDED_BY(mu_) = 0;
  bool done_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace natgrad::service

#endif  // NATGRAD_SERVER_SERVICE_STEP_REACTOR_H_
