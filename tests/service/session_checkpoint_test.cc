// The C++ client's full checkpoints: bytes saved mid-run restore into a
// fresh server (empty state) and the run continues bit for bit; a server that
// already has the session at another step, or garbage bytes, are refused.
#include "client/cpp/session_checkpoint.h"

#include "gmock/gmock.h"
#include "tests/service/server_fixture.h"

namespace natgrad::testing {
namespace {

using ::testing::HasSubstr;

natgrad::v1::SessionConfig Config() {
  natgrad::v1::SessionConfig c;
  c.set_state_dtype(natgrad::v1::FLOAT64);
  auto* w = c.add_blocks();
  w->set_name("w");
  w->add_shape(3);
  w->add_shape(2);
  *w->mutable_adam()->mutable_learning_rate() = Constant(0.01);
  auto* b = c.add_blocks();
  b->set_name("b");
  b->add_shape(3);
  *b->mutable_sgd()->mutable_learning_rate() = Constant(0.1);
  *b->mutable_sgd()->mutable_momentum() = Constant(0.9);
  return c;
}

std::vector<natgrad::v1::BlockStep> Step(int t) {
  std::mt19937 rng(100 + t);
  natgrad::v1::BlockStep w, b;
  w.set_name("w");
  *w.mutable_gradient() = client::MakeTensor(RandomVector(rng, 6), {3, 2});
  b.set_name("b");
  *b.mutable_gradient() = client::MakeTensor(RandomVector(rng, 3), {3});
  return {w, b};
}

TEST(SessionCheckpoint, RestoresIntoAFreshServerAndContinuesExactly) {
  auto a = StartServer();
  client::Client ca(ClientFor(*a));
  auto session = ca.CreateSession(Config(), "job-7");
  ASSERT_TRUE(session.ok()) << session.status();
  auto stream = ca.OpenStream(session->name());
  ASSERT_TRUE(stream.ok());
  for (int t = 1; t <= 5; ++t) ASSERT_TRUE((*stream)->Step(Step(t)).ok());
  auto saved = client::SaveCheckpoint(ca, session->name());
  ASSERT_TRUE(saved.ok()) << saved.status();
  const std::string bytes = saved->Serialize();
  std::vector<natgrad::v1::StepResponse> want;
  for (int t = 6; t <= 10; ++t) want.push_back(*(*stream)->Step(Step(t)));

  auto b = StartServer();
  client::Client cb(ClientFor(*b));
  auto parsed = client::SessionCheckpoint::Parse(bytes);
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_EQ(parsed->session, session->name());
  EXPECT_EQ(parsed->step, 5);
  auto restored = client::RestoreCheckpoint(cb, *parsed);
  ASSERT_TRUE(restored.ok()) << restored.status();
  EXPECT_EQ(restored->name(), session->name());
  auto resumed = cb.OpenStream(restored->name());
  ASSERT_TRUE(resumed.ok());
  EXPECT_EQ((*resumed)->next_step(), 6);
  for (int t = 6; t <= 10; ++t) {
    auto got = (*resumed)->Step(Step(t));
    ASSERT_TRUE(got.ok()) << got.status();
    for (int i = 0; i < 2; ++i) {
      EXPECT_EQ(client::TensorValues(got->updates(i).delta()),
                client::TensorValues(want[t - 6].updates(i).delta()))
          << "step " << t << " block " << i;
    }
  }
  // Restoring again where the session now is at step 10 is refused.
  auto again = client::RestoreCheckpoint(cb, *parsed);
  ASSERT_FALSE(again.ok());
  EXPECT_EQ(again.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(again.status().message(), HasSubstr("at step 10 on the server"));
}

TEST(SessionCheckpoint, VerifiesAgainstAServerThatHasTheSession) {
  auto a = StartServer();
  client::Client c(ClientFor(*a));
  auto session = c.CreateSession(Config());
  ASSERT_TRUE(session.ok());
  auto stream = c.OpenStream(session->name());
  for (int t = 1; t <= 3; ++t) ASSERT_TRUE((*stream)->Step(Step(t)).ok());
  auto saved = client::SaveCheckpoint(c, session->name());
  ASSERT_TRUE(saved.ok());
  auto same = client::RestoreCheckpoint(c, *saved);
  ASSERT_TRUE(same.ok()) << same.status();
  EXPECT_EQ(same->last_step(), 3);
  EXPECT_FALSE(client::SessionCheckpoint::Parse("not a checkpoint").ok());
  EXPECT_EQ(client::SessionCheckpoint::Parse("").status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace natgrad::testing
