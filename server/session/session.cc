#include "server/session/session.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <map>
#include <new>
#include <optional>
#include <set>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "google/protobuf/util/time_util.h"
#include "server/core/curvature/kl_clipping.h"
#include "server/blocks/registry.h"
#include "server/core/block_error.h"
#include "server/wire/schedule_codec.h"
#include "server/wire/tensor_codec.h"

namespace natgrad::session {
namespace {

using google::protobuf::util::TimeUtil;

// Bumped when SessionSnapshot's meaning changes; readers refuse newer ones.
constexpr int kSnapshotFormat = 1;
constexpr absl::string_view kDampingPrefix = "damping.";

// Levenberg-Marquardt options from the config; the initial damping is the
// first K-FAC block's damping schedule at step 1.
absl::StatusOr<std::optional<core::LevenbergMarquardtDamping>> NewAdaptiveDamping(
    const natgrad::v1::SessionConfig& config) {
  const auto& ad = config.adaptive_damping();
  if (!ad.enabled()) return std::nullopt;
  core::LevenbergMarquardtOptions o;
  // The first block with a curvature model sets the starting damping.
  for (const auto& b : config.blocks()) {
    auto kind = blocks::KindOf(b, "config.blocks");
    if (!kind.ok()) return kind.status();
    if (std::optional<double> d = (*kind)->InitialDamping(b)) {
      o.initial_damping = *d;
      break;
    }
  }
  if (ad.interval() > 0) o.interval = ad.interval();
  if (ad.decay() > 0) o.decay = ad.decay();
  if (ad.min_damping() > 0) o.min_damping = ad.min_damping();
  if (ad.max_damping() > 0) o.max_damping = ad.max_damping();
  auto lm = core::LevenbergMarquardtDamping::Create(o);
  if (!lm.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("config.adaptive_damping: ", lm.status().message()));
  }
  return std::optional<core::LevenbergMarquardtDamping>(*std::move(lm));
}

google::protobuf::Timestamp ToProto(absl::Time t) {
  return TimeUtil::NanosecondsToTimestamp(absl::ToUnixNanos(t));
}
absl::Time FromProto(const google::protobuf::Timestamp& t) {
  return absl::FromUnixNanos(TimeUtil::TimestampToNanoseconds(t));
}

}  // namespace

Session::Session(std::string id, std::string tenant,
                 natgrad::v1::SessionConfig config,
                 std::vector<NamedBlock> blocks, std::vector<bool> damped,
                 engine::InversionEngine* engine,
                 linalg::ComputePool* compute_pool)
    : id_(std::move(id)),
      tenant_(std::move(tenant)),
      config_(std::move(config)),
      damped_(std::move(damped)),
      engine_(engine),
      compute_pool_(compute_pool),
      blocks_(std::move(blocks)),
      create_time_(absl::Now()),
      update_time_(create_time_) {
  for (size_t i = 0; i < blocks_.size(); ++i) block_index_[blocks_[i].name] = i;
}

absl::StatusOr<std::unique_ptr<Session>> Session::Create(
    std::string id, std::string tenant, const natgrad::v1::SessionConfig& config,
    engine::InversionEngine* engine, linalg::ComputePool* compute_pool) {
  if (absl::Status s = blocks::ValidateSessionConfig(config); !s.ok()) return s;
  natgrad::v1::SessionConfig canonical = config;
  std::vector<NamedBlock> blocks;
  std::vector<bool> damped;
  for (int i = 0; i < canonical.blocks_size(); ++i) {
    auto* b = canonical.mutable_blocks(i);
    const std::string field = absl::StrCat("config.blocks[", i, "]");
    auto kind = blocks::KindOf(*b, field);
    if (!kind.ok()) return kind.status();
    if (b->shape_size() == 0) {
      for (int64_t d : (*kind)->CanonicalShape(*b)) b->add_shape(d);
    }
    auto block = (*kind)->NewBlock(*b, canonical.state_dtype(), field);
    if (!block.ok()) return block.status();
    blocks.push_back({b->name(), *std::move(block)});
    damped.push_back((*kind)->InitialDamping(*b).has_value());
  }
  auto damping = NewAdaptiveDamping(canonical);
  if (!damping.ok()) return damping.status();
  auto session = std::unique_ptr<Session>(new Session(
      std::move(id), std::move(tenant), std::move(canonical), std::move(blocks), std::move(damped),
      engine, compute_pool));
  absl::MutexLock lock(&session->mu_);
  session->damping_ = *std::move(damping);
  return session;
}

absl::StatusOr<std::unique_ptr<Session>> Session::Restore(
    const natgrad::v1::SessionSnapshot& snapshot, std::string id,
    engine::InversionEngine* engine, linalg::ComputePool* compute_pool) {
  if (snapshot.format_version() != kSnapshotFormat) {
    return absl::InvalidArgumentError(absl::StrCat(
        "snapshot.format_version: ", snapshot.format_version(),
        " is not supported (want ", kSnapshotFormat, ")"));
  }
  auto session = Create(std::move(id), snapshot.tenant(), snapshot.config(), engine,
                        compute_pool);
  if (!session.ok()) return session.status();
  Session& s = **session;
  absl::MutexLock lock(&s.mu_);
  if (absl::Status st = s.RestoreStateLocked(snapshot); !st.ok()) return st;
  return session;
}

absl::Status Session::RestoreStateLocked(
    const natgrad::v1::SessionSnapshot& snapshot) {
  if (snapshot.last_step() < 0) {
    return absl::InvalidArgumentError("snapshot.last_step: negative");
  }
  if (snapshot.blocks_size() != static_cast<int>(blocks_.size())) {
    return absl::InvalidArgumentError(absl::StrCat(
        "snapshot.blocks: ", snapshot.blocks_size(), " blocks, config has ",
        blocks_.size()));
  }
  for (int i = 0; i < snapshot.blocks_size(); ++i) {
    const auto& bs = snapshot.blocks(i);
    const std::string field = absl::StrCat("snapshot.blocks[", i, "]");
    if (bs.name() != blocks_[i].name) {
      return absl::InvalidArgumentError(absl::StrCat(
          field, ".name: \"", bs.name(), "\", want \"", blocks_[i].name, "\""));
    }
    core::BlockState state;
    for (const auto& [key, tensor] : bs.tensors()) {
      const std::string tf = absl::StrCat(field, ".tensors[", key, "]");
      if (absl::Status st = wire::ValidateTensor(tensor, tf); !st.ok()) return st;
      state.tensors[key] = wire::DecodeMatrix(tensor);
    }
    for (const auto& [key, value] : bs.scalars()) state.scalars[key] = value;
    if (absl::Status st = blocks_[i].block->ImportState(state); !st.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, ": ", st.message()));
    }
  }
  if (!snapshot.last_response().empty()) {
    // Opaque here; the service checks it parses before importing.
    last_reply_ = std::make_shared<SerializedReply>(snapshot.last_response());
  }
  last_step_ = snapshot.last_step();
  checkpointed_step_ = last_step_;
  if (damping_.has_value()) {
    std::map<std::string, double> state;
    for (const auto& [k, v] : snapshot.session_scalars()) {
      if (absl::StartsWith(k, kDampingPrefix)) state[k.substr(kDampingPrefix.size())] = v;
    }
    if (absl::Status st = damping_->ImportState(state); !st.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("snapshot.session_scalars: ", st.message()));
    }
  }
  if (snapshot.has_create_time()) create_time_ = FromProto(snapshot.create_time());
  update_time_ = absl::Now();
  return absl::OkStatus();
}

absl::StatusOr<StepOutcome> Session::Step(const StepData& data,
                                          ReplyEncoder encode) {
  std::unique_ptr<StepInProgress> step = BeginStep(data.step);
  return FinishStep(*step, data.loss, data.blocks, encode);
}

absl::Status Session::CheckStepLocked(int64_t step,
                                      std::shared_ptr<const CachedReply>* replay) const {
  if (deleted_.load()) {
    return absl::NotFoundError(absl::StrCat("session ", name(), " was deleted"));
  }
  if (step == last_step_ && last_reply_ != nullptr) {
    *replay = last_reply_;
    return absl::OkStatus();
  }
  if (step != last_step_ + 1) {
    return absl::FailedPreconditionError(absl::StrCat(
        "step ", step, " is out of order: session ", id_, " is at step ",
        last_step_, ", the next step is ", last_step_ + 1));
  }
  return absl::OkStatus();
}

core::StepContext Session::ContextFor(int64_t step) const {
  core::StepContext context;
  context.step = step;
  context.engine = engine_;
  context.compute_pool = compute_pool_;
  return context;
}

std::unique_ptr<StepInProgress> Session::BeginStep(int64_t step) {
  auto in_progress =
      std::unique_ptr<StepInProgress>(new StepInProgress(this, step, damped_.size()));
  absl::MutexLock lock(&mu_);
  // Decided again in FinishStep, which reports it; here it only says
  // whether early proposals are worth making.
  std::shared_ptr<const CachedReply> replay;
  if (CheckStepLocked(step, &replay).ok() && replay == nullptr) {
    in_progress->proposed_after_ = last_step_;
    if (damping_.has_value()) {
      in_progress->early_damping_ = damping_->damping();
      in_progress->defer_damped_ = damping_->JudgesAt(step);
    }
  }
  return in_progress;
}

std::vector<size_t> Session::AddBlocksLocked(StepInProgress& step,
                                             const std::vector<const BlockStepData*>& blocks) const {
  std::vector<size_t> added;
  for (const BlockStepData* b : blocks) {
    if (step.name_error_.has_value()) break;  // the first one is the step's
    auto it = block_index_.find(b->name);
    const size_t i = it == block_index_.end() ? blocks_.size() : it->second;
    if (i == blocks_.size()) {
      step.name_error_ = absl::InvalidArgumentError(absl::StrCat(
          "block ", core::QuotedBlockName(b->name), ": is not in the session"));
    } else if (step.slot_[i] != nullptr) {
      step.name_error_ = absl::InvalidArgumentError(absl::StrCat(
          "block ", core::QuotedBlockName(b->name), ": sent twice in step ", step.step_));
    } else {
      step.slot_[i] = b;
      added.push_back(i);
    }
  }
  step.blocks_sent_ += blocks.size();
  // Step proposes in config order; so does each message here.
  std::sort(added.begin(), added.end());
  return added;
}

void Session::ResetProposalsLocked(StepInProgress& step) const {
  for (auto& p : step.pending_) p.reset();
  step.error_index_ = SIZE_MAX;
  step.error_ = absl::OkStatus();
  step.early_damping_.reset();
  step.defer_damped_ = false;
  step.proposed_after_ = -1;
}

size_t Session::ProposeLocked(StepInProgress& step, absl::Span<const size_t> indices,
                              const core::StepContext& context) {
  std::vector<size_t> todo;
  for (size_t i : indices) {
    // A lower block already failed: Step's config-order pass stops there.
    if (i > step.error_index_ || step.pending_[i] != nullptr) continue;
    todo.push_back(i);
  }
  if (todo.empty()) return 0;
  using Proposal = absl::StatusOr<std::unique_ptr<core::PendingBlockUpdate>>;
  std::vector<std::optional<Proposal>> out(todo.size());
  // The lowest config index that failed so far; proposals above it are
  // skipped (never committed anyway).
  std::atomic<size_t> lowest_failure{step.error_index_};
  auto propose = [&](size_t k) {
    const size_t i = todo[k];
    if (i > lowest_failure.load(std::memory_order_relaxed)) return;
    out[k] = blocks_[i].block->Propose(step.slot_[i]->input, context);
    if (!out[k]->ok()) {
      size_t seen = lowest_failure.load(std::memory_order_relaxed);
      while (i < seen && !lowest_failure.compare_exchange_weak(seen, i)) {
      }
    }
  };
  // Blocks side by side on the compute pool: each block's passes that are
  // not large products (layouts, factor averages, checks) run on one thread,
  // so one block at a time left a core idle for about half of a K-FAC
  // autoencoder step. Proposals only read their block's state, and a
  // block's own products still split over the pool (nested calls finish on
  // their caller). A block that may wait for the engine is proposed here,
  // on the step's thread, after the others (see MayWaitForEngine).
  std::vector<size_t> side_by_side, here;
  for (size_t k = 0; k < todo.size(); ++k) {
    (blocks_[todo[k]].block->MayWaitForEngine(step.step_) ? here : side_by_side).push_back(k);
  }
  if (side_by_side.size() > 1 && linalg::Parallelism(context.compute_pool) > 1) {
    std::atomic<bool> out_of_memory{false};
    context.compute_pool->ParallelFor(side_by_side.size(), [&](size_t n) {
      try {
        propose(side_by_side[n]);
      } catch (const std::bad_alloc&) {
        out_of_memory.store(true);
      }
    });
    if (out_of_memory.load()) throw std::bad_alloc();  // the caller's to report
  } else {
    for (size_t k : side_by_side) propose(k);
  }
  for (size_t k : here) propose(k);
  size_t proposed = 0;
  for (size_t k = 0; k < todo.size(); ++k) {
    if (!out[k].has_value()) continue;
    ++proposed;
    const size_t i = todo[k];
    if (!out[k]->ok()) {
      if (i < step.error_index_) {
        step.error_index_ = i;
        step.error_ = out[k]->status();
      }
    } else if (i < step.error_index_) {
      step.pending_[i] = *std::move(*out[k]);
    }
  }
  // What lies above the lowest failure is never committed.
  if (step.error_index_ != SIZE_MAX) {
    for (size_t j = step.error_index_ + 1; j < step.pending_.size(); ++j) step.pending_[j].reset();
  }
  return proposed;
}

size_t Session::ProposeBlocks(StepInProgress& step, std::vector<BlockStepData> blocks) {
  const auto start = std::chrono::steady_clock::now();
  absl::MutexLock lock(&mu_);
  if (step.finished_ || step.session_ != this) return 0;
  std::vector<const BlockStepData*> arrived;
  for (BlockStepData& b : blocks) {
    step.owned_.push_back(std::move(b));
    arrived.push_back(&step.owned_.back());
  }
  std::vector<size_t> added = AddBlocksLocked(step, arrived);
  // Nothing to propose for a step that will not be applied (a name error,
  // a replay, out of order, deleted; FinishStep reports which), nor
  // against a session that has moved on since BeginStep.
  if (step.name_error_.has_value()) {
    for (auto& p : step.pending_) p.reset();  // never committed
    return 0;
  }
  if (step.proposed_after_ < 0 || step.proposed_after_ != last_step_ || deleted_.load()) return 0;
  if (step.defer_damped_) {
    std::erase_if(added, [&](size_t i) { return damped_[i]; });
  }
  core::StepContext context = ContextFor(step.step_);
  context.damping_override = step.early_damping_;
  const size_t proposed = ProposeLocked(step, added, context);
  step.compute_ += absl::FromChrono(std::chrono::steady_clock::now() - start);
  return proposed;
}

absl::StatusOr<StepOutcome> Session::FinishStep(StepInProgress& step, std::optional<double> loss,
                                                absl::Span<const BlockStepData> last_blocks,
                                                ReplyEncoder encode) {
  const auto start = std::chrono::steady_clock::now();
  absl::MutexLock lock(&mu_);
  if (step.finished_ || step.session_ != this) {
    return absl::InternalError(absl::StrCat(
        "step ", step.step_, step.finished_ ? " was already finished" : " is another session's"));
  }
  step.finished_ = true;
  std::shared_ptr<const CachedReply> replay;
  if (absl::Status s = CheckStepLocked(step.step_, &replay); !s.ok()) return s;
  if (replay != nullptr) return StepOutcome{true, replay};

  std::vector<const BlockStepData*> arrived;
  for (const BlockStepData& b : last_blocks) arrived.push_back(&b);
  AddBlocksLocked(step, arrived);
  if (step.name_error_.has_value()) return *step.name_error_;
  if (step.blocks_sent_ == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("blocks: step ", step.step_, " has no blocks"));
  }

  core::StepContext context = ContextFor(step.step_);
  context.loss = loss;
  // Adapted on a copy: a rejected step must not move the damping.
  std::optional<core::LevenbergMarquardtDamping> damping = damping_;
  if (damping.has_value()) context.damping_override = damping->BeginStep(step.step_, loss);
  // Early proposals stand only if made against this state with this step's
  // damping (always so through the service: one stream per session, and
  // the damping is deferred when the loss can move it).
  if (step.proposed_after_ != last_step_) {
    ResetProposalsLocked(step);
  } else if (damping.has_value() && step.early_damping_ != context.damping_override) {
    // Only the blocks the damping drives read it.
    for (size_t i = 0; i < blocks_.size(); ++i) {
      if (damped_[i]) step.pending_[i].reset();
    }
    if (step.error_index_ != SIZE_MAX && damped_[step.error_index_]) {
      step.error_index_ = SIZE_MAX;
      step.error_ = absl::OkStatus();
    }
  }
  // The rest, in config order, below the lowest failure so far: exactly the
  // proposals Step's config-order pass makes before it would stop.
  std::vector<size_t> rest;
  for (size_t i = 0; i < blocks_.size(); ++i) {
    if (step.slot_[i] != nullptr && step.pending_[i] == nullptr) rest.push_back(i);
  }
  ProposeLocked(step, rest, context);
  if (step.error_index_ != SIZE_MAX) return step.error_;
  std::vector<std::unique_ptr<core::PendingBlockUpdate>>& pending = step.pending_;

  // Session-wide curvature transforms over the blocks' curvature models.
  double kl_scale = 1.0;
  if (config_.kl_clip().enabled()) {
    const double kappa = config_.kl_clip().kappa() > 0 ? config_.kl_clip().kappa()
                                                        : core::kDefaultKlClipKappa;
    kl_scale = core::KlClipScale(core::KlClipSum(pending), kappa);
  }
  if (damping.has_value()) {
    damping->EndStep(step.step_, core::PredictedReductionSum(pending, kl_scale));
  }

  // Nothing below can fail: the step is committed.
  StepResult result;
  result.step = step.step_;
  result.kl_clip_scale = kl_scale;
  result.damping = context.damping_override;
  for (size_t i = 0; i < blocks_.size(); ++i) {
    if (pending[i] == nullptr) continue;
    BlockResult r{i, blocks_[i].name, pending[i]->Commit(kl_scale)};
    result.inversion_micros += r.output.inversion_micros;
    result.blocks.push_back(std::move(r));
  }
  for (auto& p : pending) p.reset();
  damping_ = std::move(damping);
  // The block math of every message of the step, not the gaps between them.
  step.compute_ += absl::FromChrono(std::chrono::steady_clock::now() - start);
  result.compute_micros = absl::ToInt64Microseconds(step.compute_);
  last_step_ = step.step_;
  update_time_ = absl::Now();
  last_reply_ = encode(result);
  return StepOutcome{false, last_reply_};
}

natgrad::v1::Session Session::Describe() const {
  absl::MutexLock lock(&mu_);
  natgrad::v1::Session s;
  s.set_name(name());
  *s.mutable_config() = config_;
  s.set_last_step(last_step_);
  s.set_durable_step(checkpointed_step_);
  int64_t bytes = 0;
  for (const auto& b : blocks_) bytes += b.block->StateBytes();
  s.set_state_bytes(bytes);
  *s.mutable_create_time() = ToProto(create_time_);
  *s.mutable_update_time() = ToProto(update_time_);
  if (damping_.has_value()) s.set_damping(damping_->damping());
  s.set_stream_open(stream_open_.load());
  return s;
}

natgrad::v1::SessionSnapshot Session::Snapshot() const {
  absl::MutexLock lock(&mu_);
  natgrad::v1::SessionSnapshot snap;
  snap.set_format_version(kSnapshotFormat);
  snap.set_name(name());
  *snap.mutable_config() = config_;
  snap.set_last_step(last_step_);
  snap.set_tenant(tenant_);
  *snap.mutable_create_time() = ToProto(create_time_);
  for (const auto& b : blocks_) {
    natgrad::v1::BlockSnapshot* bs = snap.add_blocks();
    bs->set_name(b.name);
    core::BlockState state = b.block->ExportState();
    for (const auto& [k, m] : state.tensors) (*bs->mutable_tensors())[k] = wire::EncodeExact(m);
    for (const auto& [k, v] : state.scalars) (*bs->mutable_scalars())[k] = v;
  }
  if (last_reply_ != nullptr) snap.set_last_response(last_reply_->Serialized());
  if (damping_.has_value()) {
    auto& sc = *snap.mutable_session_scalars();
    for (const auto& [k, v] : damping_->ExportState()) {
      sc[absl::StrCat(kDampingPrefix, k)] = v;
    }
  }
  return snap;
}

bool Session::TryAttachStream() {
  bool expected = false;
  return stream_open_.compare_exchange_strong(expected, true);
}

void Session::DetachStream() { stream_open_.store(false); }

int64_t Session::last_step() const {
  absl::MutexLock lock(&mu_);
  return last_step_;
}

int64_t Session::StateBytes() const {
  absl::MutexLock lock(&mu_);
  int64_t bytes = 0;
  for (const auto& b : blocks_) bytes += b.block->StateBytes();
  return bytes;
}

int64_t Session::StepsSinceCheckpoint() const {
  absl::MutexLock lock(&mu_);
  return last_step_ - checkpointed_step_;
}

void Session::MarkCheckpointed(int64_t step) {
  absl::MutexLock lock(&mu_);
  checkpointed_step_ = std::max(checkpointed_step_, step);
}

int64_t Session::durable_step() const {
  absl::MutexLock lock(&mu_);
  return checkpointed_step_;
}

}  // namespace natgrad::session
