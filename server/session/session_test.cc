// The step protocol of one session, in-process on core types: ordering,
// replay of the cached reply, rejected steps changing nothing, blocks left
// out, deletion, and restore of the cached reply from a snapshot.
#include "server/session/session.h"

#include "gmock/gmock.h"
#include "google/protobuf/util/message_differencer.h"
#include "gtest/gtest.h"
#include "server/engine/testing/eigen_inversion_engine.h"

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

}  // namespace
}  // namespace natgrad::session
