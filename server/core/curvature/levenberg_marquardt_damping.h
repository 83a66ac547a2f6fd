// Levenberg-Marquardt adaptation of the K-FAC damping (Martens & Grosse 2015
// §6.5; kfac-jax's damping adaptation), session-wide.
//
// rho = (actual change of the loss) / (change predicted by the quadratic
// model, summed over the blocks' PredictedReduction). Every `interval` steps:
//   rho > 3/4: lambda <- omega lambda;  rho < 1/4: lambda <- lambda / omega;
// omega = decay^interval < 1, lambda clipped to [min_damping, max_damping].
//
// The loss the client reports with step t is measured at the parameters
// after step t-1's update, so the update of a measured step t (t % interval
// == 0) is judged when step t+1 arrives with its loss:
//   LevenbergMarquardtDamping lm = session_lm;      // copy: steps may fail
//   context.damping_override = lm.BeginStep(t, loss);
//   ... Propose every block; nu from KL clipping; Commit(nu) every block ...
//   lm.EndStep(t, sum of PredictedReduction(nu) over the blocks);
//   session_lm = lm;                                // only once committed
// A missing loss at t or t+1 skips that measurement.
#ifndef NATGRAD_SERVER_CORE_CURVATURE_LEVENBERG_MARQUARDT_DAMPING_H_
#define NATGRAD_SERVER_CORE_CURVATURE_LEVENBERG_MARQUARDT_DAMPING_H_

#include <cstdint>
#include <map>
#include <optional>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace natgrad::core {

// Zero means the default, as in natgrad.v1.AdaptiveDampingConfig.
struct LevenbergMarquardtOptions {
  // Required (> 0): the session takes it from the blocks' damping at step 1.
  double initial_damping = 0;
  int64_t interval = 5;       // kfac-jax damping_adaptation_interval
  double decay = 0.95;        // omega = decay^interval (Martens & Grosse 19/20)
  double min_damping = 1e-8;
  double max_damping = 1e3;
};

class LevenbergMarquardtDamping {
 public:
  // Fills defaults and validates (INVALID_ARGUMENT naming the field); the
  // initial damping is clipped into [min_damping, max_damping].
  static absl::StatusOr<LevenbergMarquardtDamping> Create(
      const LevenbergMarquardtOptions& options);

  // Judges the last measured update if step t-1 was measured and `loss` is
  // given, then returns lambda for step t.
  double BeginStep(int64_t step, std::optional<double> loss);
  // Records the committed update of step t (its summed predicted change)
  // when step t is measured and its loss was given to BeginStep.
  void EndStep(int64_t step, double predicted_change);
  // Whether BeginStep(step, loss) depends on `loss` (step - 1's update waits
  // to be judged); otherwise it returns damping() whatever the loss.
  bool JudgesAt(int64_t step) const {
    return measured_step_ > 0 && measured_step_ == step - 1 && measured_change_ < 0;
  }

  double damping() const { return damping_; }
  double omega() const { return omega_; }
  const LevenbergMarquardtOptions& options() const { return options_; }
  // rho of the last judged update, if any.
  std::optional<double> last_rho() const { return last_rho_; }

  // Names: damping, measured_step (0: none), measured_loss,
  // measured_change, last_rho (absent until one is judged).
  std::map<std::string, double> ExportState() const;
  absl::Status ImportState(const std::map<std::string, double>& state);

 private:
  explicit LevenbergMarquardtDamping(const LevenbergMarquardtOptions& options);

  LevenbergMarquardtOptions options_;
  double omega_ = 1;
  double damping_ = 0;
  // The measured update waiting for the next step's loss.
  int64_t measured_step_ = 0;
  double measured_loss_ = 0;
  double measured_change_ = 0;
  std::optional<double> last_rho_;
  // Between BeginStep and EndStep of one step; not state.
  int64_t current_step_ = 0;
  std::optional<double> current_loss_;
};

}  // namespace natgrad::core

#endif  // NATGRAD_SERVER_CORE_CURVATURE_LEVENBERG_MARQUARDT_DAMPING_H_
