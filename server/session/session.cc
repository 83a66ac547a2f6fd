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
#include "server/core/kfac/kl_clipping.h"
#include "server/session/block_factory.h"
#include "server/session/schedule_codec.h"
#include "server/session/tensor_codec.h"

namespace natgrad::session {
namespace {

using natgrad::v1::StepResponse;
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
  o.initial_damping = 1e-3;
  for (const auto& b : config.blocks()) {
    if (!b.has_kfac_dense()) continue;
    auto s = ScheduleFromProto(b.kfac_dense().damping(), 1e-3, "config.adaptive_damping");
    if (!s.ok()) return s.status();
    o.initial_damping = (*s)->Value(1);
    break;
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

Eigen::MatrixXd StackRows(const std::vector<Eigen::VectorXd>& v) {
  if (v.empty()) return {};
  Eigen::MatrixXd m(v.size(), v[0].size());
  for (size_t i = 0; i < v.size(); ++i) m.row(i) = v[i].transpose();
  return m;
}

Eigen::MatrixXd StackBlocks(const std::vector<Eigen::MatrixXd>& v) {
  if (v.empty()) return {};
  const int64_t r = v[0].rows();
  Eigen::MatrixXd m(r * v.size(), v[0].cols());
  for (size_t i = 0; i < v.size(); ++i) m.middleRows(i * r, r) = v[i];
  return m;
}

void EncodeGaussian(const core::GaussianStepOutputData& g,
                    const BlockStepData& in, natgrad::v1::GaussianUpdate* out) {
  const auto dt = in.reply_dtype;
  *out->mutable_param1() = EncodeMatrix(StackRows(g.param1), dt, in.gaussian_shape1);
  *out->mutable_param2() = EncodeMatrix(StackBlocks(g.param2), dt, in.gaussian_shape2);
  *out->mutable_delta1() = EncodeMatrix(StackRows(g.delta1), dt, in.gaussian_shape1);
  *out->mutable_delta2() = EncodeMatrix(StackBlocks(g.delta2), dt, in.gaussian_shape2);
  if (!g.direction1.empty()) {
    *out->mutable_direction1() =
        EncodeMatrix(StackRows(g.direction1), dt, in.gaussian_shape1);
    *out->mutable_direction2() =
        EncodeMatrix(StackBlocks(g.direction2), dt, in.gaussian_shape2);
  }
  out->set_gamma_used(g.gamma_used);
  out->set_halvings(g.halvings);
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
  if (absl::Status s = ValidateSessionConfig(config); !s.ok()) return s;
  natgrad::v1::SessionConfig canonical = config;
  std::vector<NamedBlock> blocks;
  for (int i = 0; i < canonical.blocks_size(); ++i) {
    auto* b = canonical.mutable_blocks(i);
    if (b->shape_size() == 0) {
      for (int64_t d : CanonicalShape(*b)) b->add_shape(d);
    }
    auto block = NewBlock(*b, canonical.state_dtype(),
                          absl::StrCat("config.blocks[", i, "]"));
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
      if (absl::Status st = ValidateTensor(tensor, tf); !st.ok()) return st;
      state.tensors[key] = DecodeMatrix(tensor);
    }
    for (const auto& [key, value] : bs.scalars()) state.scalars[key] = value;
    if (absl::Status st = blocks_[i].block->ImportState(state); !st.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, ": ", st.message()));
    }
  }
  if (!snapshot.last_response().empty()) {
    auto response = std::make_shared<StepResponse>();
    if (!response->ParseFromString(snapshot.last_response())) {
      return absl::InvalidArgumentError("snapshot.last_response: unparsable");
    }
    last_response_ = std::move(response);
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

absl::StatusOr<std::shared_ptr<const StepResponse>> Session::Step(
    const StepData& data) {
  absl::MutexLock lock(&mu_);
  if (deleted_.load()) {
    return absl::NotFoundError(absl::StrCat("session ", name(), " was deleted"));
  }
  if (data.step == last_step_ && last_response_ != nullptr) {
    auto replay = std::make_shared<StepResponse>(*last_response_);
    replay->set_replayed(true);
    return replay;
  }
  if (data.step != last_step_ + 1) {
    return absl::FailedPreconditionError(absl::StrCat(
        "step ", data.step, " is out of order: session ", id_, " is at step ",
        last_step_, ", the next step is ", last_step_ + 1));
  }
  return ApplyLocked(data);
}

absl::StatusOr<std::shared_ptr<const StepResponse>> Session::ApplyLocked(
    const StepData& data) {
  const auto start = std::chrono::steady_clock::now();
  // Which of our blocks each input feeds; every block must appear once.
  std::map<std::string, size_t> index;
  for (size_t i = 0; i < blocks_.size(); ++i) index[blocks_[i].name] = i;
  std::vector<const BlockStepData*> inputs(blocks_.size(), nullptr);
  for (const BlockStepData& b : data.blocks) {
    auto it = index.find(b.name);
    if (it == index.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat("blocks: unknown block \"", b.name, "\""));
    }
    if (inputs[it->second] != nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat("blocks: block \"", b.name, "\" sent twice in step ", data.step));
    }
    inputs[it->second] = &b;
  }
  for (size_t i = 0; i < blocks_.size(); ++i) {
    if (inputs[i] == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(
          "blocks: block \"", blocks_[i].name, "\" is missing from step ", data.step));
    }
  }

  core::StepContext context;
  context.step = data.step;
  context.loss = data.loss;
  context.engine = engine_;
  context.compute_pool = compute_pool_;
  // Adapted on a copy: a rejected step must not move the damping.
  std::optional<core::LevenbergMarquardtDamping> damping = damping_;
  if (damping.has_value()) context.damping_override = damping->BeginStep(data.step, data.loss);

  std::vector<std::unique_ptr<core::PendingBlockUpdate>> pending;
  pending.reserve(blocks_.size());
  for (size_t i = 0; i < blocks_.size(); ++i) {
    auto p = blocks_[i].block->Propose(inputs[i]->input, context);
    if (!p.ok()) return p.status();
    pending.push_back(*std::move(p));
  }

  // KL clipping over every K-FAC block of the session (DESIGN.md §4.1).
  double kl_scale = 1.0;
  if (config_.kl_clip().enabled()) {
    const double kappa = config_.kl_clip().kappa() > 0 ? config_.kl_clip().kappa()
                                                        : core::kDefaultKlClipKappa;
    kl_scale = core::KlClipScale(core::KlClipSum(pending), kappa);
  }
  if (damping.has_value()) {
    double predicted = 0;
    for (const auto& p : pending) predicted += p->PredictedReduction(kl_scale);
    damping->EndStep(data.step, predicted);
  }

  // Nothing below can fail: the step is committed.
  auto response = std::make_shared<StepResponse>();
  response->set_session(name());
  response->set_step(data.step);
  response->set_kl_clip_scale(kl_scale);
  int64_t inversion_micros = 0;
  for (size_t i = 0; i < blocks_.size(); ++i) {
    core::BlockStepOutput out = pending[i]->Commit(kl_scale);
    const BlockStepData& in = *inputs[i];
    natgrad::v1::BlockUpdate* u = response->add_updates();
    u->set_name(blocks_[i].name);
    if (out.delta.size() > 0) {
      *u->mutable_delta() = EncodeMatrix(out.delta, in.reply_dtype, in.reply_shape);
    }
    for (const auto& [k, v] : out.hyperparameters) (*u->mutable_hyperparameters())[k] = v;
    if (out.gaussian.has_value()) EncodeGaussian(*out.gaussian, in, u->mutable_gaussian());
    inversion_micros += out.inversion_micros;
  }
  if (context.damping_override.has_value()) response->set_damping(*context.damping_override);
  damping_ = std::move(damping);
  const auto micros = std::chrono::duration_cast<std::chrono::microseconds>(
                          std::chrono::steady_clock::now() - start)
                          .count();
  response->mutable_timing()->set_compute_micros(micros);
  response->mutable_timing()->set_inversion_micros(inversion_micros);
  if (data.received != absl::InfinitePast()) {
    response->mutable_timing()->set_server_micros(
        absl::ToInt64Microseconds(absl::Now() - data.received));
  }
  last_step_ = data.step;
  last_response_ = response;
  update_time_ = absl::Now();
  return response;
}

natgrad::v1::Session Session::Describe() const {
  absl::MutexLock lock(&mu_);
  natgrad::v1::Session s;
  s.set_name(name());
  *s.mutable_config() = config_;
  s.set_last_step(last_step_);
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
    for (const auto& [k, m] : state.tensors) (*bs->mutable_tensors())[k] = EncodeExact(m);
    for (const auto& [k, v] : state.scalars) (*bs->mutable_scalars())[k] = v;
  }
  if (last_response_ != nullptr) {
    snap.set_last_response(last_response_->SerializeAsString());
  }
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

}  // namespace natgrad::session
