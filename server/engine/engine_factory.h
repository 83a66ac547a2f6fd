// The one way the server builds its engine: picks the backend from
// EngineOptions::backend and says why, so main() can log it.
#ifndef NATGRAD_SERVER_ENGINE_ENGINE_FACTORY_H_
#define NATGRAD_SERVER_ENGINE_ENGINE_FACTORY_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "server/engine/batching_engine.h"

namespace natgrad::engine {

struct CreatedEngine {
  std::unique_ptr<BatchingInversionEngine> engine;
  std::string backend;  // "cpu" or "cuda"
  std::string reason;   // e.g. "auto: no CUDA device (cudaGetDeviceCount: ...)"
};

// backend "auto": CUDA when built with it and cudaGetDeviceCount > 0 (and the
// device initialises), else CPU. "cpu": CPU. "cuda": CUDA or
// FAILED_PRECONDITION saying why not. Anything else, or max_batch < 1:
// INVALID_ARGUMENT.
absl::StatusOr<CreatedEngine> CreateInversionEngine(const EngineOptions& options);

// Whether this build contains the CUDA backend.
bool BuiltWithCuda();

}  // namespace natgrad::engine

#endif  // NATGRAD_SERVER_ENGINE_ENGINE_FACTORY_H_
