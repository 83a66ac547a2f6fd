// Tenants on the real binary (issue 11): session ids are per tenant, so a
// client-chosen id taken by another tenant is neither refused nor revealed,
// both sessions live side by side (checkpoints included, across a restart),
// and a bad tokens file on SIGHUP is an error in the log and a metric while
// the previous tokens stay in force.
#include <filesystem>
#include <fstream>

#include "client/cpp/natgrad_client.h"
#include "client/cpp/tensor.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/ops/http_get.h"
#include "tests/ops/ops_util.h"
#include "tests/ops/server_process.h"

namespace natgrad::testing {
namespace {

using ::testing::HasSubstr;

constexpr char kAlice[] = "alice-token-0123456789";
constexpr char kBob[] = "bob-token-0123456789abc";

natgrad::v1::SessionConfig Config() {
  natgrad::v1::SessionConfig c;
  auto* b = c.add_blocks();
  b->set_name("w");
  b->add_shape(3);
  b->mutable_sgd();
  return c;
}

client::Client As(const ServerProcess& s, const std::string& token) {
  client::ClientOptions o;
  o.target = s.target();
  o.bearer_token = token;
  o.initial_backoff = absl::Milliseconds(5);
  return client::Client(o);
}

std::string TokensFile() {
  const std::string path = MakeTempDir("ngten") + "/tokens";
  std::ofstream(path) << kAlice << " alice\n" << kBob << " bob\n";
  return path;
}

int Steps(client::Client& c, const std::string& name, int n) {
  auto stream = c.OpenStream(name);
  if (!stream.ok()) return -1;
  natgrad::v1::BlockStep s;
  s.set_name("w");
  *s.mutable_gradient() = client::MakeTensor(std::vector<float>{1, 2, 3}, {3});
  for (int i = 0; i < n; ++i) {
    if (!(*stream)->Step({s}).ok()) return -1;
  }
  return n;
}

TEST(TenantIsolation, SameSessionIdUnderTwoTenantsCoexistsAcrossRestarts) {
  const std::string tokens = TokensFile();
  const std::string dir = MakeTempDir("ngtenck");
  const std::vector<std::string> flags = {"--auth_tokens_file=" + tokens,
                                          "--checkpoint_dir=" + dir,
                                          "--checkpoint_every_steps=1"};
  ServerProcess server(flags);
  ASSERT_TRUE(server.running());
  client::Client alice = As(server, kAlice), bob = As(server, kBob);
  auto a = alice.CreateSession(Config(), "shared-id");
  ASSERT_TRUE(a.ok()) << a.status();
  // Bob picks the same id: not ALREADY_EXISTS, which would reveal Alice's.
  auto b = bob.CreateSession(Config(), "shared-id");
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(b->name(), "sessions/shared-id");
  // Within one tenant an id is still unique.
  EXPECT_EQ(alice.CreateSession(Config(), "shared-id").status().code(),
            absl::StatusCode::kAlreadyExists);
  ASSERT_EQ(Steps(alice, "sessions/shared-id", 3), 3);
  ASSERT_EQ(Steps(bob, "sessions/shared-id", 1), 1);
  EXPECT_EQ(alice.GetSession("sessions/shared-id")->last_step(), 3);
  EXPECT_EQ(bob.GetSession("sessions/shared-id")->last_step(), 1);

  server.Kill();
  ServerProcess restarted(flags);
  ASSERT_TRUE(restarted.running());
  client::Client alice2 = As(restarted, kAlice), bob2 = As(restarted, kBob);
  EXPECT_EQ(alice2.GetSession("sessions/shared-id")->last_step(), 3);
  EXPECT_EQ(bob2.GetSession("sessions/shared-id")->last_step(), 1);
  // Bob's delete leaves Alice's session and checkpoint alone.
  ASSERT_TRUE(bob2.DeleteSession("sessions/shared-id").ok());
  EXPECT_EQ(bob2.GetSession("sessions/shared-id").status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(alice2.GetSession("sessions/shared-id")->last_step(), 3);
  restarted.Kill();
  ServerProcess third(flags);
  ASSERT_TRUE(third.running());
  EXPECT_EQ(As(third, kAlice).GetSession("sessions/shared-id")->last_step(), 3);
  EXPECT_EQ(As(third, kBob).GetSession("sessions/shared-id").status().code(),
            absl::StatusCode::kNotFound);
}

TEST(TenantIsolation, BadTokensFileOnSighupKeepsOldTokensWithLogAndMetric) {
  const std::string tokens = TokensFile();
  const std::string dir = MakeTempDir("ngtenlog");
  const std::string log = dir + "/server.log", mfile = dir + "/mport";
  ServerProcess server({"--auth_tokens_file=" + tokens, "--metrics_address=127.0.0.1:0",
                        "--metrics_port_file=" + mfile},
                       log);
  ASSERT_TRUE(server.running());
  ASSERT_TRUE(As(server, kAlice).ListSessions().ok());
  std::ofstream(tokens, std::ios::trunc) << "short carol\n";  // token too short
  server.Signal(SIGHUP);
  const int mport = ReadPort(mfile);
  double failed = -1;
  ASSERT_TRUE(PollUntil(
      [&] {
        auto m = HttpGet(mport, "/metrics");
        failed = m ? MetricSample(*m, "natgrad_token_reloads_total{outcome=\"error\"}") : -1;
        return failed >= 1;
      },
      std::chrono::seconds(30)));
  EXPECT_EQ(failed, 1);
  EXPECT_TRUE(PollUntil([&] { return ReadText(log).find("tokens not reloaded") !=
                                     std::string::npos; },
                        std::chrono::seconds(30)));
  EXPECT_THAT(ReadText(log), HasSubstr("error natgrad-server: SIGHUP"));
  // The previous tokens are still in force.
  EXPECT_TRUE(As(server, kAlice).ListSessions().ok());
  EXPECT_TRUE(As(server, kBob).ListSessions().ok());
  EXPECT_EQ(As(server, "carol-token-0123456789").ListSessions().status().code(),
            absl::StatusCode::kUnauthenticated);
  // A good file afterwards is applied and counted.
  std::ofstream(tokens, std::ios::trunc) << "carol-token-0123456789 carol\n";
  server.Signal(SIGHUP);
  ASSERT_TRUE(PollUntil([&] { return As(server, "carol-token-0123456789").ListSessions().ok(); },
                        std::chrono::seconds(30)));
  EXPECT_EQ(As(server, kAlice).ListSessions().status().code(),
            absl::StatusCode::kUnauthenticated);
  auto m = HttpGet(mport, "/metrics");
  ASSERT_TRUE(m.has_value());
  EXPECT_EQ(MetricSample(*m, "natgrad_token_reloads_total{outcome=\"ok\"}"), 1);
}

// A token removed from the file and reloaded with SIGHUP ends that token's
// open Step stream at its next message; other tenants' streams go on.
TEST(TenantIsolation, RevokedTokenEndsItsOpenStream) {
  const std::string tokens = TokensFile();
  ServerProcess server({"--auth_tokens_file=" + tokens});
  ASSERT_TRUE(server.running());
  client::Client alice = As(server, kAlice), bob = As(server, kBob);
  auto a = alice.CreateSession(Config());
  auto b = bob.CreateSession(Config());
  ASSERT_TRUE(a.ok() && b.ok());
  auto sa = alice.OpenStream(a->name());
  auto sb = bob.OpenStream(b->name());
  ASSERT_TRUE(sa.ok() && sb.ok());
  natgrad::v1::BlockStep s;
  s.set_name("w");
  *s.mutable_gradient() = client::MakeTensor(std::vector<float>{1, 2, 3}, {3});
  ASSERT_TRUE((*sa)->Step({s}).ok());
  ASSERT_TRUE((*sb)->Step({s}).ok());
  std::ofstream(tokens, std::ios::trunc) << kBob << " bob\n";
  server.Signal(SIGHUP);
  ASSERT_TRUE(PollUntil([&] {
    return As(server, kAlice).ListSessions().status().code() == absl::StatusCode::kUnauthenticated;
  }, std::chrono::seconds(30)));
  auto refused = (*sa)->Step({s});
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kUnauthenticated);
  EXPECT_TRUE((*sb)->Step({s}).ok());
}

}  // namespace
}  // namespace natgrad::testing
