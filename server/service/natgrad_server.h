// A whole natgrad server: engine, sessions, gRPC service with health and
// reflection, metrics endpoint and checkpoints. main() and the in-process
// tests build it the same way.
#ifndef NATGRAD_SERVER_SERVICE_NATGRAD_SERVER_H_
#define NATGRAD_SERVER_SERVICE_NATGRAD_SERVER_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "grpcpp/grpcpp.h"
#include "prometheus/counter.h"
#include "server/engine/engine_factory.h"
#include "server/linalg/compute_pool.h"
#include "server/service/admin_service.h"
#include "server/service/authenticator.h"
#include "server/service/checkpointer.h"
#include "server/service/metrics_http_server.h"
#include "server/service/optimizer_service.h"
#include "server/service/service_metrics.h"
#include "server/service/session_moves.h"
#include "server/session/checkpoint_store.h"
#include "server/session/session_registry.h"

namespace natgrad::service {

class TokenAuthenticator;

struct ServerOptions {
  std::string address = "127.0.0.1:50051";
  std::string metrics_address;  // empty: no /metrics endpoint
  session::RegistryLimits limits;
  int64_t max_message_bytes = int64_t{256} << 20;
  // Steps computing at once (StepExecutor slots); 0: one per core.
  int worker_threads = 0;
  // A step blocked on the inversion engine gives its worker slot to a queued
  // step (StepExecutor); false keeps the slot idle. natgrad-server's
  // As natgrad-server's --yield_engine_waits (docs/server-flags.md).
  bool yield_engine_waits = true;
  // As natgrad-server's --shared_memory (docs/shared_memory.md).
  bool shared_memory = false;
  // Threads of the one ComputePool the block math shares (product panels,
  // Gaussian copies); 0: one per core.
  int compute_threads = 0;
  engine::EngineOptions engine;
  std::string checkpoint_dir;  // empty: no checkpoints
  int64_t checkpoint_every_steps = 0;
  int64_t checkpoint_interval_s = 0;
  std::string tls_cert_file;
  std::string tls_key_file;
  std::string tls_client_ca_file;  // set: client certificates required
  std::string auth_tokens_file;    // set: bearer tokens required
  absl::Duration metrics_request_timeout = absl::Seconds(5);
  // Sessions with no step or get for this long are deleted; zero: never.
  absl::Duration idle_session_ttl = absl::ZeroDuration();
  // A Step stream holding part of a step idle this long ends with
  // DEADLINE_EXCEEDED; zero: never.
  absl::Duration partial_step_timeout = absl::Seconds(60);
  // This replica's name in Session.replica and redirects; empty: the host
  // name (docs/replicas.md).
  std::string replica_name;
  // One admin token; empty: AdminService answers PERMISSION_DENIED.
  std::string admin_token_file;
  // PEM roots for TLS calls to peers during a drain (the server's own
  // certificate, when set, is presented); empty: plaintext.
  std::string peer_ca_file;
};

class NatgradServer {
 public:
  static absl::StatusOr<std::unique_ptr<NatgradServer>> Start(ServerOptions options);
  ~NatgradServer();

  int port() const { return port_; }
  int metrics_port() const { return metrics_port_; }
  const std::string& backend() const { return backend_; }
  const std::string& backend_reason() const { return backend_reason_; }
  int restored_sessions() const { return restored_; }

  // Health NOT_SERVING, checkpoint every session, let open streams finish
  // for up to `grace`, then cancel the rest and stop. Idempotent.
  void Shutdown(absl::Duration grace);
  // Blocks until Shutdown completed.
  void Wait();

  absl::Status CheckpointAll();
  // Re-reads --auth_tokens_file (SIGHUP).
  absl::Status ReloadTokens();

  session::SessionRegistry& registry() { return *registry_; }
  engine::BatchingInversionEngine& engine() { return *engine_; }
  ServiceMetrics& metrics() { return *metrics_; }
  SessionMoves& moves() { return *moves_; }
  AdminService& admin() { return *admin_; }
  const std::string& replica_name() const { return options_.replica_name; }

 private:
  NatgradServer() = default;
  absl::Status Init(ServerOptions options);
  void PeriodicCheckpoints();
  // Deletes idle sessions every ttl/4 (within [50 ms, 60 s]).
  void ExpireIdleSessions();

  ServerOptions options_;
  std::shared_ptr<ServiceMetrics> metrics_;
  std::unique_ptr<MetricsHttpServer> metrics_http_;
  std::unique_ptr<engine::BatchingInversionEngine> engine_;
  std::string backend_, backend_reason_;
  // Outlives the registry and the executor (declared before them).
  std::unique_ptr<linalg::ComputePool> compute_pool_;
  std::unique_ptr<session::SessionRegistry> registry_;
  std::optional<session::CheckpointStore> checkpoints_;
  std::unique_ptr<Checkpointer> checkpointer_;  // set with checkpoints_
  std::unique_ptr<StepExecutor> executor_;
  std::unique_ptr<Authenticator> authenticator_;
  TokenAuthenticator* tokens_ = nullptr;  // owned by authenticator_ when set
  std::unique_ptr<OptimizerService> service_;
  std::unique_ptr<SessionMoves> moves_;
  std::unique_ptr<AdminService> admin_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
  int metrics_port_ = 0;
  int restored_ = 0;

  absl::Mutex mu_;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  bool stopped_ ABSL_GUARDED_BY(mu_) = false;
  std::thread checkpoint_thread_;
  std::thread expiry_thread_;
  prometheus::Counter* sessions_expired_ = nullptr;
  prometheus::Counter* token_reloads_ok_ = nullptr;
  prometheus::Counter* token_reloads_failed_ = nullptr;
};

}  // namespace natgrad::service

#endif  // NATGRAD_SERVER_SERVICE_NATGRAD_SERVER_H_
