#include "server/service/step_reactor.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "server/service/rpc_logging.h"
#include "server/service/service_metrics.h"
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
  if (actions.read) StartRead(&request_);
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
    absl::MutexLock lock(&mu_);
    FinishLocked(grpc::Status::OK, actions);
  } else {
    if (deps_.metrics) deps_.metrics->MessageReceived(request_.ByteSizeLong());
    absl::Status status = HandleMessage();
    if (!status.ok()) {
      if (deps_.metrics) deps_.metrics->StepFailed(status.code());
      LogFailedStep(status, session_ ? session_->name() : request_.session(), request_.step(),
                    context_->peer());
      absl::MutexLock lock(&mu_);
      FinishLocked(ToGrpcStatus(status), actions);
    } else if (!assembler_->complete()) {
      actions.read = true;
    } else {
      {
        absl::MutexLock lock(&mu_);
        ++busy_;
      }
      deps_.executor->Submit(
          [this, step = assembler_->Take()]() mutable { RunStep(std::move(step)); });
    }
  }
  Apply(actions);
}

absl::Status StepReactor::HandleMessage() {
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
        "session: \"", request_.session(), "\" differs from this stream's ",
        session_->name()));
  }
  return assembler_->Add(request_);
}

void StepReactor::RunStep(AssembledStep step) {
  const std::string name = session_->name();
  const natgrad::v1::SessionConfig& config = session_->config();
  // Decided before the step, so its reply can say it is durable (-1: no
  // checkpoint dir, nothing survives a restart; proto StepResponse.durable_step).
  const bool has_store = deps_.checkpoints != nullptr;
  const int64_t durable_before = has_store ? session_->durable_step() : -1;
  const bool checkpoint_now = has_store && deps_.checkpoint_every_steps > 0 &&
                              step.data.step - durable_before >= deps_.checkpoint_every_steps;
  absl::StatusOr<session::StepOutcome> outcome = session_->Step(
      step.data, [&](const session::StepResult& result) -> std::shared_ptr<const session::CachedReply> {
        return EncodeStepReply(result, step, config, name,
                               checkpoint_now ? result.step : durable_before);
      });
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
          "checkpoint of ", name, " at step ", step.data.step, " failed: ", written.message(),
          "; the step is not acknowledged (retry it once the checkpoint directory is "
          "writable)"));
    }
  }
  // A new step's reply was encoded with the durable step it gets if its due
  // write succeeds (a failed one is not sent); a replay reports the current one.
  absl::StatusOr<std::shared_ptr<const natgrad::v1::StepResponse>> response =
      status.ok() ? ResponseFor(*outcome, has_store ? session_->durable_step() : -1)
                  : absl::StatusOr<std::shared_ptr<const natgrad::v1::StepResponse>>(status);
  status = response.status();
  if (deps_.metrics) {
    if (status.ok()) {
      deps_.metrics->StepSucceeded(session_->config(), **response);
    } else {
      deps_.metrics->StepFailed(status.code());
    }
  }
  if (!status.ok()) LogFailedStep(status, session_->name(), step.data.step, context_->peer());
  Actions actions;
  {
    absl::MutexLock lock(&mu_);
    if (!status.ok() && !pending_finish_.has_value()) {
      pending_finish_ = ToGrpcStatus(status);
    } else if (status.ok() && !pending_finish_.has_value()) {
      writes_.push_back(*std::move(response));
      MaybeWriteLocked(actions);
      actions.read = true;
    }
  }
  // Still busy: a write started here may complete (and want to finish the
  // call) before StartRead below has run.
  if (actions.write != nullptr) StartWrite(actions.write);
  if (actions.read) StartRead(&request_);
  Actions finish;
  {
    absl::MutexLock lock(&mu_);
    --busy_;
    if (pending_finish_.has_value()) FinishLocked(*pending_finish_, finish);
  }
  Apply(finish);
}

void StepReactor::MaybeWriteLocked(Actions& actions) {
  if (writing_ || writes_.empty()) return;
  writing_ = true;
  if (deps_.metrics) deps_.metrics->MessageSent(writes_.front()->ByteSizeLong());
  actions.write = writes_.front().get();
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
  delete this;
}

}  // namespace natgrad::service
