// Replicas as real natgrad-server processes, stepped by router_load_client
// without a router (--no_router: redirects are followed by address). A run
// drained underneath, and one whose replica is SIGKILLed and restarted, must
// print exactly the digests of an undisturbed run (docs/replicas.md).
#include <spawn.h>
#include <sys/wait.h>

#include <chrono>
#include <fstream>
#include <iostream>
#include <thread>

#include "client/cpp/natgrad_client.h"
#include "gtest/gtest.h"
#include "grpcpp/grpcpp.h"
#include "natgrad/v1/admin_service.grpc.pb.h"
#include "tests/ops/ops_util.h"
#include "tests/ops/server_process.h"

namespace natgrad::testing {
namespace {

constexpr char kAdminToken[] = "admin-token-0123456789abcdef";
constexpr int kSessions = 3;
constexpr int kSteps = 40;

// Starts the load client; its pid.
pid_t StartLoadClient(const std::string& target, const std::string& out, int interval_ms) {
  std::vector<std::string> args = {NATGRAD_LOAD_CLIENT_PATH, "--target", target,
                                   "--sessions", std::to_string(kSessions),
                                   "--first_index", "0",
                                   "--steps", std::to_string(kSteps),
                                   "--out", out,
                                   "--step_interval_ms", std::to_string(interval_ms),
                                   "--no_router"};
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  pid_t pid = -1;
  if (posix_spawn(&pid, args[0].c_str(), nullptr, nullptr, argv.data(), environ) != 0) return -1;
  return pid;
}

int WaitClient(pid_t pid) {
  int status = 0;
  waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

// Polls (bounded) until every load-client session on `target` is past `step`.
bool WaitForProgress(const std::string& target, int64_t step) {
  client::ClientOptions o;
  o.target = target;
  o.max_retry_time = absl::Seconds(1);
  client::Client c(o);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (std::chrono::steady_clock::now() < deadline) {
    int past = 0;
    for (int i = 0; i < kSessions; ++i) {
      auto s = c.GetSession("sessions/rt-" + std::to_string(i));
      if (s.ok() && s->last_step() >= step) ++past;
    }
    if (past == kSessions) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return false;
}

std::string Reference(const std::string& dir) {
  ServerProcess ref({"--replica_name=reference"});
  EXPECT_TRUE(ref.running());
  const std::string out = dir + "/reference.txt";
  EXPECT_EQ(WaitClient(StartLoadClient(ref.target(), out, 0)), 0);
  return ReadText(out);
}

TEST(ReplicaProcess, ADrainUnderLoadChangesNoUpdate) {
  const std::string dir = MakeTempDir("ngreplica");
  { std::ofstream(dir + "/admin") << kAdminToken << "\n"; }
  const std::string expected = Reference(dir);
  ASSERT_EQ(std::count(expected.begin(), expected.end(), '\n'), kSessions);

  ServerProcess a({"--replica_name=replica-a", "--admin_token_file=" + dir + "/admin",
                   "--checkpoint_dir=" + dir + "/a", "--checkpoint_every_steps=1"});
  ServerProcess b({"--replica_name=replica-b", "--admin_token_file=" + dir + "/admin",
                   "--checkpoint_dir=" + dir + "/b", "--checkpoint_every_steps=1"});
  ASSERT_TRUE(a.running() && b.running());
  const std::string out = dir + "/drained.txt";
  const pid_t load = StartLoadClient(a.target(), out, 5);
  ASSERT_GT(load, 0);
  ASSERT_TRUE(WaitForProgress(a.target(), 5));

  auto admin = natgrad::v1::AdminService::NewStub(
      grpc::CreateChannel(a.target(), grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  ctx.AddMetadata("authorization", std::string("Bearer ") + kAdminToken);
  natgrad::v1::DrainRequest req;
  auto* peer = req.add_peers();
  peer->set_replica("replica-b");
  peer->set_address(b.target());
  natgrad::v1::DrainResponse resp;
  grpc::Status st = admin->Drain(&ctx, req, &resp);
  ASSERT_TRUE(st.ok()) << st.error_message();
  EXPECT_EQ(resp.moved(), kSessions);
  EXPECT_EQ(resp.failed(), 0);

  ASSERT_EQ(WaitClient(load), 0);
  EXPECT_EQ(ReadText(out), expected);
}

TEST(ReplicaProcess, SigkillAndRestartChangesNoUpdate) {
  const std::string dir = MakeTempDir("ngreplica");
  const std::string expected = Reference(dir);
  std::vector<std::string> flags = {"--replica_name=replica-a", "--checkpoint_dir=" + dir + "/a",
                                    "--checkpoint_every_steps=1"};
  auto a = std::make_unique<ServerProcess>(flags);
  ASSERT_TRUE(a->running());
  const int port = a->port();
  const std::string target = a->target();
  const std::string out = dir + "/killed.txt";
  const pid_t load = StartLoadClient(target, out, 5);
  ASSERT_GT(load, 0);
  ASSERT_TRUE(WaitForProgress(target, 5));

  const auto killed = std::chrono::steady_clock::now();
  a->Kill();
  flags.push_back("--address=127.0.0.1:" + std::to_string(port));  // the same port again
  a = std::make_unique<ServerProcess>(flags);
  ASSERT_TRUE(a->running());
  const auto serving = std::chrono::steady_clock::now();
  // When the clients' backoff brings them back: a session steps past where
  // the restart found it (polled; skipped if the run is already over).
  std::chrono::steady_clock::time_point resumed{};
  {
    client::ClientOptions o;
    o.target = target;
    client::Client c(o);
    auto restored = c.GetSession("sessions/rt-0");
    ASSERT_TRUE(restored.ok()) << restored.status();
    if (restored->last_step() < kSteps) {
      const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
      while (std::chrono::steady_clock::now() < deadline) {
        auto now = c.GetSession("sessions/rt-0");
        if (now.ok() && now->last_step() > restored->last_step()) {
          resumed = std::chrono::steady_clock::now();
          break;
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(2));
      }
    }
  }
  ASSERT_EQ(WaitClient(load), 0);
  EXPECT_EQ(ReadText(out), expected);
  // Figures for docs/replicas.md, not assertions.
  auto ms = [&](auto t) { return std::chrono::duration<double, std::milli>(t - killed).count(); };
  std::cout << "[ figure ] SIGKILL -> restarted replica serving: " << ms(serving) << " ms\n";
  if (resumed != std::chrono::steady_clock::time_point{}) {
    std::cout << "[ figure ] SIGKILL -> a client's next step applied: " << ms(resumed)
              << " ms\n";
  }
}

}  // namespace
}  // namespace natgrad::testing
