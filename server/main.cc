// natgrad-server: flags, wiring, signals. See docs/server-flags.md.
#include <signal.h>

#include <cstdio>
#include <fstream>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/flags/usage_config.h"
#include "absl/strings/match.h"
#include "absl/time/time.h"
#include "server/common/build_info.h"
#include "server/common/log.h"
#include "server/linalg/blas_library.h"
#include "server/linalg/openblas_environment.h"
#include "server/service/natgrad_server.h"

ABSL_FLAG(std::string, address, "127.0.0.1:50051",
          "gRPC listen address (host:port); port 0 picks a free port");
ABSL_FLAG(std::string, metrics_address, "",
          "Prometheus /metrics listen address (host:port); empty disables it");
ABSL_FLAG(int64_t, max_sessions, 1024, "Sessions held at once, all tenants");
ABSL_FLAG(int64_t, max_session_bytes, int64_t{1} << 30,
          "Optimizer state bytes per session (also bounds one step's messages)");
ABSL_FLAG(int64_t, max_sessions_per_tenant, 0, "Sessions per tenant; 0: no limit");
ABSL_FLAG(int64_t, max_bytes_per_tenant, 0, "State bytes per tenant; 0: no limit");
ABSL_FLAG(int64_t, memory_budget_bytes, 0,
          "Server-wide bound on session state plus step data received but not yet "
          "applied; RESOURCE_EXHAUSTED beyond it; 0: no bound");
ABSL_FLAG(absl::Duration, partial_step_timeout, absl::Seconds(60),
          "A Step stream holding part of a step with no message for this long ends "
          "with DEADLINE_EXCEEDED; zero: never");
ABSL_FLAG(int64_t, max_message_bytes, int64_t{256} << 20,
          "gRPC receive/send message size limit (gRPC's default is 4 MiB)");
ABSL_FLAG(int32_t, worker_threads, 0,
          "Steps computing at once (worker slots); 0: one per core (see "
          "--yield_engine_waits)");
// On by default: on an otherwise idle 2-core machine with the CPU engine,
// 32 K-FAC sessions ran 2.19x one session's steps/s lending the slot vs 1.81x
// keeping it (docs/server-flags.md). Under heavy competing load it measured
// slower; false is for a machine whose cores other work keeps busy.
ABSL_FLAG(bool, yield_engine_waits, true,
          "A step blocked on the inversion engine lends its worker slot to a queued "
          "step of another session (up to 32 threads per slot); false keeps the slot "
          "idle during the wait");
ABSL_FLAG(bool, shared_memory, false,
          "Clients on this host may send tensors, and take replies, through /dev/shm "
          "objects named natgrad-* (docs/shared_memory.md); off: such steps are refused");
ABSL_FLAG(int32_t, compute_threads, 0,
          "Threads of the pool that splits large products and Gaussian copies, "
          "shared by all steps (the step's own thread included); 0: one per core");
ABSL_FLAG(std::string, inversion_backend, "auto",
          "Factor decompositions on 'auto' (CUDA when a GPU is present), 'cpu' or 'cuda'");
ABSL_FLAG(int64_t, batch_window_us, 200,
          "How long the inversion engine waits to batch same-size jobs");
ABSL_FLAG(int32_t, max_batch, 64, "Largest inversion batch");
ABSL_FLAG(std::string, checkpoint_dir, "", "Directory for session checkpoints; empty: none");
ABSL_FLAG(int64_t, checkpoint_every_steps, 0,
          "Checkpoint a session every N steps, before answering (0: off)");
ABSL_FLAG(int64_t, checkpoint_interval_s, 0,
          "Checkpoint sessions with new steps every T seconds (0: off)");
ABSL_FLAG(std::string, tls_cert, "", "PEM server certificate chain; enables TLS");
ABSL_FLAG(std::string, tls_key, "", "PEM server private key");
ABSL_FLAG(std::string, tls_client_ca, "",
          "PEM CA bundle; when set, clients must present a certificate it signed");
ABSL_FLAG(std::string, auth_tokens_file, "",
          "File of '<token> <tenant>' lines; when set, calls need 'authorization: "
          "Bearer <token>'. Reloaded on SIGHUP");
ABSL_FLAG(int32_t, shutdown_grace_s, 20,
          "After SIGTERM/SIGINT: seconds open streams get to finish");
ABSL_FLAG(std::string, metrics_port_file, "",
          "Write the bound /metrics port to this file (before --port_file is written)");
ABSL_FLAG(absl::Duration, metrics_request_timeout, absl::Seconds(5),
          "A /metrics request head must arrive within this, counted from its first byte");
ABSL_FLAG(absl::Duration, idle_session_ttl, absl::ZeroDuration(),
          "Delete sessions (and their checkpoints) with no step or get for this long; 0: off");
ABSL_FLAG(std::string, port_file, "",
          "Write the bound gRPC port to this file once serving (for tests and scripts)");
ABSL_FLAG(std::string, replica_name, "",
          "This replica's name in Session.replica and in SessionMoved redirects (the "
          "natgrad-replica routing header); empty: the host name");
ABSL_FLAG(std::string, admin_token_file, "",
          "File holding the one admin token (>= 16 characters) that AdminService calls "
          "(Drain) must present as 'authorization: Bearer <token>'; empty: AdminService "
          "refuses every call with PERMISSION_DENIED");
ABSL_FLAG(std::string, peer_ca_file, "",
          "PEM roots for TLS calls to peer replicas during a drain (presenting --tls_cert "
          "when set); empty: plaintext");
ABSL_FLAG(std::string, log_level, "info",
          "Least severe log line written to stderr: debug, info, warning or error");

int main(int argc, char** argv) {
  // Before anything else (the exec would lose it): OpenBLAS must load with
  // its idle workers asleep, not spinning (server/linalg/openblas_environment.h).
  if (!natgrad::linalg::ReexecWithQuietOpenBlasThreads(argv)) {
    std::perror("natgrad-server: re-exec with OPENBLAS_THREAD_TIMEOUT set (going on without)");
  }
  // --help lists the flags defined in this file (absl's default looks for a
  // file named after the binary).
  absl::FlagsUsageConfig usage;
  usage.contains_help_flags = [](absl::string_view file) {
    return absl::EndsWith(file, "server/main.cc");
  };
  usage.contains_helpshort_flags = usage.contains_help_flags;
  absl::SetFlagsUsageConfig(usage);
  absl::SetProgramUsageMessage(
      "natural-gradient optimizer service (gRPC natgrad.v1.OptimizerService)");
  absl::ParseCommandLine(argc, argv);
  auto level = natgrad::log::ParseLevel(absl::GetFlag(FLAGS_log_level));
  if (!level.ok()) {
    NATGRAD_LOG(kError, "--log_level: ", level.status().message());
    return 2;
  }
  natgrad::log::SetLevel(*level);

  // Block the signals we handle before any thread exists, so every thread
  // inherits the mask and only sigwait below sees them.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGHUP);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  // A checkpoint write past RLIMIT_FSIZE must fail with EFBIG (the step is
  // then not acknowledged), not kill the server with its sessions.
  signal(SIGXFSZ, SIG_IGN);

  natgrad::service::ServerOptions o;
  o.address = absl::GetFlag(FLAGS_address);
  o.metrics_address = absl::GetFlag(FLAGS_metrics_address);
  o.limits.max_sessions = absl::GetFlag(FLAGS_max_sessions);
  o.limits.max_session_bytes = absl::GetFlag(FLAGS_max_session_bytes);
  o.limits.max_sessions_per_tenant = absl::GetFlag(FLAGS_max_sessions_per_tenant);
  o.limits.max_bytes_per_tenant = absl::GetFlag(FLAGS_max_bytes_per_tenant);
  o.limits.memory_budget_bytes = absl::GetFlag(FLAGS_memory_budget_bytes);
  o.partial_step_timeout = absl::GetFlag(FLAGS_partial_step_timeout);
  o.max_message_bytes = absl::GetFlag(FLAGS_max_message_bytes);
  o.worker_threads = absl::GetFlag(FLAGS_worker_threads);
  o.yield_engine_waits = absl::GetFlag(FLAGS_yield_engine_waits);
  o.shared_memory = absl::GetFlag(FLAGS_shared_memory);
  o.compute_threads = absl::GetFlag(FLAGS_compute_threads);
  o.engine.backend = absl::GetFlag(FLAGS_inversion_backend);
  o.engine.batch_window_us = absl::GetFlag(FLAGS_batch_window_us);
  o.engine.max_batch = absl::GetFlag(FLAGS_max_batch);
  o.checkpoint_dir = absl::GetFlag(FLAGS_checkpoint_dir);
  o.checkpoint_every_steps = absl::GetFlag(FLAGS_checkpoint_every_steps);
  o.checkpoint_interval_s = absl::GetFlag(FLAGS_checkpoint_interval_s);
  o.tls_cert_file = absl::GetFlag(FLAGS_tls_cert);
  o.tls_key_file = absl::GetFlag(FLAGS_tls_key);
  o.tls_client_ca_file = absl::GetFlag(FLAGS_tls_client_ca);
  o.auth_tokens_file = absl::GetFlag(FLAGS_auth_tokens_file);
  o.metrics_request_timeout = absl::GetFlag(FLAGS_metrics_request_timeout);
  o.idle_session_ttl = absl::GetFlag(FLAGS_idle_session_ttl);
  o.replica_name = absl::GetFlag(FLAGS_replica_name);
  o.admin_token_file = absl::GetFlag(FLAGS_admin_token_file);
  o.peer_ca_file = absl::GetFlag(FLAGS_peer_ca_file);
  if (o.metrics_request_timeout <= absl::ZeroDuration() ||
      o.idle_session_ttl < absl::ZeroDuration()) {
    NATGRAD_LOG(kError, "--metrics_request_timeout must be > 0 and --idle_session_ttl >= 0");
    return 2;
  }
  if (o.max_message_bytes <= 0 || o.max_message_bytes > INT32_MAX) {
    NATGRAD_LOG(kError, "--max_message_bytes must be in (0, 2^31)");
    return 2;
  }

  const natgrad::BuildInfo& build = natgrad::GetBuildInfo();
  NATGRAD_LOG(kInfo, "version ", build.version, " (commit ", build.git_commit, ", ",
              build.build_type, ", cuda ", build.cuda ? "on" : "off", ")");
  NATGRAD_LOG(kInfo, "BLAS: ",
              natgrad::linalg::DescribeBlasLibrary(natgrad::linalg::GetBlasLibraryInfo()));
  auto server = natgrad::service::NatgradServer::Start(o);
  if (!server.ok()) {
    NATGRAD_LOG(kError, server.status().ToString());
    return 1;
  }
  auto& s = **server;
  NATGRAD_LOG(kInfo, "replica name: ", s.replica_name());
  NATGRAD_LOG(kInfo, "listening on port ", s.port(), " (",
              o.tls_cert_file.empty() ? "insecure" : "TLS", ")");
  NATGRAD_LOG(kInfo, "inversion backend: ", s.backend(), " (", s.backend_reason(), ")");
  if (s.metrics_port() != 0) {
    NATGRAD_LOG(kInfo, "metrics on port ", s.metrics_port(), " at /metrics");
  }
  if (!o.checkpoint_dir.empty()) {
    NATGRAD_LOG(kInfo, "checkpoints in ", o.checkpoint_dir, ", restored ",
                s.restored_sessions(), " session(s)");
  }
  // Write then rename, so a reader never sees a partial number.
  auto write_port = [](const std::string& path, int port) {
    if (path.empty()) return;
    const std::string tmp = path + ".tmp";
    std::ofstream(tmp) << port << "\n";
    std::rename(tmp.c_str(), path.c_str());
  };
  if (s.metrics_port() != 0) write_port(absl::GetFlag(FLAGS_metrics_port_file), s.metrics_port());
  write_port(absl::GetFlag(FLAGS_port_file), s.port());

  for (;;) {
    int sig = 0;
    if (sigwait(&signals, &sig) != 0) continue;
    if (sig == SIGHUP) {
      // On error the old tokens stay in force (ReloadTokens counts it).
      absl::Status st = s.ReloadTokens();
      if (st.ok()) {
        NATGRAD_LOG(kInfo, "SIGHUP: tokens reloaded");
      } else {
        NATGRAD_LOG(kError, "SIGHUP: tokens not reloaded (the previous ones stay): ",
                    st.ToString());
      }
      continue;
    }
    NATGRAD_LOG(kInfo, "signal ", sig, ", draining");
    s.Shutdown(absl::Seconds(absl::GetFlag(FLAGS_shutdown_grace_s)));
    break;
  }
  NATGRAD_LOG(kInfo, "stopped");
  return 0;
}
