// The service's one way to make a session durable or to forget it on disk.
// Every checkpoint write (a step's, CreateSession's, ImportSession's, the
// periodic writer's, shutdown's) and every removal (DeleteSession, idle
// expiry) goes through here, so that:
//  - a deleted session is never written again (the store checks the
//    session's deleted flag under its file lock, and removal takes the same
//    lock after the flag is set);
//  - the outcome of each write is counted (natgrad_checkpoint_writes_total)
//    and disk trouble shows in natgrad_checkpoint_healthy and in the health
//    entry kCheckpointHealthService (docs/server-flags.md, "Durability").
#ifndef NATGRAD_SERVER_SERVICE_CHECKPOINTER_H_
#define NATGRAD_SERVER_SERVICE_CHECKPOINTER_H_

#include <set>
#include <string>

#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "grpcpp/health_check_service_interface.h"
#include "server/session/checkpoint_store.h"
#include "server/session/session.h"

namespace natgrad::service {

class ServiceMetrics;

// grpc.health.v1 entry that is NOT_SERVING while checkpoints are failing.
// Kept apart from "" and the service name on purpose: a readiness probe on
// those would stop routing a session's client to the one server that holds
// the session, and the client's retry is what makes its step durable once
// the disk recovers.
inline constexpr char kCheckpointHealthService[] = "natgrad.checkpoints";

class Checkpointer {
 public:
  // `metrics` may be null.
  Checkpointer(const session::CheckpointStore* store, ServiceMetrics* metrics);

  // Called once the gRPC server exists; sets the health entry.
  void SetHealthService(grpc::HealthCheckServiceInterface* health);

  // Writes the session's current state durably and marks it checkpointed.
  // NOT_FOUND when the session was deleted (nothing is written; not a disk
  // failure); otherwise the store's error, with the session's in-memory
  // state untouched.
  absl::Status Write(session::Session& session);

  // Removes the session's files. The session must already be marked
  // deleted, so that no write can come after the removal.
  absl::Status Remove(const session::Session& session);

  // False from a failed write (or removal) until a later write succeeds, and
  // while any session's latest write failed.
  bool healthy() const;

  const session::CheckpointStore& store() const { return *store_; }

 private:
  void PublishLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const session::CheckpointStore* const store_;
  ServiceMetrics* const metrics_;
  mutable absl::Mutex mu_;
  grpc::HealthCheckServiceInterface* health_ ABSL_GUARDED_BY(mu_) = nullptr;
  // Checkpoint paths of live sessions whose latest write failed.
  std::set<std::string> failing_ ABSL_GUARDED_BY(mu_);
  bool last_ok_ ABSL_GUARDED_BY(mu_) = true;
  bool published_ ABSL_GUARDED_BY(mu_) = true;
};

}  // namespace natgrad::service

#endif  // NATGRAD_SERVER_SERVICE_CHECKPOINTER_H_
