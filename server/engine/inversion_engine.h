// The inversion engine's interface (server/engine/README.md): blocks of every session
// submit symmetric PSD matrices and get futures of their decompositions. It
// knows only matrices; implementations batch jobs and pick CPU or GPU.
#ifndef NATGRAD_SERVER_ENGINE_INVERSION_ENGINE_H_
#define NATGRAD_SERVER_ENGINE_INVERSION_ENGINE_H_

#include <future>

#include "Eigen/Core"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace natgrad::engine {

enum class DecompositionKind {
  // A = Q diag(s) Q^T with s ascending and clamped at 0.
  kEigh,
  // A^-1 through Cholesky (?potrf + ?potri); A must be positive definite.
  kCholeskyInverse,
};

template <typename Scalar>
struct Decomposition {
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;
  using Vector = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;
  DecompositionKind kind = DecompositionKind::kEigh;
  Vector eigenvalues;  // kEigh only
  Matrix matrix;       // eigenvectors (kEigh) or the inverse (kCholeskyInverse)
  int retries = 0;     // solver failures recovered from (jitter, float64)
};

template <typename Scalar>
using DecompositionFuture = std::future<absl::StatusOr<Decomposition<Scalar>>>;

class InversionEngine {
 public:
  virtual ~InversionEngine() = default;

  // The input is symmetrised before decomposing. Non-finite input fails the
  // job alone with INVALID_ARGUMENT; the future always becomes ready.
  virtual DecompositionFuture<float> Submit(Eigen::MatrixXf matrix,
                                            DecompositionKind kind) = 0;
  virtual DecompositionFuture<double> Submit(Eigen::MatrixXd matrix,
                                             DecompositionKind kind) = 0;

  // "cpu" or "cuda".
  virtual absl::string_view backend_name() const = 0;
};

}  // namespace natgrad::engine

#endif  // NATGRAD_SERVER_ENGINE_INVERSION_ENGINE_H_
