#include "server/session/session.h"

#include <chrono>
#include <cmath>
#include <map>
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
                 std::vector<NamedBlock> blocks,
                 engine::InversionEngine* engine,
                 linalg::ComputePool* compute_pool)
    : id_(std::move(id)),
      tenant_(std::move(tenant)),
      config_(std::move(config)),
      engine_(engine),
      compute_pool_(compute_pool),
      blocks_(std::move(blocks)),
      create_time_(absl::Now()),
      update_time_(create_time_) {}

absl::StatusOr<std::unique_ptr<Session>> Session::Create(
    std::string id, std::string tenant, const natgrad::v1::SessionConfig& config,
    engine::InversionEngine* engine, linalg::ComputePool* compute_pool) {
  if (absl::Status s = blocks::ValidateSessionConfig(config); !s.ok()) return s;
  natgrad::v1::SessionConfig canonical = config;
  std::vector<NamedBlock> blocks;
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
  }
  auto damping = NewAdaptiveDamping(canonical);
  if (!damping.ok()) return damping.status();
  auto session = std::unique_ptr<Session>(new Session(
      std::move(id), std::move(tenant), std::move(canonical), std::move(blocks), engine,
      compute_pool));
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
  absl::MutexLock lock(&mu_);
  if (deleted_.load()) {
    return absl::NotFoundError(absl::StrCat("session ", name(), " was deleted"));
  }
  if (data.step == last_step_ && last_reply_ != nullptr) {
    return StepOutcome{true, last_reply_};
  }
  if (data.step != last_step_ + 1) {
    return absl::FailedPreconditionError(absl::StrCat(
        "step ", data.step, " is out of order: session ", id_, " is at step ",
        last_step_, ", the next step is ", last_step_ + 1));
  }
  absl::StatusOr<StepResult> result = ApplyLocked(data);
  if (!result.ok()) return result.status();
  last_reply_ = encode(*result);
  return StepOutcome{false, last_reply_};
}

absl::StatusOr<StepResult> Session::ApplyLocked(const StepData& data) {
  const auto start = std::chrono::steady_clock::now();
  // Which of our blocks each input feeds; a block may be left out, not sent twice.
  std::map<std::string, size_t> index;
  for (size_t i = 0; i < blocks_.size(); ++i) index[blocks_[i].name] = i;
  std::vector<const BlockStepData*> inputs(blocks_.size(), nullptr);
  for (const BlockStepData& b : data.blocks) {
    auto it = index.find(b.name);
    if (it == index.end()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "block ", core::QuotedBlockName(b.name), ": is not in the session"));
    }
    if (inputs[it->second] != nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(
          "block ", core::QuotedBlockName(b.name), ": sent twice in step ", data.step));
    }
    inputs[it->second] = &b;
  }
  if (data.blocks.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("blocks: step ", data.step, " has no blocks"));
  }

  core::StepContext context;
  context.step = data.step;
  context.loss = data.loss;
  context.engine = engine_;
  context.compute_pool = compute_pool_;
  // Adapted on a copy: a rejected step must not move the damping.
  std::optional<core::LevenbergMarquardtDamping> damping = damping_;
  if (damping.has_value()) context.damping_override = damping->BeginStep(data.step, data.loss);

  std::vector<std::unique_ptr<core::PendingBlockUpdate>> pending(blocks_.size());
  for (size_t i = 0; i < blocks_.size(); ++i) {
    if (inputs[i] == nullptr) continue;
    auto p = blocks_[i].block->Propose(inputs[i]->input, context);
    if (!p.ok()) return p.status();
    pending[i] = *std::move(p);
  }

  // Session-wide curvature transforms over the blocks' curvature models.
  double kl_scale = 1.0;
  if (config_.kl_clip().enabled()) {
    const double kappa = config_.kl_clip().kappa() > 0 ? config_.kl_clip().kappa()
                                                        : core::kDefaultKlClipKappa;
    kl_scale = core::KlClipScale(core::KlClipSum(pending), kappa);
  }
  if (damping.has_value()) {
    damping->EndStep(data.step, core::PredictedReductionSum(pending, kl_scale));
  }

  // Nothing below can fail: the step is committed.
  StepResult result;
  result.step = data.step;
  result.kl_clip_scale = kl_scale;
  result.damping = context.damping_override;
  for (size_t i = 0; i < blocks_.size(); ++i) {
    if (pending[i] == nullptr) continue;
    BlockResult r{i, blocks_[i].name, pending[i]->Commit(kl_scale)};
    result.inversion_micros += r.output.inversion_micros;
    result.blocks.push_back(std::move(r));
  }
  damping_ = std::move(damping);
  result.compute_micros = std::chrono::duration_cast<std::chrono::microseconds>(
                              std::chrono::steady_clock::now() - start)
                              .count();
  last_step_ = data.step;
  update_time_ = absl::Now();
  return result;
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
