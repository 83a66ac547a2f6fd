#include "server/engine/engine_factory.h"

#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "server/engine/cpu_backend.h"
#if NATGRAD_ENGINE_HAS_CUDA
#include "server/engine/cuda_backend.h"
#endif

namespace natgrad::engine {
namespace {

CreatedEngine MakeCpu(const EngineOptions& options, std::string reason) {
  CpuBackendOptions cpu;
  cpu.threads = options.cpu_threads;
  cpu.threaded_blas_min_n = options.threaded_blas_min_n;
  auto backend = std::make_unique<CpuBackend>(cpu);
  reason = absl::StrCat(reason, "; ", backend->threads(), " LAPACK threads");
  return CreatedEngine{
      std::make_unique<BatchingInversionEngine>(std::move(backend), options), "cpu",
      std::move(reason)};
}

}  // namespace

bool BuiltWithCuda() { return NATGRAD_ENGINE_HAS_CUDA != 0; }

absl::StatusOr<CreatedEngine> CreateInversionEngine(const EngineOptions& options) {
  if (options.max_batch < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("engine max_batch must be >= 1, got ", options.max_batch));
  }
  if (options.batch_window_us < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "engine batch window must be >= 0 us, got ", options.batch_window_us));
  }
  const std::string which = absl::AsciiStrToLower(options.backend);
  if (which == "cpu") return MakeCpu(options, "backend 'cpu' requested");
  if (which != "auto" && which != "cuda") {
    return absl::InvalidArgumentError(absl::StrCat(
        "unknown inversion backend '", options.backend, "' (want auto, cpu or cuda)"));
  }
  const bool required = which == "cuda";
#if NATGRAD_ENGINE_HAS_CUDA
  absl::StatusOr<int> count = CudaDeviceCount();
  std::string why;
  if (!count.ok()) {
    why = absl::StrCat("no usable CUDA device (", count.status().message(), ")");
  } else if (*count == 0) {
    why = "no CUDA device (cudaGetDeviceCount = 0)";
  } else {
    CudaBackendOptions cuda;
    cuda.device = options.cuda_device;
    absl::StatusOr<std::unique_ptr<CudaBackend>> backend = CudaBackend::Create(cuda);
    if (backend.ok()) {
      std::string reason = absl::StrCat(required ? "backend 'cuda' requested" : "auto",
                                        ": ", *count, " CUDA device(s); using ",
                                        (*backend)->description());
      return CreatedEngine{
          std::make_unique<BatchingInversionEngine>(*std::move(backend), options), "cuda",
          std::move(reason)};
    }
    why = absl::StrCat("CUDA device present but unusable: ", backend.status().message());
  }
#else
  const std::string why = "built without CUDA (NATGRAD_WITH_CUDA=OFF)";
#endif
  if (required) {
    return absl::FailedPreconditionError(absl::StrCat("backend 'cuda' requested but ", why));
  }
  return MakeCpu(options, absl::StrCat("auto: ", why, "; using CPU"));
}

}  // namespace natgrad::engine
