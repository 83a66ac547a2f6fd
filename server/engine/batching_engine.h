// BatchingInversionEngine (server/engine/README.md): the server's one InversionEngine.
//
// Submit() queues a job and returns a future at once. A dispatcher thread
// groups pending jobs by (n, dtype, kind); a group is dispatched when it holds
// max_batch jobs or when its oldest job has waited batch_window_us (Triton's
// max_queue_delay). Each dispatched group runs as one batch on the backend,
// one batch at a time; jobs arriving meanwhile accumulate, so batches grow
// with load even with a zero window.
//
// Shutdown (explicit or in the destructor): Submit() afterwards fails with
// CANCELLED; queued jobs are run (drain_on_shutdown) or fail with CANCELLED;
// a running batch always completes. Every future becomes ready.
#ifndef NATGRAD_SERVER_ENGINE_BATCHING_ENGINE_H_
#define NATGRAD_SERVER_ENGINE_BATCHING_ENGINE_H_

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <variant>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "server/engine/backend.h"
#include "server/engine/inversion_engine.h"

namespace natgrad::engine {

enum class DType { kFloat32, kFloat64 };
absl::string_view DTypeName(DType dtype);              // "float32", "float64"
absl::string_view KindName(DecompositionKind kind);    // "eigh", "cholesky_inverse"

// One dispatched batch.
struct BatchEvent {
  absl::string_view backend;
  DecompositionKind kind;
  DType dtype;
  int64_t n;
  int batch_size;
  int failed;      // jobs of the batch that ended non-OK
  int retries;     // sum of Decomposition::retries over the batch
  double seconds;  // wall time of the backend call
};

// One finished job (also for jobs cancelled at shutdown, with seconds so far).
struct JobEvent {
  absl::string_view backend;
  DecompositionKind kind;
  DType dtype;
  int64_t n;
  absl::StatusCode code;
  int retries;
  double queue_seconds;  // submit -> batch start
  double total_seconds;  // submit -> result
};

// Plain observer for a metrics layer (prometheus lives in server/service).
// Called on the dispatcher thread after a batch ran and just before its
// futures are set (so a caller woken by a future finds its job already
// observed and counted): keep it cheap and non-blocking, and do not call back
// into the engine.
class EngineObserver {
 public:
  virtual ~EngineObserver() = default;
  virtual void OnBatch(const BatchEvent& /*event*/) {}
  virtual void OnJob(const JobEvent& /*event*/) {}
};

struct EngineStats {
  int64_t jobs_submitted = 0;
  int64_t jobs_succeeded = 0;
  int64_t jobs_failed = 0;     // non-OK results other than CANCELLED
  int64_t jobs_cancelled = 0;  // shutdown without drain, or submit after it
  int64_t batches = 0;
  int64_t batched_jobs = 0;    // sum of batch sizes (mean = batched_jobs/batches)
  int64_t max_batch_size = 0;
  int64_t retries = 0;
  int64_t pending = 0;         // queued, not yet dispatched
  double busy_seconds = 0;     // time inside backend calls
  double total_latency_seconds = 0;  // sum over finished jobs
  double max_latency_seconds = 0;
};

struct EngineOptions {
  // "auto" (CUDA when a device is present, else CPU), "cpu" or "cuda".
  std::string backend = "auto";
  // Longest time the oldest job of a group waits for batch-mates.
  int64_t batch_window_us = 200;
  // A group this large is dispatched at once; larger groups are split.
  int max_batch = 64;
  // CPU backend: worker threads (0 = all cores) and the size from which a
  // lone matrix uses multi-threaded OpenBLAS instead.
  int cpu_threads = 0;
  int threaded_blas_min_n = 512;
  // CUDA backend: device ordinal.
  int cuda_device = 0;
  // Shutdown runs queued jobs (true) or cancels them (false).
  bool drain_on_shutdown = true;
  // Optional; shared so the metrics layer may outlive or predate the engine.
  std::shared_ptr<EngineObserver> observer;
};

class BatchingInversionEngine final : public InversionEngine {
 public:
  BatchingInversionEngine(std::unique_ptr<InversionBackend> backend,
                          EngineOptions options);
  ~BatchingInversionEngine() override;  // Shutdown() and join
  BatchingInversionEngine(const BatchingInversionEngine&) = delete;
  BatchingInversionEngine& operator=(const BatchingInversionEngine&) = delete;

  DecompositionFuture<float> Submit(Eigen::MatrixXf matrix,
                                    DecompositionKind kind) override;
  DecompositionFuture<double> Submit(Eigen::MatrixXd matrix,
                                     DecompositionKind kind) override;
  absl::string_view backend_name() const override { return backend_->name(); }

  // Stops accepting jobs, drains or cancels the queue per options, waits for
  // the dispatcher. Idempotent; safe from any thread but the observer.
  void Shutdown();

  // While paused, jobs queue but no new batch starts (Shutdown overrides).
  // For deterministic tests and for operators who want to hold the engine.
  void Pause();
  void Resume();

  EngineStats stats() const;
  const EngineOptions& options() const { return options_; }

 private:
  using Clock = std::chrono::steady_clock;
  template <typename Scalar>
  struct TypedJob {
    MatrixX<Scalar> matrix;
    std::promise<absl::StatusOr<Decomposition<Scalar>>> promise;
  };
  struct Job {
    std::variant<TypedJob<float>, TypedJob<double>> typed;
    Clock::time_point enqueued;
  };
  using GroupKey = std::tuple<int64_t, DType, DecompositionKind>;

  template <typename Scalar>
  DecompositionFuture<Scalar> SubmitImpl(MatrixX<Scalar> matrix,
                                         DecompositionKind kind);
  void DispatcherLoop();
  template <typename Scalar>
  void RunGroup(const GroupKey& key, std::vector<Job>& jobs);
  void CancelJob(const GroupKey& key, Job& job, Clock::time_point now);
  void RecordJob(const JobEvent& event);

  const std::unique_ptr<InversionBackend> backend_;
  const EngineOptions options_;
  const Clock::duration window_;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::map<GroupKey, std::deque<Job>> groups_;
  int64_t pending_ = 0;
  bool paused_ = false;
  bool stopping_ = false;

  mutable std::mutex stats_mu_;
  EngineStats stats_;

  std::mutex shutdown_mu_;  // serialises Shutdown's join
  std::thread dispatcher_;
};

}  // namespace natgrad::engine

#endif  // NATGRAD_SERVER_ENGINE_BATCHING_ENGINE_H_
