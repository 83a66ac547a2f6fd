// natgrad.v1.AdminService (proto/natgrad/v1/admin_service.proto): draining
// this replica onto its peers, and the peers' side of it (ImportMoved).
// docs/replicas.md describes the procedure and its guarantee.
//
// A drain moves one session at a time: freeze it (SessionMoves gate), take
// its snapshot, have the peer import it durably (ImportMoved), and only after
// the peer's acknowledgement write the tombstone and drop it here. A session
// is therefore never live on two replicas: before the acknowledgement only
// this replica can apply its steps (and it is frozen, so it applies none),
// after it only the peer can. When the peer refuses the import, the session
// is unfrozen and keeps being served here. When the outcome is unknown (the
// reply was lost), the import is retried with the same move_id, which the
// peer recognises; if it still cannot be settled the session stays frozen
// (steps get UNAVAILABLE) and the error says so: a second Drain settles it.
#ifndef NATGRAD_SERVER_SERVICE_ADMIN_SERVICE_H_
#define NATGRAD_SERVER_SERVICE_ADMIN_SERVICE_H_

#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "grpcpp/grpcpp.h"
#include "natgrad/v1/admin_service.grpc.pb.h"
#include "prometheus/counter.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"
#include "server/service/optimizer_service.h"
#include "server/service/session_moves.h"

namespace natgrad::service {

struct AdminOptions {
  // The admin token (--admin_token_file's content); empty: every call is
  // PERMISSION_DENIED.
  std::string token;
  // For calls to peers; insecure when null.
  std::shared_ptr<grpc::ChannelCredentials> peer_credentials;
  // How long a drain waits for a session's step in progress to finish.
  absl::Duration freeze_wait = absl::Seconds(10);
  // Per ImportMoved attempt.
  absl::Duration import_deadline = absl::Seconds(30);
};

// Reads an admin token file: one token (surrounding whitespace ignored),
// at least 16 characters.
absl::StatusOr<std::string> ReadAdminToken(const std::string& path);

class AdminService final : public natgrad::v1::AdminService::CallbackService {
 public:
  // `deps` (its moves set) must outlive the service; `metrics` may be null.
  AdminService(const ServiceDependencies& deps, AdminOptions options,
               prometheus::Registry* metrics);
  ~AdminService() override;

  grpc::ServerUnaryReactor* Drain(grpc::CallbackServerContext* context,
                                  const natgrad::v1::DrainRequest* request,
                                  natgrad::v1::DrainResponse* response) override;
  grpc::ServerUnaryReactor* ImportMoved(grpc::CallbackServerContext* context,
                                        const natgrad::v1::ImportMovedRequest* request,
                                        natgrad::v1::Session* response) override;

  // The drain itself (the RPC runs it on its own thread); public for tests.
  natgrad::v1::DrainResponse RunDrain(const natgrad::v1::DrainRequest& request);

 private:
  absl::Status Authorize(const grpc::CallbackServerContext& context) const;
  // Moves one session; OK, or why not (with `left_frozen` when unsettled).
  absl::Status MoveOne(const std::shared_ptr<session::Session>& session,
                       const natgrad::v1::Peer& peer, bool* left_frozen);
  natgrad::v1::AdminService::Stub* StubFor(const std::string& address);

  const ServiceDependencies& deps_;
  const AdminOptions options_;
  std::string token_digest_;  // SHA-256 of the token; empty: no token
  prometheus::Counter* moved_ok_ = nullptr;
  prometheus::Counter* moved_failed_ = nullptr;
  prometheus::Histogram* drain_seconds_ = nullptr;

  absl::Mutex mu_;
  std::map<std::string, std::unique_ptr<natgrad::v1::AdminService::Stub>> stubs_
      ABSL_GUARDED_BY(mu_);
  // move_id -> (tenant, id) of sessions imported here by ImportMoved, so a
  // retried import of the same move is acknowledged (bounded, memory only).
  std::map<std::string, std::pair<std::string, std::string>> imported_ ABSL_GUARDED_BY(mu_);
  // Unsettled moves (left frozen): the same peer and move_id on a retry.
  std::map<std::pair<std::string, std::string>, std::pair<natgrad::v1::Peer, std::string>>
      unsettled_ ABSL_GUARDED_BY(mu_);
  std::vector<std::thread> threads_ ABSL_GUARDED_BY(mu_);
  absl::Mutex drain_mu_;  // one drain at a time
};

}  // namespace natgrad::service

#endif  // NATGRAD_SERVER_SERVICE_ADMIN_SERVICE_H_
