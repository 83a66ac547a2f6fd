// Issue 11, data-loss case 3 on the real binary: a step that would make an
// update or the state non-finite (a huge learning rate, momentum that would
// diverge) is refused, so the checkpoint written after every step never
// holds Inf, the session survives a SIGKILL and restart at its last good
// step, and its export imports. Configs that cannot work (momentum 10) are
// refused at CreateSession.
#include <string>
#include <vector>

#include "client/cpp/natgrad_client.h"
#include "client/cpp/tensor.h"
#include "gmock/gmock.h"
#include "google/protobuf/util/message_differencer.h"
#include "gtest/gtest.h"
#include "tests/ops/server_process.h"

namespace natgrad::testing {
namespace {

using ::testing::HasSubstr;

natgrad::v1::SessionConfig Config(double momentum) {
  natgrad::v1::SessionConfig c;
  c.set_state_dtype(natgrad::v1::FLOAT64);
  auto* w = c.add_blocks();
  w->set_name("w");
  w->add_shape(3);
  w->mutable_sgd()->mutable_learning_rate()->mutable_constant()->set_value(0.1);
  w->mutable_sgd()->mutable_momentum()->mutable_constant()->set_value(momentum);
  auto* a = c.add_blocks();
  a->set_name("a");
  a->add_shape(3);
  a->mutable_adam();
  return c;
}

std::vector<natgrad::v1::BlockStep> Step(double lr) {
  std::vector<natgrad::v1::BlockStep> blocks(2);
  blocks[0].set_name("w");
  *blocks[0].mutable_gradient() = client::MakeTensor(std::vector<float>{1, -2, 3}, {3});
  if (lr > 0) blocks[0].set_learning_rate(lr);
  blocks[1].set_name("a");
  *blocks[1].mutable_gradient() = client::MakeTensor(std::vector<float>{0.5f, 0, -1}, {3});
  if (lr > 0) blocks[1].set_learning_rate(lr);
  return blocks;
}

client::Client ClientOf(const ServerProcess& server) {
  client::ClientOptions o;
  o.target = server.target();
  return client::Client(o);
}

TEST(NonFinite, RefusedStepsLeaveARestorableSessionWhoseExportImports) {
  const std::string dir = MakeTempDir("ngnonfinite");
  const std::vector<std::string> flags = {"--checkpoint_dir=" + dir,
                                          "--checkpoint_every_steps=1"};
  std::string name;
  natgrad::v1::SessionSnapshot good;
  {
    ServerProcess server(flags);
    ASSERT_TRUE(server.running());
    client::Client client = ClientOf(server);
    auto refused = client.CreateSession(Config(10));
    EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(refused.status().message(), HasSubstr("sgd.momentum"));

    auto session = client.CreateSession(Config(0.9));
    ASSERT_TRUE(session.ok()) << session.status();
    name = session->name();
    auto stream = client.OpenStream(name);
    ASSERT_TRUE(stream.ok());
    for (int t = 1; t <= 3; ++t) ASSERT_TRUE((*stream)->Step(Step(0)).ok()) << t;
    good = *client.ExportSession(name);
    // 1e308 overflows the sgd delta; 1e39 overflows the float32 the client
    // holds for adam's delta. Both are refused, nothing changes.
    for (double lr : {1e308, 1e39}) {
      auto r = (*stream)->Step(Step(lr));
      EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << lr;
      EXPECT_THAT(r.status().message(), HasSubstr("delta would")) << lr;
    }
    auto after = client.ExportSession(name);
    ASSERT_TRUE(after.ok());
    EXPECT_EQ(after->last_step(), 3);
    EXPECT_TRUE(google::protobuf::util::MessageDifferencer::Equals(*after, good));
    server.Kill();
  }
  ServerProcess restarted(flags);
  ASSERT_TRUE(restarted.running());
  client::Client client = ClientOf(restarted);
  auto restored = client.GetSession(name);
  ASSERT_TRUE(restored.ok()) << restored.status();
  EXPECT_EQ(restored->last_step(), 3);
  auto exported = client.ExportSession(name);
  ASSERT_TRUE(exported.ok());
  natgrad::v1::ImportSessionRequest req;
  *req.mutable_snapshot() = *exported;
  req.set_session_id("imported-copy");
  grpc::ClientContext ctx;
  natgrad::v1::Session imported;
  grpc::Status s = client.stub().ImportSession(&ctx, req, &imported);
  EXPECT_TRUE(s.ok()) << s.error_message();
  // And the restored session continues.
  auto stream = client.OpenStream(name);
  ASSERT_TRUE(stream.ok());
  auto next = (*stream)->Step(Step(0));
  EXPECT_TRUE(next.ok()) << next.status();
}

}  // namespace
}  // namespace natgrad::testing
