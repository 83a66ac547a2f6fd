// A test double of engine::InversionEngine on Eigen's dense solvers
// (SelfAdjointEigenSolver, LLT): no batching, no threads. The real batched
// engine lives in server/engine; core tests and benches use this one.
//
// Eager mode (default) returns ready futures. Lazy mode returns deferred
// futures that compute only when waited on, so tests can observe a block
// preconditioning with a stale decomposition while a refresh is "in flight".
#ifndef NATGRAD_SERVER_ENGINE_TESTING_EIGEN_INVERSION_ENGINE_H_
#define NATGRAD_SERVER_ENGINE_TESTING_EIGEN_INVERSION_ENGINE_H_

#include <atomic>
#include <memory>

#include "server/engine/inversion_engine.h"

namespace natgrad::core::testing {

class EigenInversionEngine final : public engine::InversionEngine {
 public:
  explicit EigenInversionEngine(bool lazy = false) : lazy_(lazy) {}

  engine::DecompositionFuture<float> Submit(
      Eigen::MatrixXf matrix, engine::DecompositionKind kind) override;
  engine::DecompositionFuture<double> Submit(
      Eigen::MatrixXd matrix, engine::DecompositionKind kind) override;
  absl::string_view backend_name() const override { return "cpu"; }

  // Jobs submitted so far, and jobs actually computed (lazy ones count when
  // first waited on).
  int submitted() const { return submitted_.load(); }
  int computed() const { return computed_->load(); }

  // The decomposition itself, synchronously (shared with the benches).
  template <typename Scalar>
  static absl::StatusOr<engine::Decomposition<Scalar>> Decompose(
      Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic> matrix,
      engine::DecompositionKind kind);

 private:
  template <typename Scalar>
  engine::DecompositionFuture<Scalar> SubmitImpl(
      Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic> matrix,
      engine::DecompositionKind kind);

  bool lazy_;
  std::atomic<int> submitted_{0};
  // Shared so deferred jobs may outlive a moved-from counter safely.
  std::shared_ptr<std::atomic<int>> computed_ =
      std::make_shared<std::atomic<int>>(0);
};

}  // namespace natgrad::core::testing

#endif  // NATGRAD_SERVER_ENGINE_TESTING_EIGEN_INVERSION_ENGINE_H_
