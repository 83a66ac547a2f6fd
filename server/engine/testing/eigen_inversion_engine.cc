#include "server/engine/testing/eigen_inversion_engine.h"

#include <memory>
#include <utility>

#include "Eigen/Cholesky"
#include "Eigen/Eigenvalues"
#include "absl/status/status.h"

namespace natgrad::core::testing {

template <typename Scalar>
absl::StatusOr<engine::Decomposition<Scalar>> EigenInversionEngine::Decompose(
    Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic> matrix,
    engine::DecompositionKind kind) {
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;
  if (matrix.rows() != matrix.cols()) {
    return absl::InvalidArgumentError("matrix is not square");
  }
  // Refuse non-finite input before it reaches a solver (server/engine/README.md).
  if (!matrix.allFinite()) {
    return absl::InvalidArgumentError("matrix has non-finite values");
  }
  Matrix sym = (matrix + matrix.transpose()) * Scalar(0.5);
  engine::Decomposition<Scalar> out;
  out.kind = kind;
  if (kind == engine::DecompositionKind::kEigh) {
    Eigen::SelfAdjointEigenSolver<Matrix> eig(sym);
    if (eig.info() != Eigen::Success) {
      return absl::InternalError("eigensolver did not converge");
    }
    out.eigenvalues = eig.eigenvalues().cwiseMax(Scalar(0));  // ascending
    out.matrix = eig.eigenvectors();
  } else {
    Eigen::LLT<Matrix> llt(sym);
    if (llt.info() != Eigen::Success) {
      return absl::InvalidArgumentError("matrix is not positive definite");
    }
    out.matrix = llt.solve(Matrix::Identity(sym.rows(), sym.cols()));
    out.matrix = (out.matrix + out.matrix.transpose()).eval() * Scalar(0.5);
  }
  return out;
}

template <typename Scalar>
engine::DecompositionFuture<Scalar> EigenInversionEngine::SubmitImpl(
    Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic> matrix,
    engine::DecompositionKind kind) {
  ++submitted_;
  auto job = [m = std::move(matrix), kind, computed = computed_]() mutable {
    ++*computed;
    return Decompose<Scalar>(std::move(m), kind);
  };
  if (lazy_) return std::async(std::launch::deferred, std::move(job));
  std::promise<absl::StatusOr<engine::Decomposition<Scalar>>> promise;
  promise.set_value(job());
  return promise.get_future();
}

engine::DecompositionFuture<float> EigenInversionEngine::Submit(
    Eigen::MatrixXf matrix, engine::DecompositionKind kind) {
  return SubmitImpl<float>(std::move(matrix), kind);
}

engine::DecompositionFuture<double> EigenInversionEngine::Submit(
    Eigen::MatrixXd matrix, engine::DecompositionKind kind) {
  return SubmitImpl<double>(std::move(matrix), kind);
}

template absl::StatusOr<engine::Decomposition<float>>
EigenInversionEngine::Decompose<float>(Eigen::MatrixXf,
                                       engine::DecompositionKind);
template absl::StatusOr<engine::Decomposition<double>>
EigenInversionEngine::Decompose<double>(Eigen::MatrixXd,
                                        engine::DecompositionKind);

}  // namespace natgrad::core::testing
