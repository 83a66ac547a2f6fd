// CUDA backend (built when NATGRAD_WITH_CUDA; chosen at run time only when a
// device is present). No CUDA header leaks from here: the implementation and
// every cuSOLVER/cuBLAS type live in cuda_backend.cc.
//
//  - eigh: cusolverDnXsyevBatched on each same-n group, split so that
//    n·lda·batch ≤ INT32_MAX;
//  - Cholesky inverse: cusolverDn?potrfBatched, then two cublas?trsmBatched
//    (L⁻¹, then L⁻ᵀL⁻¹), symmetrised on the host;
//  - one stream, one cuSOLVER and one cuBLAS handle bound to it; device and
//    pinned host buffers cached per (kind, dtype, n, batch capacity);
//  - every info[] is read back; a job the GPU could not finish (info != 0 or
//    a non-finite result) is redone on the CPU with DecomposeLapack's
//    jitter/float64 ladder, and counts one extra retry.
#ifndef NATGRAD_SERVER_ENGINE_CUDA_BACKEND_H_
#define NATGRAD_SERVER_ENGINE_CUDA_BACKEND_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "server/engine/backend.h"

namespace natgrad::engine {

struct CudaBackendOptions {
  int device = 0;
  int max_cached_workspaces = 8;  // LRU bound on cached buffer sets
};

class CudaBackend final : public InversionBackend {
 public:
  // Fails (FAILED_PRECONDITION / INTERNAL) when the device or the libraries
  // cannot be initialised.
  static absl::StatusOr<std::unique_ptr<CudaBackend>> Create(
      CudaBackendOptions options = {});
  ~CudaBackend() override;

  absl::string_view name() const override { return "cuda"; }
  void Run(DecompositionKind kind, absl::Span<BatchJob<float>> jobs) override;
  void Run(DecompositionKind kind, absl::Span<BatchJob<double>> jobs) override;

  // e.g. "device 0: NVIDIA H100 80GB HBM3 (sm_90, 79 GiB)".
  const std::string& description() const;
  // Jobs redone on the CPU since creation (for tests and logs).
  int64_t cpu_fallbacks() const;

  struct Impl;

 private:
  explicit CudaBackend(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Number of CUDA devices visible to this process. A runtime error (no driver,
// no device) comes back as a non-OK status whose message says why.
absl::StatusOr<int> CudaDeviceCount();

}  // namespace natgrad::engine

#endif  // NATGRAD_SERVER_ENGINE_CUDA_BACKEND_H_
