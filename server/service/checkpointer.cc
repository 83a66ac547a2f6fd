#include "server/service/checkpointer.h"

#include "absl/time/clock.h"
#include "server/common/log.h"
#include "server/service/service_metrics.h"

namespace natgrad::service {

Checkpointer::Checkpointer(const session::CheckpointStore* store, ServiceMetrics* metrics)
    : store_(store), metrics_(metrics) {
  if (metrics_ != nullptr) metrics_->SetCheckpointHealthy(true);
}

void Checkpointer::SetHealthService(grpc::HealthCheckServiceInterface* health) {
  absl::MutexLock lock(&mu_);
  health_ = health;
  if (health_ != nullptr) health_->SetServingStatus(kCheckpointHealthService, published_);
}

absl::Status Checkpointer::Write(session::Session& session) {
  const absl::Time start = absl::Now();
  const natgrad::v1::SessionSnapshot snap = session.Snapshot();
  absl::Status st = store_->Write(snap, [&session] { return session.deleted(); });
  // A deleted session: nothing to make durable, and nothing wrong with the disk.
  if (absl::IsNotFound(st)) return st;
  if (metrics_ != nullptr) metrics_->CheckpointWritten(st.ok(), absl::Now() - start);
  if (st.ok()) {
    session.MarkCheckpointed(snap.last_step());
  } else {
    NATGRAD_LOG(kError, "checkpoint of ", session.name(), " at step ", snap.last_step(),
                " failed: ", st.message());
  }
  const std::string path = store_->PathFor(session.tenant(), session.id());
  absl::MutexLock lock(&mu_);
  last_ok_ = st.ok();
  if (st.ok()) {
    failing_.erase(path);
  } else {
    failing_.insert(path);
  }
  PublishLocked();
  return st;
}

absl::Status Checkpointer::Remove(const session::Session& session) {
  absl::Status st = store_->Remove(session.tenant(), session.id());
  if (!st.ok()) {
    NATGRAD_LOG(kError, "removing the checkpoint of deleted ", session.name(),
                " failed (it may be restored at the next start): ", st.message());
  }
  absl::MutexLock lock(&mu_);
  // The session is gone either way: its own failed write no longer matters.
  failing_.erase(store_->PathFor(session.tenant(), session.id()));
  if (!st.ok()) last_ok_ = false;
  PublishLocked();
  return st;
}

bool Checkpointer::healthy() const {
  absl::MutexLock lock(&mu_);
  return published_;
}

void Checkpointer::PublishLocked() {
  const bool healthy = last_ok_ && failing_.empty();
  if (healthy == published_) return;
  published_ = healthy;
  if (metrics_ != nullptr) metrics_->SetCheckpointHealthy(healthy);
  if (health_ != nullptr) health_->SetServingStatus(kCheckpointHealthService, healthy);
  if (healthy) {
    NATGRAD_LOG(kInfo, "checkpoints are healthy again");
  } else {
    NATGRAD_LOG(kError, "checkpoints are failing: health ", kCheckpointHealthService,
                " is NOT_SERVING until a write succeeds");
  }
}

}  // namespace natgrad::service
