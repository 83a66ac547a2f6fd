// The step protocol of one session, in-process on core types: ordering,
// replay of the cached reply, rejected steps changing nothing, blocks left
// out, deletion, restore of the cached reply from a snapshot, and a step
// applied message by message (BeginStep/ProposeBlocks/FinishStep) against
// the one-shot Step.
#include "server/session/session.h"

#include <algorithm>
#include <cstring>
#include <random>
#include <set>

#include "gmock/gmock.h"
#include "google/protobuf/util/message_differencer.h"
#include "gtest/gtest.h"
#include "server/engine/testing/eigen_inversion_engine.h"
#include "server/linalg/compute_pool.h"

namespace natgrad::session {
namespace {

using ::testing::HasSubstr;

// A reply that records which step it encodes.
class StepNumberReply final : public CachedReply {
 public:
  explicit StepNumberReply(int64_t step) : step_(step) {}
  std::string Serialized() const override { return "step " + std::to_string(step_); }

 private:
  int64_t step_;
};

natgrad::v1::SessionConfig TwoSgdBlocks() {
  natgrad::v1::SessionConfig c;
  c.set_state_dtype(natgrad::v1::FLOAT64);
  for (const char* name : {"a", "b"}) {
    auto* b = c.add_blocks();
    b->set_name(name);
    b->add_shape(2);
    b->mutable_sgd()->mutable_learning_rate()->mutable_constant()->set_value(0.5);
    b->mutable_sgd()->mutable_momentum()->mutable_constant()->set_value(0.9);
  }
  return c;
}

BlockStepData Gradient(const std::string& name, double x, double y) {
  core::DenseStepInput in;
  Eigen::MatrixXd g(2, 1);
  g << x, y;
  in.gradient = g;
  return {name, in};
}

StepData Step(int64_t t, std::vector<BlockStepData> blocks) {
  StepData d;
  d.step = t;
  d.blocks = std::move(blocks);
  return d;
}

class SessionProtocol : public ::testing::Test {
 protected:
  void SetUp() override {
    auto s = Session::Create("s1", "", TwoSgdBlocks(), &engine_);
    ASSERT_TRUE(s.ok()) << s.status();
    session_ = *std::move(s);
  }

  // Steps and records every StepResult the encoder saw.
  absl::StatusOr<StepOutcome> Apply(const StepData& data) {
    return session_->Step(data, [&](const StepResult& r) -> std::shared_ptr<const CachedReply> {
      results_.push_back(r);
      return std::make_shared<StepNumberReply>(r.step);
    });
  }

  bool SameSnapshot(const natgrad::v1::SessionSnapshot& a,
                    const natgrad::v1::SessionSnapshot& b) {
    return google::protobuf::util::MessageDifferencer::Equals(a, b);
  }

  core::testing::EigenInversionEngine engine_;
  std::unique_ptr<Session> session_;
  std::vector<StepResult> results_;
};

TEST_F(SessionProtocol, AppliesInOrderAndReplaysTheLastStepWithoutChangingIt) {
  auto r1 = Apply(Step(1, {Gradient("a", 1, 2), Gradient("b", 3, 4)}));
  ASSERT_TRUE(r1.ok()) << r1.status();
  EXPECT_FALSE(r1->replayed);
  ASSERT_EQ(results_.size(), 1u);
  ASSERT_EQ(results_[0].blocks.size(), 2u);
  // SGD with lr 0.5: delta = -0.5 g on the first step.
  EXPECT_EQ(results_[0].blocks[0].output.delta.ToMatrix<double>()(1, 0), -1.0);
  EXPECT_EQ(results_[0].blocks[1].name, "b");

  const auto before = session_->Snapshot();
  // The same number again (a lost response): the cached reply, no new work.
  auto again = Apply(Step(1, {Gradient("a", 100, 100), Gradient("b", 100, 100)}));
  ASSERT_TRUE(again.ok());
  EXPECT_TRUE(again->replayed);
  EXPECT_EQ(again->reply, r1->reply);
  EXPECT_EQ(results_.size(), 1u);
  EXPECT_TRUE(SameSnapshot(session_->Snapshot(), before));
  EXPECT_EQ(session_->last_step(), 1);
}

TEST_F(SessionProtocol, GapsAndOldStepsAreFailedPrecondition) {
  ASSERT_TRUE(Apply(Step(1, {Gradient("a", 1, 1)})).ok());
  ASSERT_TRUE(Apply(Step(2, {Gradient("a", 1, 1)})).ok());
  const auto before = session_->Snapshot();
  for (int64_t t : {4, 1, 0}) {
    auto r = Apply(Step(t, {Gradient("a", 1, 1)}));
    ASSERT_FALSE(r.ok()) << t;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition) << t;
    EXPECT_THAT(r.status().message(), HasSubstr("the next step is 3"));
  }
  EXPECT_TRUE(SameSnapshot(session_->Snapshot(), before));
}

TEST_F(SessionProtocol, ARejectedBlockRejectsTheWholeStepAndChangesNothing) {
  ASSERT_TRUE(Apply(Step(1, {Gradient("a", 1, 1), Gradient("b", 1, 1)})).ok());
  const auto before = session_->Snapshot();
  // "a" is fine, "b" has a NaN: neither may move, and no reply is made.
  auto r = Apply(Step(2, {Gradient("a", 1, 1), Gradient("b", std::nan(""), 1)}));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(r.status().message(), HasSubstr("block \"b\": gradient"));
  EXPECT_EQ(results_.size(), 1u);
  EXPECT_TRUE(SameSnapshot(session_->Snapshot(), before));
  // Unknown and duplicated blocks, and an empty step, are refused the same way.
  for (StepData bad : {Step(2, {Gradient("zz", 1, 1)}),
                       Step(2, {Gradient("a", 1, 1), Gradient("a", 1, 1)}), Step(2, {})}) {
    EXPECT_EQ(Apply(bad).status().code(), absl::StatusCode::kInvalidArgument);
  }
  EXPECT_TRUE(SameSnapshot(session_->Snapshot(), before));
  EXPECT_TRUE(Apply(Step(2, {Gradient("a", 1, 1), Gradient("b", 1, 1)})).ok());
}

TEST_F(SessionProtocol, ABlockLeftOutKeepsItsState) {
  ASSERT_TRUE(Apply(Step(1, {Gradient("a", 1, 1), Gradient("b", 1, 1)})).ok());
  const auto before = session_->Snapshot();
  ASSERT_TRUE(Apply(Step(2, {Gradient("a", 1, 1)})).ok());
  ASSERT_EQ(results_.back().blocks.size(), 1u);
  EXPECT_EQ(results_.back().blocks[0].name, "a");
  const auto after = session_->Snapshot();
  // b's momentum buffer and step count are as they were; a's moved.
  EXPECT_TRUE(google::protobuf::util::MessageDifferencer::Equals(before.blocks(1), after.blocks(1)));
  EXPECT_FALSE(google::protobuf::util::MessageDifferencer::Equals(before.blocks(0), after.blocks(0)));
}

TEST_F(SessionProtocol, DeletedSessionRefusesSteps) {
  ASSERT_TRUE(Apply(Step(1, {Gradient("a", 1, 1)})).ok());
  session_->MarkDeleted();
  auto r = Apply(Step(2, {Gradient("a", 1, 1)}));
  EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound);
}

TEST_F(SessionProtocol, RestoredSessionReplaysTheSnapshottedReplyAndContinuesExactly) {
  ASSERT_TRUE(Apply(Step(1, {Gradient("a", 1, 2), Gradient("b", 3, 4)})).ok());
  ASSERT_TRUE(Apply(Step(2, {Gradient("a", 5, 6), Gradient("b", 7, 8)})).ok());
  const auto snap = session_->Snapshot();
  EXPECT_EQ(snap.last_response(), "step 2");
  auto restored = Session::Restore(snap, "s2", &engine_);
  ASSERT_TRUE(restored.ok()) << restored.status();
  auto replay = (*restored)->Step(Step(2, {}), [](const StepResult&) -> std::shared_ptr<const CachedReply> {
    ADD_FAILURE() << "a replay must not encode";
    return nullptr;
  });
  ASSERT_TRUE(replay.ok());
  EXPECT_TRUE(replay->replayed);
  EXPECT_EQ(replay->reply->Serialized(), "step 2");

  // Step 3 on both gives the same deltas.
  ASSERT_TRUE(Apply(Step(3, {Gradient("a", 1, 1), Gradient("b", 2, 2)})).ok());
  std::vector<StepResult> other;
  ASSERT_TRUE((*restored)
                  ->Step(Step(3, {Gradient("a", 1, 1), Gradient("b", 2, 2)}),
                         [&](const StepResult& r) -> std::shared_ptr<const CachedReply> {
                           other.push_back(r);
                           return std::make_shared<StepNumberReply>(r.step);
                         })
                  .ok());
  ASSERT_EQ(other.size(), 1u);
  for (size_t i = 0; i < 2; ++i) {
    EXPECT_EQ(other[0].blocks[i].output.delta.ToMatrix<double>(), results_.back().blocks[i].output.delta.ToMatrix<double>());
  }
}


// --- Incremental steps: a step proposed message by message equals Step. ---

// kfac_dense and adam blocks interleaved in config order, so messages sent
// in any order exercise the config-order rules.
natgrad::v1::SessionConfig Mixed(natgrad::v1::DType dtype, bool kl_clip, bool adaptive) {
  natgrad::v1::SessionConfig c;
  c.set_state_dtype(dtype);
  if (kl_clip) {
    c.mutable_kl_clip()->set_enabled(true);
    c.mutable_kl_clip()->set_kappa(1e-3);  // small enough to clip these steps
  }
  if (adaptive) {
    c.mutable_adaptive_damping()->set_enabled(true);
    c.mutable_adaptive_damping()->set_interval(2);
  }
  auto constant = [](double v) {
    natgrad::v1::Schedule s;
    s.mutable_constant()->set_value(v);
    return s;
  };
  auto kfac = [&](const char* name, int64_t din, int64_t dout, natgrad::v1::DampingMode mode) {
    auto* b = c.add_blocks();
    b->set_name(name);
    auto* k = b->mutable_kfac_dense();
    k->set_d_in(din);
    k->set_d_out(dout);
    k->set_has_bias(true);
    *k->mutable_learning_rate() = constant(0.05);
    *k->mutable_damping() = constant(1e-2);
    *k->mutable_momentum() = constant(0.9);
    k->set_inverse_period(3);
    k->set_damping_mode(mode);
  };
  auto adam = [&](const char* name, std::vector<int64_t> shape) {
    auto* b = c.add_blocks();
    b->set_name(name);
    for (int64_t d : shape) b->add_shape(d);
    *b->mutable_adam()->mutable_learning_rate() = constant(1e-2);
  };
  kfac("fc0", 6, 5, natgrad::v1::FACTORED_TIKHONOV);
  adam("emb", {4, 3});
  kfac("fc1", 5, 3, natgrad::v1::EIGEN_EXACT);
  adam("out", {7});
  return c;
}

constexpr int64_t kRows = 16;

// A [rows, cols] tensor of normal values in `dtype` (float32: the values are
// float32 on both sides of the comparison).
core::DenseTensor Random(std::mt19937& rng, int64_t rows, int64_t cols, bool float32) {
  std::normal_distribution<double> normal(0.0, 1.0);
  if (float32) {
    std::vector<float> v(rows * cols);
    for (float& x : v) x = static_cast<float>(normal(rng));
    std::string bytes(v.size() * sizeof(float), '\0');
    std::memcpy(bytes.data(), v.data(), bytes.size());
    return core::DenseTensor::FromBytes(core::DType::kFloat32, {rows, cols}, std::move(bytes));
  }
  Eigen::MatrixXd m(rows, cols);
  for (int64_t i = 0; i < m.size(); ++i) m.data()[i] = normal(rng);
  return m;
}

// Step t's blocks, in config order ("emb" left out every 4th step; a
// malformed block has a gradient of the wrong shape).
std::vector<BlockStepData> MixedBlocks(int64_t t, bool float32, const std::string& malformed = "") {
  std::mt19937 rng(static_cast<uint32_t>(1000 + t));
  std::vector<BlockStepData> out;
  auto kfac = [&](const std::string& name, int64_t din, int64_t dout) {
    core::KfacStepInput in;
    in.gradient = Random(rng, dout, din + 1 + (name == malformed ? 1 : 0), float32);
    core::KfacStatisticsInput k;
    k.activations = Random(rng, kRows, din, float32);
    k.output_gradients = Random(rng, kRows, dout, float32);
    k.num_examples = kRows;
    in.kfac = std::move(k);
    out.push_back({name, std::move(in)});
  };
  auto adam = [&](const std::string& name, int64_t rows, int64_t cols) {
    core::DenseStepInput in;
    in.gradient = Random(rng, rows + (name == malformed ? 1 : 0), cols, float32);
    out.push_back({name, std::move(in)});
  };
  kfac("fc0", 6, 5);
  if (t % 4 != 0) adam("emb", 4, 3);
  kfac("fc1", 5, 3);
  adam("out", 7, 1);
  return out;
}

// The loss reported with step t: it rises after every measured (even) step,
// so Levenberg-Marquardt judges badly and moves the damping; none at step 6.
std::optional<double> MixedLoss(int64_t t) {
  if (t == 6) return std::nullopt;
  return 3.0 - 0.05 * static_cast<double>(t) + (t % 2 == 1 ? 0.5 : 0.0);
}

// Splits `blocks` into messages: `sizes` blocks each (the rest is the last).
std::vector<std::vector<BlockStepData>> Split(std::vector<BlockStepData> blocks,
                                              const std::vector<size_t>& sizes) {
  std::vector<std::vector<BlockStepData>> messages;
  size_t next = 0;
  for (size_t n : sizes) {
    std::vector<BlockStepData> m;
    for (size_t i = 0; i < n && next < blocks.size(); ++i) m.push_back(std::move(blocks[next++]));
    messages.push_back(std::move(m));
  }
  std::vector<BlockStepData> last;
  while (next < blocks.size()) last.push_back(std::move(blocks[next++]));
  messages.push_back(std::move(last));
  return messages;
}

StepData Flatten(int64_t t, std::optional<double> loss,
                 const std::vector<std::vector<BlockStepData>>& messages) {
  StepData d;
  d.step = t;
  d.loss = loss;
  for (const auto& m : messages)
    for (const auto& b : m) d.blocks.push_back(b);
  return d;
}

// The encoded reply of these tests: a copy of the result.
class ResultReply final : public CachedReply {
 public:
  explicit ResultReply(StepResult r) : result(std::move(r)) {}
  std::string Serialized() const override { return "step " + std::to_string(result.step); }
  StepResult result;
};

std::shared_ptr<const CachedReply> Keep(const StepResult& r) {
  return std::make_shared<ResultReply>(r);
}

absl::StatusOr<StepOutcome> OneShot(Session& s, const StepData& d) { return s.Step(d, Keep); }

// Sends `messages` (the last one last) through the incremental path.
absl::StatusOr<StepOutcome> Incremental(Session& s, int64_t t, std::optional<double> loss,
                                        std::vector<std::vector<BlockStepData>> messages) {
  std::unique_ptr<StepInProgress> step = s.BeginStep(t);
  for (size_t i = 0; i + 1 < messages.size(); ++i) s.ProposeBlocks(*step, std::move(messages[i]));
  return s.FinishStep(*step, loss, messages.back(), Keep);
}

const StepResult& ResultOf(const StepOutcome& o) {
  return static_cast<const ResultReply&>(*o.reply).result;
}

// Bit for bit: every block's delta and hyperparameters, the KL scale and the
// damping used.
void ExpectSameResult(const StepResult& a, const StepResult& b, int64_t t) {
  ASSERT_EQ(a.blocks.size(), b.blocks.size()) << "step " << t;
  EXPECT_EQ(a.step, b.step);
  EXPECT_EQ(a.kl_clip_scale, b.kl_clip_scale) << "step " << t;
  EXPECT_EQ(a.damping, b.damping) << "step " << t;
  for (size_t i = 0; i < a.blocks.size(); ++i) {
    EXPECT_EQ(a.blocks[i].index, b.blocks[i].index);
    EXPECT_EQ(a.blocks[i].name, b.blocks[i].name);
    const core::DenseTensor& da = a.blocks[i].output.delta;
    const core::DenseTensor& db = b.blocks[i].output.delta;
    EXPECT_TRUE(da.dtype() == db.dtype() && da.shape() == db.shape() && da.bytes() == db.bytes())
        << "step " << t << " block " << a.blocks[i].name;
    EXPECT_EQ(a.blocks[i].output.hyperparameters, b.blocks[i].output.hyperparameters)
        << "step " << t << " block " << a.blocks[i].name;
  }
}

// The optimizer state of two sessions (ids and times differ by design).
void ExpectSameState(const Session& a, const Session& b) {
  const auto sa = a.Snapshot(), sb = b.Snapshot();
  EXPECT_EQ(sa.last_step(), sb.last_step());
  ASSERT_EQ(sa.blocks_size(), sb.blocks_size());
  for (int i = 0; i < sa.blocks_size(); ++i) {
    EXPECT_TRUE(google::protobuf::util::MessageDifferencer::Equals(sa.blocks(i), sb.blocks(i)))
        << sa.blocks(i).name();
  }
  EXPECT_EQ(sa.session_scalars_size(), sb.session_scalars_size());
  for (const auto& [k, v] : sa.session_scalars()) {
    ASSERT_TRUE(sb.session_scalars().contains(k)) << k;
    EXPECT_EQ(v, sb.session_scalars().at(k)) << k;
  }
}

struct MixedCase {
  natgrad::v1::DType dtype;
  bool kl_clip;
  bool adaptive;
};

class IncrementalStep : public ::testing::TestWithParam<MixedCase> {
 protected:
  std::unique_ptr<Session> NewSession(const std::string& id) {
    auto s = Session::Create(id, "", Mixed(GetParam().dtype, GetParam().kl_clip,
                                          GetParam().adaptive), &engine_);
    EXPECT_TRUE(s.ok()) << s.status();
    return s.ok() ? *std::move(s) : nullptr;
  }
  bool float32() const { return GetParam().dtype == natgrad::v1::FLOAT32; }
  std::optional<double> Loss(int64_t t) const {
    return GetParam().adaptive ? MixedLoss(t) : std::nullopt;
  }

  core::testing::EigenInversionEngine engine_;
};

// Message layouts tried in turn: one block each; two then the rest; all but
// one early; everything in the last message; and the blocks in reverse
// order (later config indices proposed first).
const std::vector<std::vector<size_t>> kLayouts = {{1, 1, 1}, {2}, {3}, {}, {1, 1}};

TEST_P(IncrementalStep, EqualsTheOneShotStepBitForBit) {
  auto one = NewSession("s"), inc = NewSession("s");
  ASSERT_TRUE(one && inc);
  std::set<double> dampings;
  for (int64_t t = 1; t <= 12; ++t) {
    std::vector<BlockStepData> blocks = MixedBlocks(t, float32());
    if (t % 5 == 0) std::reverse(blocks.begin(), blocks.end());
    auto messages = Split(std::move(blocks), kLayouts[t % kLayouts.size()]);
    auto a = OneShot(*one, Flatten(t, Loss(t), messages));
    auto b = Incremental(*inc, t, Loss(t), std::move(messages));
    ASSERT_TRUE(a.ok()) << "step " << t << ": " << a.status();
    ASSERT_TRUE(b.ok()) << "step " << t << ": " << b.status();
    EXPECT_FALSE(b->replayed);
    ExpectSameResult(ResultOf(*a), ResultOf(*b), t);
    if (GetParam().kl_clip) EXPECT_LT(ResultOf(*a).kl_clip_scale, 1.0) << "step " << t;
    if (ResultOf(*a).damping) dampings.insert(*ResultOf(*a).damping);
  }
  ExpectSameState(*one, *inc);
  // The judged steps (3, 5, 9, 11: after a measured step, with a loss
  // known only at the end) moved the damping, so the deferred proposals
  // were exercised.
  if (GetParam().adaptive) EXPECT_EQ(dampings.size(), 5u);
}

TEST_P(IncrementalStep, AFailureInTheSecondMessageChangesNothingAndTheNextStepWorks) {
  auto one = NewSession("s"), inc = NewSession("s");
  ASSERT_TRUE(one && inc);
  for (int64_t t = 1; t <= 2; ++t) {
    ASSERT_TRUE(OneShot(*one, Flatten(t, Loss(t), {MixedBlocks(t, float32())})).ok());
    ASSERT_TRUE(Incremental(*inc, t, Loss(t), Split(MixedBlocks(t, float32()), {1, 1})).ok());
  }
  const natgrad::v1::SessionSnapshot before = inc->Snapshot();
  // Message 1: fc0 (proposed, fine); message 2: emb, malformed; last: the rest.
  auto bad = Split(MixedBlocks(3, float32(), "emb"), {1, 1});
  ASSERT_EQ(bad[1][0].name, "emb");
  auto want = OneShot(*one, Flatten(3, Loss(3), bad));
  ASSERT_FALSE(want.ok());
  auto got = Incremental(*inc, 3, Loss(3), bad);
  EXPECT_EQ(got.status(), want.status());
  EXPECT_THAT(got.status().message(), HasSubstr("block \"emb\""));
  EXPECT_TRUE(google::protobuf::util::MessageDifferencer::Equals(inc->Snapshot(), before));
  // Step 3 again, and 4, are taken as if nothing had happened.
  for (int64_t t = 3; t <= 4; ++t) {
    auto a = OneShot(*one, Flatten(t, Loss(t), {MixedBlocks(t, float32())}));
    auto b = Incremental(*inc, t, Loss(t), Split(MixedBlocks(t, float32()), {1, 1}));
    ASSERT_TRUE(a.ok() && b.ok()) << a.status() << " " << b.status();
    ExpectSameResult(ResultOf(*a), ResultOf(*b), t);
  }
  ExpectSameState(*one, *inc);
}

TEST_P(IncrementalStep, ReportsTheErrorTheOneShotStepReports) {
  auto one = NewSession("s"), inc = NewSession("s");
  ASSERT_TRUE(one && inc);
  ASSERT_TRUE(OneShot(*one, Flatten(1, Loss(1), {MixedBlocks(1, float32())})).ok());
  ASSERT_TRUE(Incremental(*inc, 1, Loss(1), {MixedBlocks(1, float32())}).ok());
  const natgrad::v1::SessionSnapshot before = inc->Snapshot();
  auto with = [&](std::vector<BlockStepData> blocks, const std::string& name, int copies) {
    const std::vector<BlockStepData> all = MixedBlocks(2, float32());
    for (const auto& b : all)
      if (b.name == name)
        for (int i = 0; i < copies; ++i) blocks.push_back(b);
    return blocks;
  };
  auto block = [&](const std::string& name, const std::string& malformed = "") {
    std::vector<BlockStepData> out;
    for (auto& b : MixedBlocks(2, float32(), malformed))
      if (b.name == name) out.push_back(std::move(b));
    return out;
  };
  BlockStepData unknown = MixedBlocks(2, float32())[3];
  unknown.name = "zz";
  struct Case {
    std::string what;
    int64_t step;
    std::vector<std::vector<BlockStepData>> messages;
    std::string want;
  };
  const std::vector<Case> cases = {
      // "out" (config 3) fails early, "fc0" (config 0) later: Step reports fc0.
      {"lower config index wins", 2,
       {block("out", "out"), block("emb"), block("fc0", "fc0")}, "block \"fc0\""},
      // A name error anywhere beats any block's own error.
      {"unknown name after a bad block", 2, {block("out", "out"), {unknown}}, "not in the session"},
      {"repeated across messages", 2, {block("fc0"), with({}, "fc0", 1)}, "sent twice in step 2"},
      {"repeated, then a bad block", 2, {with({}, "emb", 2), block("fc0", "fc0")},
       "sent twice in step 2"},
      {"no blocks", 2, {{}, {}}, "has no blocks"},
      {"out of order", 3, {block("fc0"), block("out")}, "the next step is 2"},
      {"old step", 0, {block("fc0"), block("out")}, "is out of order"},
  };
  for (const Case& c : cases) {
    auto want = OneShot(*one, Flatten(c.step, Loss(c.step), c.messages));
    auto got = Incremental(*inc, c.step, Loss(c.step), c.messages);
    ASSERT_FALSE(want.ok()) << c.what;
    EXPECT_EQ(got.status(), want.status()) << c.what;
    EXPECT_THAT(got.status().message(), HasSubstr(c.want)) << c.what;
    EXPECT_TRUE(google::protobuf::util::MessageDifferencer::Equals(inc->Snapshot(), before))
        << c.what;
  }
  // A retried step gets the cached reply whatever its blocks say, and is
  // decided before any of them is looked at.
  auto replay = Incremental(*inc, 1, Loss(1), {block("out", "out"), {unknown}});
  ASSERT_TRUE(replay.ok()) << replay.status();
  EXPECT_TRUE(replay->replayed);
  EXPECT_EQ(replay->reply->Serialized(), "step 1");
  EXPECT_TRUE(google::protobuf::util::MessageDifferencer::Equals(inc->Snapshot(), before));
}

// A session with a compute pool proposes the blocks that will not wait for
// the engine side by side (the adam blocks every step, the kfac blocks
// between refreshes); the results, the state and the error reported are
// those of proposing them one at a time.
TEST_P(IncrementalStep, ProposingSideBySideOnAPoolChangesNothing) {
  linalg::ComputePool pool(2);
  auto one = NewSession("s");
  auto pooled = Session::Create("s", "", Mixed(GetParam().dtype, GetParam().kl_clip,
                                              GetParam().adaptive), &engine_, &pool);
  ASSERT_TRUE(one && pooled.ok()) << pooled.status();
  Session& side = **pooled;
  for (int64_t t = 1; t <= 12; ++t) {
    const StepData d = Flatten(t, Loss(t), {MixedBlocks(t, float32())});
    auto a = OneShot(*one, d);
    auto b = OneShot(side, d);
    ASSERT_TRUE(a.ok()) << "step " << t << ": " << a.status();
    ASSERT_TRUE(b.ok()) << "step " << t << ": " << b.status();
    ExpectSameResult(ResultOf(*a), ResultOf(*b), t);
  }
  ExpectSameState(*one, side);
  const natgrad::v1::SessionSnapshot before = side.Snapshot();
  // Two bad blocks, proposed on different threads: the lower config index
  // is reported, and nothing moves.
  for (const std::vector<std::string>& bad :
       std::vector<std::vector<std::string>>{{"out", "emb"}, {"out", "fc1"}, {"emb"}}) {
    std::vector<BlockStepData> blocks = MixedBlocks(13, float32());
    for (const std::string& name : bad) {
      for (auto& b : MixedBlocks(13, float32(), name)) {
        if (b.name != name) continue;
        for (auto& slot : blocks)
          if (slot.name == name) slot = b;
      }
    }
    auto want = OneShot(*one, Flatten(13, Loss(13), {blocks}));
    auto got = OneShot(side, Flatten(13, Loss(13), {blocks}));
    ASSERT_FALSE(want.ok());
    EXPECT_EQ(got.status(), want.status()) << bad[0];
    const std::string lowest = bad.size() == 1 ? bad[0] : bad[1];
    EXPECT_THAT(got.status().message(), HasSubstr("block \"" + lowest + "\"")) << bad[0];
    EXPECT_TRUE(google::protobuf::util::MessageDifferencer::Equals(side.Snapshot(), before));
  }
  auto a = OneShot(*one, Flatten(13, Loss(13), {MixedBlocks(13, float32())}));
  auto b = OneShot(side, Flatten(13, Loss(13), {MixedBlocks(13, float32())}));
  ASSERT_TRUE(a.ok() && b.ok()) << a.status() << b.status();
  ExpectSameResult(ResultOf(*a), ResultOf(*b), 13);
}

TEST_P(IncrementalStep, ADroppedStepLeavesNoTrace) {
  auto one = NewSession("s"), inc = NewSession("s");
  ASSERT_TRUE(one && inc);
  ASSERT_TRUE(OneShot(*one, Flatten(1, Loss(1), {MixedBlocks(1, float32())})).ok());
  ASSERT_TRUE(Incremental(*inc, 1, Loss(1), {MixedBlocks(1, float32())}).ok());
  const natgrad::v1::SessionSnapshot before = inc->Snapshot();
  {
    // A stream that ends after two messages of step 2: proposed, never finished.
    std::unique_ptr<StepInProgress> step = inc->BeginStep(2);
    auto messages = Split(MixedBlocks(2, float32()), {1, 2});
    inc->ProposeBlocks(*step, std::move(messages[0]));
    inc->ProposeBlocks(*step, std::move(messages[1]));
  }
  EXPECT_TRUE(google::protobuf::util::MessageDifferencer::Equals(inc->Snapshot(), before));
  for (int64_t t = 2; t <= 4; ++t) {
    auto a = OneShot(*one, Flatten(t, Loss(t), {MixedBlocks(t, float32())}));
    auto b = Incremental(*inc, t, Loss(t), Split(MixedBlocks(t, float32()), {2}));
    ASSERT_TRUE(a.ok() && b.ok()) << a.status() << " " << b.status();
    ExpectSameResult(ResultOf(*a), ResultOf(*b), t);
  }
  ExpectSameState(*one, *inc);
}

TEST_P(IncrementalStep, ADeleteBetweenMessagesIsNotFound) {
  auto inc = NewSession("s");
  ASSERT_TRUE(inc);
  std::unique_ptr<StepInProgress> step = inc->BeginStep(1);
  auto messages = Split(MixedBlocks(1, float32()), {2});
  inc->ProposeBlocks(*step, std::move(messages[0]));
  inc->MarkDeleted();
  auto r = inc->FinishStep(*step, Loss(1), messages[1], Keep);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound) << r.status();
  EXPECT_EQ(inc->last_step(), 0);
}

TEST_P(IncrementalStep, AStepBegunOutOfOrderIsProposedOnceItIsNext) {
  // Not what the service does (one stream per session), but the session
  // must stay exact: a step begun before it was next proposes nothing early
  // and everything in FinishStep, against the state it then meets.
  auto one = NewSession("s"), inc = NewSession("s");
  ASSERT_TRUE(one && inc);
  ASSERT_TRUE(OneShot(*one, Flatten(1, Loss(1), {MixedBlocks(1, float32())})).ok());
  std::unique_ptr<StepInProgress> stale = inc->BeginStep(2);
  auto messages = Split(MixedBlocks(2, float32()), {2});
  inc->ProposeBlocks(*stale, std::move(messages[0]));
  // Step 2 begun early is out of order until step 1 lands, then valid.
  ASSERT_TRUE(Incremental(*inc, 1, Loss(1), {MixedBlocks(1, float32())}).ok());
  auto a = OneShot(*one, Flatten(2, Loss(2), {MixedBlocks(2, float32())}));
  auto b = inc->FinishStep(*stale, Loss(2), messages[1], Keep);
  ASSERT_TRUE(a.ok() && b.ok()) << a.status() << " " << b.status();
  ExpectSameResult(ResultOf(*a), ResultOf(*b), 2);
  ExpectSameState(*one, *inc);
  // A finished step cannot be finished again.
  EXPECT_EQ(inc->FinishStep(*stale, Loss(2), {}, Keep).status().code(),
            absl::StatusCode::kInternal);
}

INSTANTIATE_TEST_SUITE_P(
    KfacAndAdam, IncrementalStep,
    ::testing::Values(MixedCase{natgrad::v1::FLOAT32, false, false},
                      MixedCase{natgrad::v1::FLOAT64, false, false},
                      MixedCase{natgrad::v1::FLOAT32, true, false},
                      MixedCase{natgrad::v1::FLOAT64, true, false},
                      MixedCase{natgrad::v1::FLOAT32, true, true},
                      MixedCase{natgrad::v1::FLOAT64, true, true},
                      MixedCase{natgrad::v1::FLOAT64, false, true}),
    [](const auto& info) {
      return std::string(info.param.dtype == natgrad::v1::FLOAT32 ? "Float32" : "Float64") +
             (info.param.kl_clip ? "KlClip" : "") + (info.param.adaptive ? "LmDamping" : "");
    });

}  // namespace
}  // namespace natgrad::session
