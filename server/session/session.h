// One training job's optimizer state: its blocks, the step counter and the
// cached reply to the last step (a retried step replays it, so at-least-once
// clients get exactly-once effect). Works on core types: the service decodes
// requests and encodes replies (docs/architecture.md).
#ifndef NATGRAD_SERVER_SESSION_SESSION_H_
#define NATGRAD_SERVER_SESSION_SESSION_H_

#include <atomic>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"
#include "absl/time/time.h"
#include "natgrad/v1/session.pb.h"
#include "natgrad/v1/step.pb.h"
#include "server/core/block.h"
#include "server/core/curvature/levenberg_marquardt_damping.h"
#include "server/engine/inversion_engine.h"
#include "server/linalg/compute_pool.h"

namespace natgrad::session {

// One block of a step, decoded by the service into its kind's core input.
struct BlockStepData {
  std::string name;
  core::BlockStepInput input;
};

struct StepData {
  int64_t step = 0;
  std::optional<double> loss;
  // Blocks left out of the step keep their state (docs/architecture.md).
  std::vector<BlockStepData> blocks;
};

// One block's part of an applied step.
struct BlockResult {
  size_t index = 0;  // in the session config
  std::string name;
  core::BlockStepOutput output;
};

// What applying a step produced, on core types; the service encodes it.
struct StepResult {
  int64_t step = 0;
  std::vector<BlockResult> blocks;  // config order, omitted blocks absent
  double kl_clip_scale = 1.0;       // 1 when KL clipping is off
  std::optional<double> damping;    // adaptive damping used, when on
  int64_t compute_micros = 0;
  int64_t inversion_micros = 0;
};

// The reply a step got, as the service encoded it. The session keeps the
// last one so a retried step replays it, and snapshots its bytes; it never
// looks inside.
class CachedReply {
 public:
  virtual ~CachedReply() = default;
  virtual std::string Serialized() const = 0;
};

// A reply known only by its bytes (restored from a snapshot).
class SerializedReply final : public CachedReply {
 public:
  explicit SerializedReply(std::string bytes) : bytes_(std::move(bytes)) {}
  std::string Serialized() const override { return bytes_; }

 private:
  std::string bytes_;
};

struct StepOutcome {
  bool replayed = false;
  std::shared_ptr<const CachedReply> reply;
};

// Turns a freshly applied step into the reply to cache and send; it may move
// the blocks' outputs (their deltas' bytes) into the reply.
using ReplyEncoder =
    absl::FunctionRef<std::shared_ptr<const CachedReply>(StepResult&)>;

class Session;

// A step applied as its messages arrive (Session::BeginStep): each earlier
// message's blocks are validated and proposed at once, the last message's
// blocks and the session-wide transforms run in Session::FinishStep, and
// nothing is committed before that. It holds the blocks sent so far and
// their proposed updates; dropping it leaves the session as it was. One
// thread at a time; the session must outlive it.
class StepInProgress {
 public:
  int64_t step() const { return step_; }

 private:
  friend class Session;
  StepInProgress(Session* session, int64_t step, size_t num_blocks)
      : session_(session), step_(step), slot_(num_blocks, nullptr), pending_(num_blocks) {}

  Session* const session_;
  const int64_t step_;
  bool finished_ = false;
  // Earlier messages' blocks, in arrival order (a deque keeps their
  // addresses: slot_ points into it).
  std::deque<BlockStepData> owned_;
  size_t blocks_sent_ = 0;
  // By config index: the block's input this step (null: not sent).
  std::vector<const BlockStepData*> slot_;
  // The first unknown or repeated block name, in arrival order: it is the
  // step's error whatever the proposals say (as in one-shot Session::Step).
  std::optional<absl::Status> name_error_;
  // The session's last step when the proposals below were made (-1: none
  // yet); they are valid only while it has not moved.
  int64_t proposed_after_ = -1;
  // By config index: proposals made so far.
  std::vector<std::unique_ptr<core::PendingBlockUpdate>> pending_;
  // The failing proposal with the lowest config index (the one Step's
  // config-order pass reports); nothing above it needs proposing.
  size_t error_index_ = SIZE_MAX;
  absl::Status error_;
  // The damping_override the early proposals used (Levenberg-Marquardt on).
  std::optional<double> early_damping_;
  // Whether this step's damping depends on its loss: then the proposals of
  // blocks that damping drives wait for FinishStep.
  bool defer_damped_ = false;
  absl::Duration compute_;
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

  // Applies step `data.step` if it is the next one (then `encode` makes the
  // reply, which is cached), returns the cached reply if it is the last one,
  // and otherwise fails with FAILED_PRECONDITION. Any error leaves the
  // session exactly as it was.
  // A thin wrapper: BeginStep(data.step), then FinishStep with every block.
  absl::StatusOr<StepOutcome> Step(const StepData& data, ReplyEncoder encode);

  // The same step message by message: BeginStep at the first message,
  // ProposeBlocks for each message before the last (its blocks are validated
  // and proposed now, without touching the session), and FinishStep with
  // the last message's blocks and the step's loss. The outcome, results and
  // errors are exactly Step's with all the blocks in arrival order: whether
  // the step is next, a replay or out of order is reported by FinishStep;
  // proposal errors are kept and the one Step would report is returned
  // there. Proposals made before the loss is known see no `loss` in their
  // context (no block reads it), and when Levenberg-Marquardt damping may
  // change with this step's loss, the blocks it drives (kinds with an
  // InitialDamping) are proposed in FinishStep instead.
  std::unique_ptr<StepInProgress> BeginStep(int64_t step);
  // Never fails by itself: an error is the step's, reported by FinishStep.
  // Returns how many of `blocks` it proposed now (the rest wait for
  // FinishStep or are not needed). If it throws (std::bad_alloc), drop
  // `step`: nothing was applied.
  size_t ProposeBlocks(StepInProgress& step, std::vector<BlockStepData> blocks);
  absl::StatusOr<StepOutcome> FinishStep(StepInProgress& step, std::optional<double> loss,
                                         absl::Span<const BlockStepData> last_blocks,
                                         ReplyEncoder encode);

  natgrad::v1::Session Describe() const;
  natgrad::v1::SessionSnapshot Snapshot() const;

  // Called by the registry when the session is deleted: a stream that still
  // holds it gets NOT_FOUND for any further step.
  void MarkDeleted() { deleted_.store(true); }
  // Checkpoint writes ask this under the file lock (CheckpointStore::Write).
  bool deleted() const { return deleted_.load(); }

  // One Step stream at a time (docs/architecture.md).
  bool TryAttachStream();
  void DetachStream();

  int64_t last_step() const;
  int64_t StateBytes() const;
  // Steps applied since the last MarkCheckpointed (for checkpoint policy).
  int64_t StepsSinceCheckpoint() const;
  void MarkCheckpointed(int64_t step);
  // The last step MarkCheckpointed recorded (a restored session: its
  // snapshot's step). Meaningful only when the server writes checkpoints.
  int64_t durable_step() const;

 private:
  struct NamedBlock {
    std::string name;
    std::unique_ptr<core::ParameterBlock> block;
  };

  Session(std::string id, std::string tenant, natgrad::v1::SessionConfig config,
          std::vector<NamedBlock> blocks, std::vector<bool> damped,
          engine::InversionEngine* engine,
          linalg::ComputePool* compute_pool);

  // Step's checks before any block: deleted, replay, order. Sets `replay`
  // to the cached reply for a retried step.
  absl::Status CheckStepLocked(int64_t step, std::shared_ptr<const CachedReply>* replay) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Records `blocks`' names in `step` (config slots, name errors) and returns
  // the config indices they fill.
  std::vector<size_t> AddBlocksLocked(StepInProgress& step,
                                      const std::vector<const BlockStepData*>& blocks) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Proposes the given config slots of `step`, side by side on the compute
  // pool when there is one, skipping those above its lowest failure; the
  // outcome is that of proposing them in config order.
  // Returns how many it proposed (failures included).
  size_t ProposeLocked(StepInProgress& step, absl::Span<const size_t> indices,
                       const core::StepContext& context) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void ResetProposalsLocked(StepInProgress& step) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  core::StepContext ContextFor(int64_t step) const;
  absl::Status RestoreStateLocked(const natgrad::v1::SessionSnapshot& snapshot)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const std::string id_;
  const std::string tenant_;
  const natgrad::v1::SessionConfig config_;
  // By config index: whether Levenberg-Marquardt damping drives the block
  // (its kind has an InitialDamping), so its proposal reads damping_override.
  const std::vector<bool> damped_;
  // Block name -> config index (fixed at creation).
  std::map<std::string, size_t> block_index_;
  engine::InversionEngine* const engine_;
  // The server's compute pool, handed to every step (StepContext); may be null.
  linalg::ComputePool* const compute_pool_;
  std::atomic<bool> stream_open_{false};
  std::atomic<bool> deleted_{false};

  mutable absl::Mutex mu_;
  std::vector<NamedBlock> blocks_ ABSL_GUARDED_BY(mu_);
  int64_t last_step_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t checkpointed_step_ ABSL_GUARDED_BY(mu_) = 0;
  std::shared_ptr<const CachedReply> last_reply_ ABSL_GUARDED_BY(mu_);
  absl::Time create_time_ ABSL_GUARDED_BY(mu_);
  absl::Time update_time_ ABSL_GUARDED_BY(mu_);
  // Session-wide Levenberg-Marquardt damping (docs/math.md), when enabled:
  // it needs the loss reported by the client and every block's predicted
  // change, so it lives here rather than in a block.
  std::optional<core::LevenbergMarquardtDamping> damping_ ABSL_GUARDED_BY(mu_);
};

}  // namespace natgrad::session

#endif  // NATGRAD_SERVER_SESSION_SESSION_H_
