// Prometheus metrics of the service (docs/server-flags.md): natgrad_ prefix, base
// units, and never a session id as a label (unbounded cardinality).
#ifndef NATGRAD_SERVER_SERVICE_SERVICE_METRICS_H_
#define NATGRAD_SERVER_SERVICE_SERVICE_METRICS_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "grpcpp/support/status.h"
#include "natgrad/v1/session.pb.h"
#include "natgrad/v1/step.pb.h"
#include "prometheus/counter.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"

namespace natgrad::service {

class ServiceMetrics {
 public:
  explicit ServiceMetrics(std::shared_ptr<prometheus::Registry> registry);

  void StreamOpened();
  void StreamClosed();
  void MessageReceived(int64_t bytes);
  void MessageSent(int64_t bytes);
  void StepSucceeded(const natgrad::v1::SessionConfig& config,
                     const natgrad::v1::StepResponse& response);
  void StepFailed(absl::StatusCode code);
  // Blocks proposed before their step's last message arrived.
  void BlocksProposedEarly(int64_t blocks);
  // Tensor bytes read from a client's shared memory (reply false) or
  // written into its reply buffer (true), not carried by the messages.
  void SharedMemoryBytes(bool reply, int64_t bytes);
  void RpcError(grpc::StatusCode code);
  void CheckpointWritten(bool ok, absl::Duration latency);
  void CheckpointSkipped();
  // natgrad_checkpoint_healthy: 1, or 0 while checkpoint writes fail
  // (service/checkpointer.h). Absent without a checkpoint directory.
  void SetCheckpointHealthy(bool healthy);
  void SetSessions(int64_t count);
  void SetBackend(absl::string_view backend);
  // natgrad_build_info{version, git_commit, build_type, cuda} = 1: which
  // build is serving (one series; set once at start-up).
  void SetBuildInfo(absl::string_view version, absl::string_view git_commit,
                    absl::string_view build_type, bool cuda);
  // natgrad_blas_info{config, core, coretype_env} = 1: the BLAS library and
  // kernel set the block math runs on (linalg/blas_library.h).
  void SetBlasInfo(absl::string_view config, absl::string_view core,
                   absl::string_view coretype_env);
  // From the inversion engine's observer.
  void InversionBatch(absl::string_view backend, int64_t batch_size,
                      double seconds, int64_t failed_jobs);

  // From the StepExecutor as its tasks end: seconds its threads spent
  // running tasks, slot-seconds between a slot's handoff and its new thread
  // running, and slot-seconds left idle by steps blocked on the inversion
  // engine while no step was queued / while steps were queued
  // (StepExecutorStats).
  void WorkerTime(double running_seconds, double handoff_seconds,
                  double engine_wait_seconds, double engine_wait_queued_seconds);

  prometheus::Registry& registry() { return *registry_; }

 private:
  std::shared_ptr<prometheus::Registry> registry_;
  prometheus::Family<prometheus::Counter>& steps_;
  prometheus::Family<prometheus::Counter>& block_steps_;
  prometheus::Family<prometheus::Counter>& messages_;
  prometheus::Family<prometheus::Counter>& bytes_;
  prometheus::Family<prometheus::Counter>& errors_;
  prometheus::Family<prometheus::Counter>& checkpoints_;
  prometheus::Family<prometheus::Counter>& inversion_jobs_;
  prometheus::Family<prometheus::Counter>& inversion_batches_;
  prometheus::Family<prometheus::Histogram>& inversion_seconds_;
  prometheus::Family<prometheus::Histogram>& inversion_batch_size_;
  prometheus::Family<prometheus::Gauge>& backend_;
  prometheus::Family<prometheus::Gauge>& build_info_;
  prometheus::Family<prometheus::Gauge>& blas_info_;
  prometheus::Family<prometheus::Gauge>& checkpoint_healthy_;
  prometheus::Histogram& step_latency_;
  prometheus::Histogram& checkpoint_latency_;
  prometheus::Gauge& streams_;
  prometheus::Gauge& sessions_;
  prometheus::Counter& checkpoints_skipped_;
  prometheus::Counter& blocks_proposed_early_;
  prometheus::Family<prometheus::Counter>& shared_memory_bytes_;
  prometheus::Counter& worker_running_seconds_;
  prometheus::Counter& worker_handoff_seconds_;
  prometheus::Family<prometheus::Counter>& worker_engine_wait_;
  prometheus::Counter& worker_engine_wait_idle_seconds_;
  prometheus::Counter& worker_engine_wait_queued_seconds_;
};

}  // namespace natgrad::service

#endif  // NATGRAD_SERVER_SERVICE_SERVICE_METRICS_H_
