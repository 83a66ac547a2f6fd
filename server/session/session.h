// One training job's optimizer state: its blocks, the step counter and the
// cached response to the last step (DESIGN.md §3: a retried step replays it,
// so at-least-once clients get exactly-once effect).
#ifndef NATGRAD_SERVER_SESSION_SESSION_H_
#define NATGRAD_SERVER_SESSION_SESSION_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "natgrad/v1/session.pb.h"
#include "natgrad/v1/step.pb.h"
#include "server/core/block.h"
#include "server/core/kfac/levenberg_marquardt_damping.h"
#include "server/engine/inversion_engine.h"
#include "server/linalg/compute_pool.h"

namespace natgrad::session {

// One block of a step, decoded from the wire. The wire dtype and shapes are
// kept so the reply matches what the client sent.
struct BlockStepData {
  std::string name;
  core::BlockStepInput input;
  natgrad::v1::DType reply_dtype = natgrad::v1::FLOAT32;
  std::vector<int64_t> reply_shape;       // the gradient's wire shape
  std::vector<int64_t> gaussian_shape1;   // [copies, dim]
  std::vector<int64_t> gaussian_shape2;   // [copies, dim, dim]
};

struct StepData {
  int64_t step = 0;
  // When the step's last message arrived (for StepTiming.server_micros).
  absl::Time received = absl::InfinitePast();
  std::optional<double> loss;
  std::vector<BlockStepData> blocks;
};

class Session {
 public:
  static absl::StatusOr<std::unique_ptr<Session>> Create(
      std::string id, std::string tenant, const natgrad::v1::SessionConfig& config,
      engine::InversionEngine* engine, linalg::ComputePool* compute_pool = nullptr);
  static absl::StatusOr<std::unique_ptr<Session>> Restore(
      const natgrad::v1::SessionSnapshot& snapshot, std::string id,
      engine::InversionEngine* engine, linalg::ComputePool* compute_pool = nullptr);

  const std::string& id() const { return id_; }
  std::string name() const { return "sessions/" + id_; }
  const std::string& tenant() const { return tenant_; }
  const natgrad::v1::SessionConfig& config() const { return config_; }

  // Applies step `data.step` if it is the next one, replays the cached
  // response if it is the last one, and otherwise fails with
  // FAILED_PRECONDITION. Any error leaves the session exactly as it was.
  absl::StatusOr<std::shared_ptr<const natgrad::v1::StepResponse>> Step(
      const StepData& data);

  natgrad::v1::Session Describe() const;
  natgrad::v1::SessionSnapshot Snapshot() const;

  // Called by the registry when the session is deleted: a stream that still
  // holds it gets NOT_FOUND for any further step.
  void MarkDeleted() { deleted_.store(true); }

  // One Step stream at a time (DESIGN.md §3).
  bool TryAttachStream();
  void DetachStream();

  int64_t last_step() const;
  int64_t StateBytes() const;
  // Steps applied since the last MarkCheckpointed (for checkpoint policy).
  int64_t StepsSinceCheckpoint() const;
  void MarkCheckpointed(int64_t step);

 private:
  struct NamedBlock {
    std::string name;
    std::unique_ptr<core::ParameterBlock> block;
  };

  Session(std::string id, std::string tenant, natgrad::v1::SessionConfig config,
          std::vector<NamedBlock> blocks, engine::InversionEngine* engine,
          linalg::ComputePool* compute_pool);

  absl::StatusOr<std::shared_ptr<const natgrad::v1::StepResponse>> ApplyLocked(
      const StepData& data) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status RestoreStateLocked(const natgrad::v1::SessionSnapshot& snapshot)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const std::string id_;
  const std::string tenant_;
  const natgrad::v1::SessionConfig config_;
  engine::InversionEngine* const engine_;
  // The server's compute pool, handed to every step (StepContext); may be null.
  linalg::ComputePool* const compute_pool_;
  std::atomic<bool> stream_open_{false};
  std::atomic<bool> deleted_{false};

  mutable absl::Mutex mu_;
  std::vector<NamedBlock> blocks_ ABSL_GUARDED_BY(mu_);
  int64_t last_step_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t checkpointed_step_ ABSL_GUARDED_BY(mu_) = 0;
  std::shared_ptr<const natgrad::v1::StepResponse> last_response_
      ABSL_GUARDED_BY(mu_);
  absl::Time create_time_ ABSL_GUARDED_BY(mu_);
  absl::Time update_time_ ABSL_GUARDED_BY(mu_);
  // Session-wide Levenberg-Marquardt damping (DESIGN.md §4.4), when enabled:
  // it needs the loss reported by the client and every block's predicted
  // change, so it lives here rather than in a block.
  std::optional<core::LevenbergMarquardtDamping> damping_ ABSL_GUARDED_BY(mu_);
};

}  // namespace natgrad::session

#endif  // NATGRAD_SERVER_SESSION_SESSION_H_
