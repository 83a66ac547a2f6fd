#include "server/service/step_reactor.h"

#include <algorithm>
#include <iostream>
#include <new>
#include <utility>

#include "absl/strings/str_cat.h"
#include "grpcpp/impl/codegen/proto_utils.h"
#include "grpcpp/support/proto_buffer_reader.h"
#include "server/common/log.h"
#include "server/core/block_error.h"
#include "server/service/rpc_logging.h"
#include "server/service/service_metrics.h"
#include "server/service/session_moves.h"
#include "server/service/status_conversion.h"
#include "server/service/step_reply.h"

namespace natgrad::service {

StepReactor::StepReactor(const ServiceDependencies& deps,
                         grpc::CallbackServerContext* context)
    : deps_(deps), context_(context) {
  if (deps_.metrics) deps_.metrics->StreamOpened();
  auto tenant = deps_.authenticator->Authenticate(*context);
  Actions actions;
  if (!tenant.ok()) {
    absl::MutexLock lock(&mu_);
    FinishLocked(ToGrpcStatus(tenant.status()), actions);
  } else {
    tenant_ = *std::move(tenant);
    actions.read = true;
  }
  Apply(actions);
}

void StepReactor::Apply(const Actions& actions) {
  if (actions.write != nullptr) StartWrite(actions.write);
  if (actions.read) StartRead(&read_buffer_);
  if (actions.finish.has_value()) {
    Detach();
    Finish(*actions.finish);
  }
}

void StepReactor::Detach() {
  if (attached_.exchange(false)) session_->DetachStream();
}

void StepReactor::OnReadDone(bool ok) {
  Actions actions;
  if (!ok) {
    // The client half-closed (or went away): end once our writes are out.
    // Inside a step that is an error: the step's messages are dropped, and
    // OK would tell the client the step was taken.
    absl::MutexLock lock(&mu_);
    ++alarm_generation_;
    grpc::Status status = grpc::Status::OK;
    if (partial_) {
      status = grpc::Status(
          grpc::StatusCode::INVALID_ARGUMENT,
          absl::StrCat("step ", partial_step_,
                       ": the stream ended before the message marked last; the step's "
                       "messages were dropped and nothing was applied"));
    }
    FinishLocked(std::move(status), actions);
  } else {
    received_ = absl::Now();  // before parsing: decode time counts from here
    int64_t dropped_step = 0;
    {
      absl::MutexLock lock(&mu_);
      // A timer (or a cancel, a failed step) already ended the stream, or
      // will once the executor work of it has run: this message is not
      // taken, so nothing of the step it completes can be applied.
      if (finished_ || pending_finish_.has_value()) return;
      if (partial_) dropped_step = partial_step_;
    }
    ++messages_read_;
    const int64_t bytes = static_cast<int64_t>(read_buffer_.Length());
    if (deps_.metrics) deps_.metrics->MessageReceived(bytes);
    absl::Status status = deps_.registry->ReserveInFlight(bytes);
    if (status.ok()) {
      reserved_bytes_ += bytes;  // released with the step, or in OnDone
      request_.Clear();
      grpc::Status decoded =
          grpc::GenericDeserialize<grpc::ProtoBufferReader, natgrad::v1::StepRequest>(
              &read_buffer_, &request_);
      if (!decoded.ok()) {
        status = absl::InvalidArgumentError(absl::StrCat(
            "message ", messages_read_, " of the stream (", bytes,
            " bytes) is not a decodable natgrad.v1.StepRequest",
            dropped_step > 0 ? absl::StrCat("; step ", dropped_step, " was dropped") : "",
            ", nothing was applied"));
      }
    }
    if (status.ok()) status = InlineSharedMemory();
    if (status.ok()) {
      try {
        status = HandleMessage();
      } catch (const std::bad_alloc&) {
        status = absl::ResourceExhaustedError(absl::StrCat(
            "step ", request_.step(), ": the server could not allocate memory for it"));
      }
    }
    if (status.ok() && !assembler_->complete()) {
      {
        absl::MutexLock lock(&mu_);
        partial_ = true;
        partial_step_ = request_.step();
      }
      ArmPartialStepTimer();
    }
    if (!status.ok()) {
      if (deps_.metrics) deps_.metrics->StepFailed(status.code());
      LogFailedStep(status, session_ ? session_->name() : core::QuotedClientString(request_.session()), request_.step(),
                    context_->peer());
      absl::MutexLock lock(&mu_);
      FinishLocked(ToGrpcStatus(status), actions);
    } else if (!assembler_->complete()) {
      // Proposed while the next message is in flight (docs/architecture.md).
      std::vector<session::BlockStepData> blocks = assembler_->TakeBlocks();
      if (!blocks.empty()) {
        RunInOrder([this, step = request_.step(), blocks = std::move(blocks)]() mutable {
          ProposeEarly(step, std::move(blocks));
        });
      }
      actions.read = true;
    } else {
      std::unique_ptr<grpc::Alarm> stale;
      {
        absl::MutexLock lock(&mu_);
        partial_ = false;
        ++alarm_generation_;
        stale = std::move(alarm_);
      }
      stale.reset();  // cancels; its callback sees a newer generation
      // Handed over before the task is queued: it may run, finish and start
      // the next read (whose OnReadDone adds to reserved_bytes_) before
      // RunInOrder returns. Not queued when the stream already ended (no read
      // follows then): OnDone releases it.
      const int64_t reserved = std::exchange(reserved_bytes_, 0);
      if (!RunInOrder([this, step = assembler_->Take(), reserved]() mutable {
            RunStep(std::move(step), reserved);
          })) {
        reserved_bytes_ = reserved;
      }
    }
  }
  Apply(actions);
}

absl::Status StepReactor::InlineSharedMemory() {
  absl::StatusOr<int64_t> spanned = wire::SpannedBytes(request_);
  if (!spanned.ok()) return spanned.status();
  if (*spanned == 0 && !request_.has_reply_buffer()) return absl::OkStatus();
  if (!deps_.shared_memory) {
    return absl::FailedPreconditionError(absl::StrCat(
        "step ", request_.step(),
        ": names shared memory, which this server does not read (start it with "
        "--shared_memory, on the client's host); send the tensors as data"));
  }
  absl::MutexLock lock(&shared_memory_mu_);
  if (shared_memory_ == nullptr) shared_memory_ = std::make_unique<wire::SharedMemoryRegions>();
  if (request_.has_reply_buffer()) {
    // Checked now, so that a bad buffer refuses the step before it is applied.
    if (absl::Status s = shared_memory_->CheckReplyBuffer(request_.reply_buffer()); !s.ok()) {
      return s;
    }
  }
  if (*spanned == 0) return absl::OkStatus();
  // The per-session bound on a step's bytes, before anything is reserved or
  // copied (the assembler checks the inlined message against it again).
  const int64_t max_step_bytes = deps_.registry->limits().max_session_bytes;
  if (*spanned > max_step_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "step ", request_.step(), ": its messages exceed ", max_step_bytes,
        " bytes (the per-session limit), counting ", *spanned, " bytes in shared memory"));
  }
  if (absl::Status s = deps_.registry->ReserveInFlight(*spanned); !s.ok()) return s;
  reserved_bytes_ += *spanned;  // released with the step, as the message's own bytes
  if (deps_.metrics) deps_.metrics->SharedMemoryBytes(/*reply=*/false, *spanned);
  return shared_memory_->Inline(&request_);
}

std::shared_ptr<const natgrad::v1::StepResponse> StepReactor::WithReplyBuffer(
    std::shared_ptr<const natgrad::v1::StepResponse> response,
    const std::optional<natgrad::v1::SharedMemorySpan>& buffer, int64_t step) {
  if (!buffer.has_value()) return response;
  absl::StatusOr<natgrad::v1::StepResponse> written = absl::InternalError("no mappings");
  {
    absl::MutexLock lock(&shared_memory_mu_);
    if (shared_memory_ != nullptr) written = shared_memory_->WriteReply(*response, *buffer);
  }
  if (!written.ok()) {
    NATGRAD_LOG(kWarning, session_->name(), " step ", step,
                ": reply sent inline, not through its reply_buffer: ", written.status().message());
    return response;
  }
  if (deps_.metrics) {
    deps_.metrics->SharedMemoryBytes(/*reply=*/true, wire::SpannedReplyBytes(*written));
  }
  return std::make_shared<const natgrad::v1::StepResponse>(*std::move(written));
}

absl::Status StepReactor::HandleMessage() {
  if (session_ != nullptr) {
    // Tokens may have been revoked (SIGHUP reload) while this stream was
    // open: every message is authorised again, so a removed token's stream
    // ends at its next message. The lookup is a hash and a constant-time scan.
    auto tenant = deps_.authenticator->Authenticate(*context_);
    if (!tenant.ok() || *tenant != tenant_) {
      return absl::UnauthenticatedError(
          "the stream's token is no longer valid (the tokens file was reloaded)");
    }
  }
  if (deps_.moves != nullptr) {
    // Every message: a session drained away while this stream is open ends
    // the stream with the redirect at its next message.
    if (session_ != nullptr) {
      if (absl::Status s = deps_.moves->CheckNotMoved(tenant_, session_->id()); !s.ok()) return s;
    } else if (auto id = session::SessionRegistry::ParseName(request_.session()); id.ok()) {
      if (absl::Status s = deps_.moves->CheckNotMoved(tenant_, *id); !s.ok()) return s;
    }
  }
  if (session_ == nullptr) {
    if (request_.session().empty()) {
      return absl::InvalidArgumentError("session: required in the first message");
    }
    auto session = deps_.registry->Get(request_.session(), tenant_);
    if (!session.ok()) return session.status();
    if (!(*session)->TryAttachStream()) {
      return absl::FailedPreconditionError(absl::StrCat(
          "stream already open on ", (*session)->name(),
          ": one Step stream per session"));
    }
    session_ = *std::move(session);
    attached_ = true;
    assembler_.emplace(session_->config(), deps_.registry->limits().max_session_bytes);
  } else if (!request_.session().empty() && request_.session() != session_->name() &&
             request_.session() != session_->id()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "session: ", core::QuotedClientString(request_.session()), " differs from this stream's ",
        session_->name()));
  }
  return assembler_->Add(request_, received_);
}

void StepReactor::ArmPartialStepTimer() {
  if (deps_.partial_step_timeout <= absl::ZeroDuration()) return;
  auto alarm = std::make_unique<grpc::Alarm>();
  std::unique_ptr<grpc::Alarm> stale;
  {
    absl::MutexLock lock(&mu_);
    if (finished_) return;
    const uint64_t generation = ++alarm_generation_;
    ++alarms_pending_;
    alarm->Set(absl::ToChronoTime(absl::Now() + deps_.partial_step_timeout),
               [this, generation](bool fired) { OnPartialStepTimer(fired, generation); });
    stale = std::move(alarm_);
    alarm_ = std::move(alarm);
  }
  // Destroyed outside the lock: cancelling may run its callback.
}

void StepReactor::OnPartialStepTimer(bool fired, uint64_t generation) {
  Actions actions;
  bool last_reference = false;
  {
    absl::MutexLock lock(&mu_);
    --alarms_pending_;
    if (done_) {
      last_reference = alarms_pending_ == 0;
    } else if (fired && generation == alarm_generation_ && partial_ && !finished_) {
      FinishLocked(
          grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED,
                       absl::StrCat("step ", partial_step_, ": no message for ",
                                    absl::FormatDuration(deps_.partial_step_timeout),
                                    " while the step was incomplete (--partial_step_timeout); "
                                    "its messages were dropped and nothing was applied")),
          actions);
    }
  }
  if (last_reference) {
    delete this;
    return;
  }
  Apply(actions);
}

bool StepReactor::RunInOrder(std::function<void()> task) {
  bool start = false;
  {
    absl::MutexLock lock(&mu_);
    if (finished_) return false;
    ++busy_;
    tasks_.push_back(std::move(task));
    start = !task_running_;
    task_running_ = true;
  }
  // Safe after the lock: busy_ keeps the reactor until the task has run.
  if (start) deps_.executor->Submit([this] { RunNextTask(); });
  return true;
}

void StepReactor::RunNextTask() {
  std::function<void()> task;
  {
    absl::MutexLock lock(&mu_);
    task = std::move(tasks_.front());
    tasks_.pop_front();
  }
  task();
  task = nullptr;  // its step's tensors go while the reactor is still held
  last_task_end_ = absl::Now();
  bool more = false;
  Actions finish;
  {
    absl::MutexLock lock(&mu_);
    --busy_;
    more = !tasks_.empty();
    task_running_ = more;
    if (pending_finish_.has_value()) FinishLocked(*pending_finish_, finish);
  }
  // The next task on the executor's queue (not run here: other streams'
  // work waiting there goes first). With one queued busy_ is still > 0, so
  // nothing above finished the call.
  if (more) deps_.executor->Submit([this] { RunNextTask(); });
  Apply(finish);
}

void StepReactor::ProposeEarly(int64_t step, std::vector<session::BlockStepData> blocks) {
  {
    absl::MutexLock lock(&mu_);
    if (pending_finish_.has_value() || finished_) {
      // The stream is ending: skip the math. A last message that still got
      // through must not apply the step without these blocks.
      if (early_failure_.ok()) {
        early_failure_ = absl::CancelledError(absl::StrCat(
            "step ", step, ": the stream ended while the step's messages arrived; "
            "nothing was applied"));
      }
      return;
    }
  }
  if (!early_failure_.ok()) return;
  try {
    if (in_progress_ == nullptr) in_progress_ = session_->BeginStep(step);
    const size_t proposed = session_->ProposeBlocks(*in_progress_, std::move(blocks));
    if (deps_.metrics) deps_.metrics->BlocksProposedEarly(static_cast<int64_t>(proposed));
  } catch (const std::bad_alloc&) {
    in_progress_.reset();
    early_failure_ = absl::ResourceExhaustedError(
        absl::StrCat("step ", step, ": the server could not allocate memory for it"));
  }
}

void StepReactor::RunStep(AssembledStep step, int64_t reserved_bytes) {
  step.started = absl::Now();  // the end of StepTiming.queue_micros
  step.decoded = std::max(step.decoded, last_task_end_);  // runnable from then
  const std::string name = session_->name();
  const natgrad::v1::SessionConfig& config = session_->config();
  // Decided before the step, so its reply can say it is durable (-1: no
  // checkpoint dir, nothing survives a restart; proto StepResponse.durable_step).
  const bool has_store = deps_.checkpoints != nullptr;
  const int64_t durable_before = has_store ? session_->durable_step() : -1;
  const bool checkpoint_now = has_store && deps_.checkpoint_every_steps > 0 &&
                              step.data.step - durable_before >= deps_.checkpoint_every_steps;
  // The move gate (session_moves.h): a session frozen for a move holds the
  // step here, then refuses it (UNAVAILABLE, or the redirect once moved);
  // nothing of a refused step is applied.
  const absl::Status gate = deps_.moves != nullptr
                                ? deps_.moves->Enter(session_->tenant(), session_->id())
                                : absl::OkStatus();
  // The earlier messages' proposals (ProposeEarly), done or failed.
  std::unique_ptr<session::StepInProgress> in_progress = std::move(in_progress_);
  const absl::Status early_failure = std::exchange(early_failure_, absl::OkStatus());
  absl::StatusOr<session::StepOutcome> outcome = absl::InternalError("step not run");
  if (!gate.ok()) outcome = gate;
  if (gate.ok() && !early_failure.ok()) outcome = early_failure;
  if (gate.ok() && early_failure.ok()) try {
    if (in_progress == nullptr) in_progress = session_->BeginStep(step.data.step);
    outcome = session_->FinishStep(
        *in_progress, step.data.loss, step.data.blocks,
        [&](session::StepResult& result) -> std::shared_ptr<const session::CachedReply> {
          return EncodeStepReply(result, step, config, name,
                                 checkpoint_now ? result.step : durable_before);
        });
  } catch (const std::bad_alloc&) {
    // Block math allocates its working set; running out is the client's
    // step being too large for this server now, not a server bug.
    outcome = absl::ResourceExhaustedError(absl::StrCat(
        "step ", step.data.step, ": the server could not allocate memory for it"));
  }
  const int64_t step_number = step.data.step;
  const std::optional<natgrad::v1::SharedMemorySpan> reply_buffer = std::move(step.reply_buffer);
  // The step's tensors go before the budget is released.
  in_progress.reset();
  step = AssembledStep();
  deps_.registry->ReleaseInFlight(reserved_bytes);
  absl::Status status = outcome.status();
  if (status.ok() && has_store && deps_.checkpoint_every_steps > 0 &&
      session_->StepsSinceCheckpoint() >= deps_.checkpoint_every_steps) {
    // Durable before the client sees the response: after a crash the server
    // is never behind what a client was told. A replay comes here too when
    // this step's write failed before, so the client's retry writes it again.
    absl::Status written = deps_.checkpoints->Write(*session_);
    if (absl::IsNotFound(written)) {
      status = absl::NotFoundError(absl::StrCat("session ", name, " was deleted"));
    } else if (!written.ok()) {
      // The step stays applied in memory, unacknowledged: a retry of the
      // same step number replays it and tries the write again.
      status = absl::UnavailableError(absl::StrCat(
          "checkpoint of ", name, " at step ", step_number, " failed: ", written.message(),
          "; the step is not acknowledged (retry it once the checkpoint directory is "
          "writable)"));
    }
  }
  // After the step's checkpoint, so a move's snapshot and removal follow it.
  if (gate.ok() && deps_.moves != nullptr) deps_.moves->Exit(session_->tenant(), session_->id());
  // A new step's reply was encoded with the durable step it gets if its due
  // write succeeds (a failed one is not sent); a replay reports the current one.
  absl::StatusOr<std::shared_ptr<const natgrad::v1::StepResponse>> response =
      status.ok() ? ResponseFor(*outcome, has_store ? session_->durable_step() : -1)
                  : absl::StatusOr<std::shared_ptr<const natgrad::v1::StepResponse>>(status);
  status = response.status();
  if (status.ok()) *response = WithReplyBuffer(*std::move(response), reply_buffer, step_number);
  if (deps_.metrics) {
    if (status.ok()) {
      deps_.metrics->StepSucceeded(session_->config(), **response);
    } else {
      deps_.metrics->StepFailed(status.code());
    }
  }
  if (!status.ok()) LogFailedStep(status, session_->name(), step_number, context_->peer());
  Actions actions;
  {
    absl::MutexLock lock(&mu_);
    if (!status.ok() && !pending_finish_.has_value()) {
      pending_finish_ = ToGrpcStatus(status);
    } else if (status.ok() && !pending_finish_.has_value()) {
      grpc::ByteBuffer encoded;
      bool own = false;
      grpc::SerializationTraits<natgrad::v1::StepResponse>::Serialize(**response, &encoded, &own);
      writes_.push_back(std::move(encoded));
      MaybeWriteLocked(actions);
      // Backpressure: with too many responses unsent the next read waits
      // for OnWriteDone.
      if (writes_.size() > kMaxUnsentResponses) {
        read_deferred_ = true;
      } else {
        actions.read = true;
      }
    }
  }
  // Still busy (until RunNextTask): a write started here may complete (and
  // want to finish the call) before StartRead below has run.
  if (actions.write != nullptr) StartWrite(actions.write);
  if (actions.read) StartRead(&read_buffer_);
}

void StepReactor::MaybeWriteLocked(Actions& actions) {
  if (writing_ || writes_.empty()) return;
  writing_ = true;
  if (deps_.metrics) deps_.metrics->MessageSent(writes_.front().Length());
  actions.write = &writes_.front();
}

void StepReactor::OnWriteDone(bool ok) {
  Actions actions;
  {
    absl::MutexLock lock(&mu_);
    writing_ = false;
    writes_.pop_front();
    if (!ok) {
      writes_.clear();
      FinishLocked(grpc::Status(grpc::StatusCode::CANCELLED, "stream broken"), actions);
    } else {
      MaybeWriteLocked(actions);
      if (!writing_ && pending_finish_.has_value()) FinishLocked(*pending_finish_, actions);
      if (read_deferred_ && !finished_ && !pending_finish_.has_value() &&
          writes_.size() <= kMaxUnsentResponses) {
        read_deferred_ = false;
        actions.read = true;
      }
    }
  }
  Apply(actions);
}

void StepReactor::FinishLocked(grpc::Status status, Actions& actions) {
  if (finished_) return;
  if (writing_ || busy_ > 0) {
    // Keep the first reason; finish when the write or the step completes.
    if (!pending_finish_.has_value()) pending_finish_ = std::move(status);
    return;
  }
  finished_ = true;
  if (pending_finish_.has_value()) status = *pending_finish_;
  if (deps_.metrics && !status.ok()) deps_.metrics->RpcError(status.error_code());
  actions.read = false;
  actions.finish = std::move(status);
}

void StepReactor::OnCancel() {
  Actions actions;
  {
    absl::MutexLock lock(&mu_);
    // Drop queued responses but not the one being written: gRPC still
    // holds a pointer to it.
    if (writing_) {
      writes_.erase(writes_.begin() + 1, writes_.end());
    } else {
      writes_.clear();
    }
    FinishLocked(grpc::Status(grpc::StatusCode::CANCELLED, "cancelled"), actions);
  }
  Apply(actions);
}

void StepReactor::OnDone() {
  Detach();
  if (deps_.metrics) deps_.metrics->StreamClosed();
  // A partial step's reservation (a completed step releases its own), after
  // its proposed blocks are gone (no executor task is left to touch them).
  in_progress_.reset();
  deps_.registry->ReleaseInFlight(reserved_bytes_);
  reserved_bytes_ = 0;
  std::unique_ptr<grpc::Alarm> alarm;
  bool last_reference;
  {
    absl::MutexLock lock(&mu_);
    done_ = true;
    last_reference = alarms_pending_ == 0;
    alarm = std::move(alarm_);
  }
  if (last_reference) {
    alarm.reset();
    delete this;
    return;
  }
  // The last timer callback deletes the reactor; cancelling makes it come
  // now. Nothing here may touch `this` any more.
  alarm.reset();
}

}  // namespace natgrad::service
