// A backend decomposes one group of same-size, same-dtype, same-kind jobs at
// once. The BatchingInversionEngine forms the groups; backends only compute.
#ifndef NATGRAD_SERVER_ENGINE_BACKEND_H_
#define NATGRAD_SERVER_ENGINE_BACKEND_H_

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "server/engine/inversion_engine.h"
#include "server/engine/lapack_kernels.h"

namespace natgrad::engine {

template <typename Scalar>
struct BatchJob {
  MatrixX<Scalar> matrix;  // input; the backend may consume it
  absl::StatusOr<Decomposition<Scalar>> result =
      absl::UnknownError("job was not run");
};

class InversionBackend {
 public:
  virtual ~InversionBackend() = default;

  // "cpu" or "cuda"; also the label metrics see.
  virtual absl::string_view name() const = 0;

  // All jobs of one call share n, dtype and kind. Sets every job's result; a
  // job that fails (non-finite input, unrecoverable solver failure) fails
  // alone. Should not throw; the engine still catches so futures never hang.
  virtual void Run(DecompositionKind kind, absl::Span<BatchJob<float>> jobs) = 0;
  virtual void Run(DecompositionKind kind, absl::Span<BatchJob<double>> jobs) = 0;
};

}  // namespace natgrad::engine

#endif  // NATGRAD_SERVER_ENGINE_BACKEND_H_
