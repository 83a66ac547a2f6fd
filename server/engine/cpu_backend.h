// CPU backend: LAPACKE ?syevd / ?potrf+?potri (server/engine/README.md).
//
// Many independent matrices: one matrix per pool thread with OpenBLAS set to
// one thread, so each LAPACK call runs on its caller and the calls run side by
// side. A lone large matrix (fewer jobs than threads and n >=
// threaded_blas_min_n): OpenBLAS threads = pool size, jobs one after another,
// then OpenBLAS back to one thread.
//
// OpenBLAS 0.3.21 (Debian's libopenblas0-pthread) only has a process-global
// openblas_set_num_threads, so the backend flips that global per batch
// (linalg::SetBlasThreads; the whole policy is server/linalg/thread_policy.h).
// It is correct whatever the setting (concurrent callers of a multi-threaded
// OpenBLAS queue on its internal lock), only the speed differs; another
// OpenBLAS user in the process sees the last value set here. The pool is a
// linalg::ComputePool of the backend's own.
#ifndef NATGRAD_SERVER_ENGINE_CPU_BACKEND_H_
#define NATGRAD_SERVER_ENGINE_CPU_BACKEND_H_

#include <chrono>
#include <cstdint>
#include <mutex>

#include "server/engine/backend.h"
#include "server/linalg/compute_pool.h"

namespace natgrad::engine {

struct CpuBackendOptions {
  int threads = 0;                // 0: std::thread::hardware_concurrency()
  int threaded_blas_min_n = 512;  // below this a lone matrix stays 1-thread
};

class CpuBackend final : public InversionBackend {
 public:
  explicit CpuBackend(CpuBackendOptions options = {});
  ~CpuBackend() override;
  CpuBackend(const CpuBackend&) = delete;
  CpuBackend& operator=(const CpuBackend&) = delete;

  absl::string_view name() const override { return "cpu"; }
  void Run(DecompositionKind kind, absl::Span<BatchJob<float>> jobs) override;
  void Run(DecompositionKind kind, absl::Span<BatchJob<double>> jobs) override;

  int threads() const { return pool_.parallelism(); }

 private:
  template <typename Scalar>
  void RunImpl(DecompositionKind kind, absl::Span<BatchJob<Scalar>> jobs);

  // A batch smaller than the pool that starts within this long after a
  // pool-parallel batch ended runs single-threaded too (see RunImpl).
  static constexpr std::chrono::milliseconds kStreamingWindow{200};

  // The backend's own workers (the caller of Run is the first); not the
  // server's compute pool, so decompositions and step math do not queue
  // behind each other.
  linalg::ComputePool pool_;
  const int threaded_blas_min_n_;
  // End of the last batch run one matrix per thread (under run_mu_).
  std::chrono::steady_clock::time_point last_parallel_end_{};

  std::mutex run_mu_;  // one batch at a time per backend
};

}  // namespace natgrad::engine

#endif  // NATGRAD_SERVER_ENGINE_CPU_BACKEND_H_
