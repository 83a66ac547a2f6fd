#include "server/service/service_metrics.h"

#include "absl/container/flat_hash_set.h"
#include "server/blocks/registry.h"

#include <string>

#include "absl/strings/ascii.h"
#include "prometheus/counter.h"

namespace natgrad::service {
namespace {

using prometheus::BuildCounter;
using prometheus::BuildGauge;
using prometheus::BuildHistogram;
using prometheus::Histogram;

// The registry's name for the kind: the metrics label.
std::string KindOf(const natgrad::v1::BlockConfig& b) {
  auto kind = blocks::KindOf(b, "");
  return kind.ok() ? std::string((*kind)->name()) : "unknown";
}

std::string CodeName(int code) {
  std::string name = absl::StatusCodeToString(static_cast<absl::StatusCode>(code));
  return absl::AsciiStrToUpper(name);
}

// 100us .. ~100s, x2.5 per bucket.
Histogram::BucketBoundaries LatencyBuckets() {
  Histogram::BucketBoundaries b;
  for (double v = 1e-4; v < 200; v *= 2.5) b.push_back(v);
  return b;
}

}  // namespace

ServiceMetrics::ServiceMetrics(std::shared_ptr<prometheus::Registry> registry)
    : registry_(std::move(registry)),
      steps_(BuildCounter().Name("natgrad_steps_total")
                 .Help("Steps by outcome (ok, replayed, or the gRPC code).")
                 .Register(*registry_)),
      block_steps_(BuildCounter().Name("natgrad_block_steps_total")
                       .Help("Block updates computed, by block kind.")
                       .Register(*registry_)),
      messages_(BuildCounter().Name("natgrad_stream_messages_total")
                    .Help("Step stream messages by direction.")
                    .Register(*registry_)),
      bytes_(BuildCounter().Name("natgrad_stream_bytes_total")
                 .Help("Serialized bytes of Step stream messages by direction.")
                 .Register(*registry_)),
      errors_(BuildCounter().Name("natgrad_rpc_errors_total")
                  .Help("RPCs that ended with an error, by gRPC code.")
                  .Register(*registry_)),
      checkpoints_(BuildCounter().Name("natgrad_checkpoint_writes_total")
                       .Help("Checkpoint writes by outcome.")
                       .Register(*registry_)),
      inversion_jobs_(BuildCounter().Name("natgrad_inversion_jobs_total")
                          .Help("Decomposition jobs by backend and outcome.")
                          .Register(*registry_)),
      inversion_batches_(BuildCounter().Name("natgrad_inversion_batches_total")
                             .Help("Decomposition batches run, by backend.")
                             .Register(*registry_)),
      inversion_seconds_(BuildHistogram().Name("natgrad_inversion_batch_seconds")
                             .Help("Wall time of one decomposition batch.")
                             .Register(*registry_)),
      inversion_batch_size_(BuildHistogram().Name("natgrad_inversion_batch_size")
                                .Help("Jobs per decomposition batch.")
                                .Register(*registry_)),
      backend_(BuildGauge().Name("natgrad_inversion_backend_info")
                   .Help("1 for the inversion backend in use.")
                   .Register(*registry_)),
      build_info_(BuildGauge().Name("natgrad_build_info")
                      .Help("1, labelled with the version, git commit, build type and "
                            "CUDA support of the running server.")
                      .Register(*registry_)),
      blas_info_(BuildGauge().Name("natgrad_blas_info")
                     .Help("1, labelled with the BLAS library's build line, the kernel set "
                           "it runs and $OPENBLAS_CORETYPE (empty: the kernels were "
                           "detected for this CPU).")
                     .Register(*registry_)),
      checkpoint_healthy_(BuildGauge().Name("natgrad_checkpoint_healthy")
                              .Help("0 while checkpoint writes fail (from a failed write until "
                                    "one succeeds, and while a session's latest write failed), "
                                    "else 1.")
                              .Register(*registry_)),
      step_latency_(BuildHistogram().Name("natgrad_step_latency_seconds")
                        .Help("From a step's last message received to its response queued.")
                        .Register(*registry_)
                        .Add({}, LatencyBuckets())),
      checkpoint_latency_(BuildHistogram().Name("natgrad_checkpoint_write_seconds")
                              .Help("Time to write one session checkpoint durably.")
                              .Register(*registry_)
                              .Add({}, LatencyBuckets())),
      streams_(BuildGauge().Name("natgrad_streams_open")
                   .Help("Step streams open now.")
                   .Register(*registry_)
                   .Add({})),
      sessions_(BuildGauge().Name("natgrad_sessions")
                    .Help("Sessions held now.")
                    .Register(*registry_)
                    .Add({})),
      checkpoints_skipped_(BuildCounter().Name("natgrad_checkpoints_skipped_total")
                               .Help("Checkpoint files skipped at start-up as unreadable.")
                               .Register(*registry_)
                               .Add({})),
      blocks_proposed_early_(
          BuildCounter().Name("natgrad_blocks_proposed_early_total")
              .Help("Blocks proposed while the rest of their step was still arriving "
                    "(a step streamed over several messages); the others are proposed "
                    "with the step's last message.")
              .Register(*registry_)
              .Add({})),
      shared_memory_bytes_(
          BuildCounter().Name("natgrad_shared_memory_bytes_total")
              .Help("Tensor bytes clients passed through shared memory (--shared_memory) "
                    "instead of the stream: direction=received read from their spans, "
                    "sent written into their reply buffers.")
              .Register(*registry_)),
      worker_running_seconds_(
          BuildCounter().Name("natgrad_worker_running_seconds_total")
              .Help("Seconds step worker threads spent running steps (not blocked on the "
                    "inversion engine), summed over threads; added as each step ends.")
              .Register(*registry_)
              .Add({})),
      worker_handoff_seconds_(
          BuildCounter().Name("natgrad_worker_handoff_seconds_total")
              .Help("Worker-slot seconds between a slot being handed to a step worker "
                    "thread (a parked one given a queued step, or a step resuming from "
                    "the inversion engine) and that thread running: the scheduler's "
                    "wake-up latency. Added as each step ends.")
              .Register(*registry_)
              .Add({})),
      worker_engine_wait_(
          BuildCounter().Name("natgrad_worker_engine_wait_seconds_total")
              .Help("Worker-slot seconds left idle because their step was blocked on the "
                    "inversion engine and no other step ran in the slot, by whether steps "
                    "were queued then (queue=nonempty: they could have run; near 0 while "
                    "waiting steps yield their worker). Added as each step ends.")
              .Register(*registry_)),
      worker_engine_wait_idle_seconds_(worker_engine_wait_.Add({{"queue", "empty"}})),
      worker_engine_wait_queued_seconds_(worker_engine_wait_.Add({{"queue", "nonempty"}})) {}

void ServiceMetrics::WorkerTime(double running_seconds, double handoff_seconds,
                                double engine_wait_seconds, double engine_wait_queued_seconds) {
  if (running_seconds > 0) worker_running_seconds_.Increment(running_seconds);
  if (handoff_seconds > 0) worker_handoff_seconds_.Increment(handoff_seconds);
  if (engine_wait_seconds > 0) worker_engine_wait_idle_seconds_.Increment(engine_wait_seconds);
  if (engine_wait_queued_seconds > 0) {
    worker_engine_wait_queued_seconds_.Increment(engine_wait_queued_seconds);
  }
}

void ServiceMetrics::StreamOpened() { streams_.Increment(); }
void ServiceMetrics::StreamClosed() { streams_.Decrement(); }

void ServiceMetrics::MessageReceived(int64_t bytes) {
  messages_.Add({{"direction", "received"}}).Increment();
  bytes_.Add({{"direction", "received"}}).Increment(static_cast<double>(bytes));
}

void ServiceMetrics::MessageSent(int64_t bytes) {
  messages_.Add({{"direction", "sent"}}).Increment();
  bytes_.Add({{"direction", "sent"}}).Increment(static_cast<double>(bytes));
}

void ServiceMetrics::StepSucceeded(const natgrad::v1::SessionConfig& config,
                                   const natgrad::v1::StepResponse& response) {
  steps_.Add({{"outcome", response.replayed() ? "replayed" : "ok"}}).Increment();
  if (response.replayed()) return;
  // Blocks left out of the step got no update and are not counted.
  absl::flat_hash_set<absl::string_view> updated;
  for (const auto& u : response.updates()) updated.insert(u.name());
  for (const auto& b : config.blocks()) {
    if (updated.contains(b.name())) block_steps_.Add({{"kind", KindOf(b)}}).Increment();
  }
  step_latency_.Observe(response.timing().server_micros() * 1e-6);
}

void ServiceMetrics::StepFailed(absl::StatusCode code) {
  steps_.Add({{"outcome", CodeName(static_cast<int>(code))}}).Increment();
}

void ServiceMetrics::SharedMemoryBytes(bool reply, int64_t bytes) {
  shared_memory_bytes_.Add({{"direction", reply ? "sent" : "received"}})
      .Increment(static_cast<double>(bytes));
}

void ServiceMetrics::BlocksProposedEarly(int64_t blocks) {
  blocks_proposed_early_.Increment(static_cast<double>(blocks));
}

void ServiceMetrics::RpcError(grpc::StatusCode code) {
  errors_.Add({{"code", CodeName(static_cast<int>(code))}}).Increment();
}

void ServiceMetrics::CheckpointWritten(bool ok, absl::Duration latency) {
  checkpoints_.Add({{"outcome", ok ? "ok" : "error"}}).Increment();
  if (ok) checkpoint_latency_.Observe(absl::ToDoubleSeconds(latency));
}

void ServiceMetrics::CheckpointSkipped() { checkpoints_skipped_.Increment(); }

void ServiceMetrics::SetCheckpointHealthy(bool healthy) {
  checkpoint_healthy_.Add({}).Set(healthy ? 1 : 0);
}

void ServiceMetrics::SetSessions(int64_t count) {
  sessions_.Set(static_cast<double>(count));
}

void ServiceMetrics::SetBackend(absl::string_view backend) {
  backend_.Add({{"backend", std::string(backend)}}).Set(1);
}

void ServiceMetrics::SetBuildInfo(absl::string_view version, absl::string_view git_commit,
                                  absl::string_view build_type, bool cuda) {
  build_info_.Add({{"version", std::string(version)},
                   {"git_commit", std::string(git_commit)},
                   {"build_type", std::string(build_type)},
                   {"cuda", cuda ? "on" : "off"}})
      .Set(1);
}

void ServiceMetrics::SetBlasInfo(absl::string_view config, absl::string_view core,
                                 absl::string_view coretype_env) {
  blas_info_.Add({{"config", std::string(config)},
                  {"core", std::string(core)},
                  {"coretype_env", std::string(coretype_env)}})
      .Set(1);
}

void ServiceMetrics::InversionBatch(absl::string_view backend, int64_t batch_size,
                                    double seconds, int64_t failed_jobs) {
  const std::string b(backend);
  inversion_batches_.Add({{"backend", b}}).Increment();
  inversion_jobs_.Add({{"backend", b}, {"outcome", "ok"}})
      .Increment(static_cast<double>(batch_size - failed_jobs));
  if (failed_jobs > 0) {
    inversion_jobs_.Add({{"backend", b}, {"outcome", "error"}})
        .Increment(static_cast<double>(failed_jobs));
  }
  inversion_seconds_.Add({{"backend", b}}, LatencyBuckets()).Observe(seconds);
  inversion_batch_size_
      .Add({{"backend", b}}, Histogram::BucketBoundaries{1, 2, 4, 8, 16, 32, 64, 128, 256})
      .Observe(static_cast<double>(batch_size));
}

}  // namespace natgrad::service
