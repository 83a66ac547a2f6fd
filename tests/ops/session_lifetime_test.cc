// --idle_session_ttl on the real binary (issue 11): a session with no step
// and no GetSession for the TTL is deleted with its checkpoint files and
// counted in natgrad_sessions_expired_total; sessions kept busy by steps or
// by GetSession stay. Polls with deadlines, no fixed sleeps.
#include <filesystem>

#include "client/cpp/natgrad_client.h"
#include "client/cpp/tensor.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/ops/http_get.h"
#include "tests/ops/ops_util.h"
#include "tests/ops/server_process.h"

namespace natgrad::testing {
namespace {

natgrad::v1::SessionConfig Config() {
  natgrad::v1::SessionConfig c;
  auto* b = c.add_blocks();
  b->set_name("w");
  b->add_shape(2);
  b->mutable_sgd();
  return c;
}

int CheckpointFilesOf(const std::string& dir, const std::string& name) {
  const std::string id = name.substr(name.find('/') + 1);
  int n = 0;
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    n += e.path().filename().string().rfind(id + ".", 0) == 0;
  }
  return n;
}

TEST(SessionLifetime, IdleSessionsExpireWithTheirCheckpointsBusyOnesStay) {
  const std::string dir = MakeTempDir("ngttl");
  const std::string mfile = dir + "/mport";
  const std::vector<std::string> flags = {
      "--checkpoint_dir=" + dir + "/ckpt", "--checkpoint_every_steps=1",
      "--idle_session_ttl=1s", "--metrics_address=127.0.0.1:0",
      "--metrics_port_file=" + mfile};
  ServerProcess server(flags);
  ASSERT_TRUE(server.running());
  client::ClientOptions o;
  o.target = server.target();
  client::Client client(o);
  auto idle = client.CreateSession(Config());
  auto stepped = client.CreateSession(Config());
  auto watched = client.CreateSession(Config());
  ASSERT_TRUE(idle.ok() && stepped.ok() && watched.ok());
  EXPECT_GE(CheckpointFilesOf(dir + "/ckpt", idle->name()), 1);
  auto stream = client.OpenStream(stepped->name());
  ASSERT_TRUE(stream.ok());
  natgrad::v1::BlockStep step;
  step.set_name("w");
  *step.mutable_gradient() = client::MakeTensor(std::vector<float>{1, 2}, {2});

  const int mport = ReadPort(mfile);
  double expired = -1;
  // Keeps two sessions busy (a step, a get) while waiting for the idle one.
  const bool done = PollUntil(
      [&] {
        EXPECT_TRUE((*stream)->Step({step}).ok());
        EXPECT_TRUE(client.GetSession(watched->name()).ok());
        auto m = HttpGet(mport, "/metrics");
        expired = m.has_value() ? MetricSample(*m, "natgrad_sessions_expired_total") : -1;
        return expired >= 1;
      },
      std::chrono::seconds(60));
  ASSERT_TRUE(done) << "natgrad_sessions_expired_total = " << expired;
  EXPECT_EQ(expired, 1);
  EXPECT_EQ(client.GetSession(idle->name()).status().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(client.GetSession(stepped->name()).ok());
  EXPECT_TRUE(client.GetSession(watched->name()).ok());
  EXPECT_EQ(CheckpointFilesOf(dir + "/ckpt", idle->name()), 0);
  auto listed = client.ListSessions();
  ASSERT_TRUE(listed.ok());
  EXPECT_EQ(listed->size(), 2u);

  // A restart does not bring the expired session back.
  server.Kill();
  ServerProcess restarted(flags);
  ASSERT_TRUE(restarted.running());
  o.target = restarted.target();
  client::Client again(o);
  EXPECT_EQ(again.GetSession(idle->name()).status().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(again.GetSession(stepped->name()).ok());
}

TEST(SessionLifetime, NegativeTtlIsRefusedAtStartUp) {
  ServerProcess bad({"--idle_session_ttl=-1s"});
  EXPECT_FALSE(bad.running());
}

}  // namespace
}  // namespace natgrad::testing
