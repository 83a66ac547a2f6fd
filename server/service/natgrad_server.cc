#include "server/service/natgrad_server.h"

#include <unistd.h>

#include <algorithm>
#include <fstream>
#include <sstream>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/health_check_service_interface.h"
#include "natgrad/v1/optimizer_service.grpc.pb.h"
#include "server/common/build_info.h"
#include "server/common/log.h"
#include "server/linalg/blas_library.h"
#include "server/service/rpc_logging.h"
#include "server/linalg/thread_policy.h"
#include "prometheus/counter.h"
#include "server/service/token_authenticator.h"

namespace natgrad::service {
namespace {

absl::StatusOr<std::string> ReadFile(const std::string& path, absl::string_view flag) {
  std::ifstream in(path);
  if (!in) return absl::FailedPreconditionError(absl::StrCat(flag, ": cannot read ", path));
  std::stringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

// Engine batches -> Prometheus.
class EngineMetricsObserver final : public engine::EngineObserver {
 public:
  explicit EngineMetricsObserver(std::shared_ptr<ServiceMetrics> metrics)
      : metrics_(std::move(metrics)) {}
  void OnBatch(const engine::BatchEvent& e) override {
    metrics_->InversionBatch(e.backend, e.batch_size, e.seconds, e.failed);
  }

 private:
  std::shared_ptr<ServiceMetrics> metrics_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<NatgradServer>> NatgradServer::Start(ServerOptions options) {
  std::unique_ptr<NatgradServer> server(new NatgradServer());
  if (absl::Status s = server->Init(std::move(options)); !s.ok()) return s;
  return server;
}

absl::Status NatgradServer::Init(ServerOptions options) {
  options_ = std::move(options);
  metrics_ = std::make_shared<ServiceMetrics>(std::make_shared<prometheus::Registry>());
  const BuildInfo& build = GetBuildInfo();
  metrics_->SetBuildInfo(build.version, build.git_commit, build.build_type, build.cuda);
  const linalg::BlasLibraryInfo& blas = linalg::GetBlasLibraryInfo();
  metrics_->SetBlasInfo(blas.config, blas.core, blas.coretype_env);
  if (!options_.metrics_address.empty()) {
    auto http = MetricsHttpServer::Start(
        options_.metrics_address,
        std::shared_ptr<prometheus::Registry>(metrics_, &metrics_->registry()),
        MetricsHttpOptions{.request_timeout = options_.metrics_request_timeout});
    if (!http.ok()) return http.status();
    metrics_http_ = *std::move(http);
    metrics_port_ = metrics_http_->port();
  }

  sessions_expired_ = &prometheus::BuildCounter()
                           .Name("natgrad_sessions_expired_total")
                           .Help("Sessions deleted by --idle_session_ttl")
                           .Register(metrics_->registry())
                           .Add({});
  auto& reloads = prometheus::BuildCounter()
                      .Name("natgrad_token_reloads_total")
                      .Help("Reloads of --auth_tokens_file (SIGHUP), by outcome; on error "
                            "the previous tokens stay in force")
                      .Register(metrics_->registry());
  token_reloads_ok_ = &reloads.Add({{"outcome", "ok"}});
  token_reloads_failed_ = &reloads.Add({{"outcome", "error"}});

  options_.engine.observer = std::make_shared<EngineMetricsObserver>(metrics_);
  auto created = engine::CreateInversionEngine(options_.engine);
  if (!created.ok()) return created.status();
  engine_ = std::move(created->engine);
  backend_ = created->backend;
  backend_reason_ = created->reason;
  metrics_->SetBackend(backend_);

  // Created once; every session's steps share it. OpenBLAS runs
  // single-threaded from here on except inside the engine's lone large
  // decompositions (server/linalg/thread_policy.h).
  compute_pool_ = std::make_unique<linalg::ComputePool>(options_.compute_threads);
  linalg::SetBlasThreads(1);
  registry_ = std::make_unique<session::SessionRegistry>(options_.limits, engine_.get(),
                                                         compute_pool_.get());
  if (options_.replica_name.empty()) {
    char host[256] = {};
    if (gethostname(host, sizeof(host) - 1) == 0) options_.replica_name = host;
  }
  // Tombstones before checkpoints: a moved session's leftover checkpoint
  // must not bring it back here.
  auto moves = SessionMoves::Open({.checkpoint_dir = options_.checkpoint_dir,
                                   .ttl = options_.idle_session_ttl},
                                  &metrics_->registry());
  if (!moves.ok()) return moves.status();
  moves_ = *std::move(moves);
  if (!options_.checkpoint_dir.empty()) {
    auto store = session::CheckpointStore::Open(options_.checkpoint_dir);
    if (!store.ok()) return store.status();
    checkpoints_.emplace(*std::move(store));
    session::LoadedCheckpoints loaded = checkpoints_->LoadAll();
    for (const std::string& why : loaded.skipped) {
      NATGRAD_LOG(kWarning, "skipping checkpoint ", why);
      metrics_->CheckpointSkipped();
    }
    for (const std::string& path : loaded.from_previous) {
      NATGRAD_LOG(kWarning, "restored ", path,
                  " (the previous copy; the current file was damaged or missing)");
    }
    for (const std::string& path : loaded.legacy) {
      NATGRAD_LOG(kWarning, path, " predates checkpoint checksums and was loaded unverified");
    }
    for (const auto& snap : loaded.snapshots) {
      if (auto id = session::SessionRegistry::ParseName(snap.name());
          id.ok() && moves_->IsMoved(snap.tenant(), *id)) {
        NATGRAD_LOG(kWarning, "not restoring ", snap.name(),
                    ": it was moved to another replica (removing its checkpoint)");
        checkpoints_->Remove(snap.tenant(), *id).IgnoreError();
        continue;
      }
      auto restored = registry_->Import(snap, snap.tenant(), "");
      if (!restored.ok()) {
        NATGRAD_LOG(kWarning, "skipping checkpoint of ", snap.name(), ": ",
                    restored.status().ToString());
        metrics_->CheckpointSkipped();
        continue;
      }
      NATGRAD_LOG(kDebug, "session ", (*restored)->name(), " restored from checkpoint at step ",
                  snap.last_step());
      ++restored_;
    }
    metrics_->SetSessions(registry_->size());
  }

  if (!options_.auth_tokens_file.empty()) {
    auto tokens = TokenAuthenticator::FromFile(options_.auth_tokens_file);
    if (!tokens.ok()) return tokens.status();
    tokens_ = tokens->get();
    authenticator_ = *std::move(tokens);
  } else {
    authenticator_ = std::make_unique<AnonymousAuthenticator>();
  }

  executor_ = std::make_unique<StepExecutor>(
      StepExecutorOptions{.threads = options_.worker_threads,
                          .yield_engine_waits = options_.yield_engine_waits,
                          .metrics = metrics_.get()});
  ServiceDependencies deps;
  deps.registry = registry_.get();
  deps.executor = executor_.get();
  deps.authenticator = authenticator_.get();
  if (checkpoints_.has_value()) {
    checkpointer_ = std::make_unique<Checkpointer>(&*checkpoints_, metrics_.get());
  }
  deps.checkpoints = checkpointer_.get();
  deps.checkpoint_every_steps = options_.checkpoint_every_steps;
  deps.metrics = metrics_.get();
  deps.partial_step_timeout = options_.partial_step_timeout;
  deps.shared_memory = options_.shared_memory;
  deps.replica_name = options_.replica_name;
  deps.moves = moves_.get();
  service_ = std::make_unique<OptimizerService>(deps);
  AdminOptions admin;
  if (!options_.admin_token_file.empty()) {
    auto token = ReadAdminToken(options_.admin_token_file);
    if (!token.ok()) return token.status();
    admin.token = *std::move(token);
  }
  if (!options_.peer_ca_file.empty()) {
    auto ca = ReadFile(options_.peer_ca_file, "--peer_ca_file");
    if (!ca.ok()) return ca.status();
    grpc::SslCredentialsOptions ssl;
    ssl.pem_root_certs = *ca;
    if (!options_.tls_cert_file.empty()) {
      auto cert = ReadFile(options_.tls_cert_file, "--tls_cert");
      if (!cert.ok()) return cert.status();
      auto key = ReadFile(options_.tls_key_file, "--tls_key");
      if (!key.ok()) return key.status();
      ssl.pem_cert_chain = *cert;
      ssl.pem_private_key = *key;
    }
    admin.peer_credentials = grpc::SslCredentials(ssl);
  }
  // The service keeps a reference to the dependencies: they live in service_.
  admin_ = std::make_unique<AdminService>(service_->deps(), std::move(admin),
                                          &metrics_->registry());

  std::shared_ptr<grpc::ServerCredentials> creds = grpc::InsecureServerCredentials();
  if (!options_.tls_cert_file.empty() || !options_.tls_key_file.empty()) {
    auto cert = ReadFile(options_.tls_cert_file, "--tls_cert");
    if (!cert.ok()) return cert.status();
    auto key = ReadFile(options_.tls_key_file, "--tls_key");
    if (!key.ok()) return key.status();
    grpc::SslServerCredentialsOptions ssl;
    ssl.pem_key_cert_pairs.push_back({*key, *cert});
    if (!options_.tls_client_ca_file.empty()) {
      auto ca = ReadFile(options_.tls_client_ca_file, "--tls_client_ca");
      if (!ca.ok()) return ca.status();
      ssl.pem_root_certs = *ca;
      ssl.client_certificate_request =
          GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY;
    }
    creds = grpc::SslServerCredentials(ssl);
  } else if (!options_.tls_client_ca_file.empty()) {
    return absl::InvalidArgumentError("--tls_client_ca needs --tls_cert and --tls_key");
  }

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  builder.AddListeningPort(options_.address, creds, &port_);
  builder.SetMaxReceiveMessageSize(static_cast<int>(options_.max_message_bytes));
  builder.SetMaxSendMessageSize(static_cast<int>(options_.max_message_bytes));
  builder.RegisterService(service_.get());
  builder.RegisterService(admin_.get());
  std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> interceptors;
  interceptors.push_back(MakeRpcLoggingInterceptorFactory());
  builder.experimental().SetInterceptorCreators(std::move(interceptors));
  server_ = builder.BuildAndStart();
  if (server_ == nullptr || port_ == 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen on ", options_.address));
  }
  // grpc.health.v1 answers for "" (the whole server) by default; probes that
  // name the service (Kubernetes grpc probes with `service:`, Envoy) need
  // its own entry. Shutdown's SetServingStatus(false) covers both.
  server_->GetHealthCheckService()->SetServingStatus(
      natgrad::v1::OptimizerService::service_full_name(), true);
  server_->GetHealthCheckService()->SetServingStatus(true);
  if (checkpointer_ != nullptr) checkpointer_->SetHealthService(server_->GetHealthCheckService());

  if (checkpoints_.has_value() && options_.checkpoint_interval_s > 0) {
    checkpoint_thread_ = std::thread([this] { PeriodicCheckpoints(); });
  }
  if (options_.idle_session_ttl > absl::ZeroDuration()) {
    expiry_thread_ = std::thread([this] { ExpireIdleSessions(); });
  }
  return absl::OkStatus();
}

void NatgradServer::ExpireIdleSessions() {
  const absl::Duration ttl = options_.idle_session_ttl;
  const absl::Duration period =
      std::clamp(ttl / 4, absl::Milliseconds(50), absl::Seconds(60));
  absl::MutexLock lock(&mu_);
  while (!stopping_) {
    mu_.AwaitWithTimeout(absl::Condition(&stopping_), period);
    if (stopping_) break;
    mu_.Unlock();
    for (const auto& s : registry_->ExpireIdle(ttl, absl::Now())) {
      // ExpireIdle marked it deleted, so no write can follow the removal;
      // the Checkpointer logs a failure.
      if (checkpointer_ != nullptr) checkpointer_->Remove(*s).IgnoreError();
      sessions_expired_->Increment();
      NATGRAD_LOG(kInfo, "session ", s->name(), " expired after ", absl::FormatDuration(ttl),
                  " without a step or get");
    }
    moves_->ExpireOld(absl::Now());
    metrics_->SetSessions(registry_->size());
    mu_.Lock();
  }
}

void NatgradServer::PeriodicCheckpoints() {
  absl::MutexLock lock(&mu_);
  while (!stopping_) {
    mu_.AwaitWithTimeout(absl::Condition(&stopping_),
                         absl::Seconds(options_.checkpoint_interval_s));
    if (stopping_) break;
    mu_.Unlock();
    for (const auto& s : registry_->All()) {
      // A session deleted since All() is skipped by the write itself.
      if (s->StepsSinceCheckpoint() == 0) continue;
      checkpointer_->Write(*s).IgnoreError();  // counted and logged there
    }
    mu_.Lock();
  }
}

absl::Status NatgradServer::CheckpointAll() {
  if (checkpointer_ == nullptr) return absl::OkStatus();
  absl::Status result;
  for (const auto& s : registry_->All()) {
    absl::Status st = checkpointer_->Write(*s);
    if (!st.ok() && !absl::IsNotFound(st)) result.Update(st);  // NOT_FOUND: deleted meanwhile
  }
  return result;
}

absl::Status NatgradServer::ReloadTokens() {
  if (tokens_ == nullptr) return absl::OkStatus();
  absl::Status st = tokens_->Reload();
  (st.ok() ? token_reloads_ok_ : token_reloads_failed_)->Increment();
  return st;
}

void NatgradServer::Shutdown(absl::Duration grace) {
  {
    absl::MutexLock lock(&mu_);
    if (stopping_) return;
    stopping_ = true;
  }
  if (checkpoint_thread_.joinable()) checkpoint_thread_.join();
  if (expiry_thread_.joinable()) expiry_thread_.join();
  server_->GetHealthCheckService()->SetServingStatus(false);
  // Checkpoint first (a step may still land during the drain: its own
  // checkpoint-every-N policy covers it), then again after the drain.
  if (absl::Status s = CheckpointAll(); !s.ok()) NATGRAD_LOG(kError, "checkpoint: ", s.ToString());
  server_->Shutdown(std::chrono::system_clock::now() + absl::ToChronoSeconds(grace));
  if (absl::Status s = CheckpointAll(); !s.ok()) NATGRAD_LOG(kError, "checkpoint: ", s.ToString());
  executor_.reset();
  // No write can come now; the health service goes with server_.
  if (checkpointer_ != nullptr) checkpointer_->SetHealthService(nullptr);
  engine_->Shutdown();
  absl::MutexLock lock(&mu_);
  stopped_ = true;
}

void NatgradServer::Wait() {
  absl::MutexLock lock(&mu_);
  mu_.Await(absl::Condition(&stopped_));
}

NatgradServer::~NatgradServer() {
  if (server_ != nullptr) Shutdown(absl::ZeroDuration());
}

}  // namespace natgrad::service
