// libnatgrad_c.so as an FFI (Julia's ccall) uses it: this process links
// nothing of natgrad but the shared library, talks to a natgrad-server child
// process, and sees only natgrad_* exported.
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "client/c/natgrad.h"
#include "gtest/gtest.h"

extern "C" int natgrad_c_smoke(const char* target, char* message, size_t message_size);
extern char** environ;

namespace {

// natgrad-server on an ephemeral port (or `port`), found through --port_file.
class ServerProcess {
 public:
  explicit ServerProcess(std::vector<std::string> flags = {}, int port = 0) {
    port_file_ = ::testing::TempDir() + "/natgrad_c_shared_port_" + std::to_string(getpid());
    std::remove(port_file_.c_str());
    std::vector<std::string> args = {NATGRAD_SERVER_BINARY,
                                     "--address=127.0.0.1:" + std::to_string(port),
                                     "--port_file=" + port_file_, "--inversion_backend=cpu",
                                     "--shutdown_grace_s=1"};
    args.insert(args.end(), flags.begin(), flags.end());
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    if (posix_spawn(&pid_, argv[0], nullptr, nullptr, argv.data(), environ) != 0) pid_ = -1;
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    while (pid_ > 0 && port_ == 0 && std::chrono::steady_clock::now() < deadline) {
      std::ifstream in(port_file_);
      if (!(in >> port_) || port_ <= 0) {
        port_ = 0;
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
      }
    }
  }
  ~ServerProcess() {
    if (pid_ > 0) {
      kill(pid_, SIGTERM);
      int status;
      waitpid(pid_, &status, 0);
    }
    std::remove(port_file_.c_str());
  }
  int port() const { return port_; }
  std::string target() const { return "127.0.0.1:" + std::to_string(port_); }
  void Kill() {
    if (pid_ <= 0) return;
    kill(pid_, SIGKILL);
    int status;
    waitpid(pid_, &status, 0);
    pid_ = -1;
  }

 private:
  std::string port_file_;
  pid_t pid_ = -1;
  int port_ = 0;
};

TEST(SharedLibrary, C99SmokeProgramAgainstServerProcess) {
  ServerProcess server;
  ASSERT_GT(server.port(), 0) << "natgrad-server did not start: " << NATGRAD_SERVER_BINARY;
  char message[1024];
  EXPECT_EQ(natgrad_c_smoke(server.target().c_str(), message, sizeof(message)), 0) << message;
}

TEST(SharedLibrary, ManyStepsF64) {
  ServerProcess server;
  ASSERT_GT(server.port(), 0);
  natgrad_client* client = nullptr;
  ASSERT_EQ(natgrad_client_new(server.target().c_str(), nullptr, &client), NATGRAD_OK);
  const char* names[] = {"w"};
  const char* kinds[] = {"sgd"};
  const int32_t nd[] = {2};
  const int64_t dims[] = {2, 2};
  const char* keys[] = {"learning_rate", "momentum", "state_float64"};
  const double values[] = {0.1, 0.9, 1};
  natgrad_session* s = nullptr;
  ASSERT_EQ(natgrad_session_create_simple(client, 1, names, kinds, nd, dims, 3, keys, values,
                                          nullptr, &s),
            NATGRAD_OK)
      << natgrad_last_error();
  // Heavy-ball SGD by hand: m = 0.9 m + g; delta = -0.1 m.
  double m[4] = {0, 0, 0, 0};
  for (int t = 1; t <= 50; ++t) {
    double g[4] = {1.0 * t, -0.5, 0.25 / t, 2.0};
    double delta[4];
    const double* gp[] = {g};
    double* dp[] = {delta};
    ASSERT_EQ(natgrad_session_step_f64(s, 1, names, nd, dims, gp, nullptr, nullptr, nullptr,
                                       nullptr, NAN, dp),
              NATGRAD_OK)
        << natgrad_last_error();
    for (int i = 0; i < 4; ++i) {
      m[i] = 0.9 * m[i] + g[i];
      ASSERT_NEAR(delta[i], -0.1 * m[i], 1e-12 * (1 + std::fabs(m[i]))) << t;
    }
  }
  EXPECT_EQ(natgrad_session_delete(s), NATGRAD_OK);
  natgrad_session_free(s);
  natgrad_client_free(client);
}

// The C ABI steps through the C++ SessionStream, so it inherits its replay:
// with --checkpoint_every_steps=10 a SIGKILL at step 13 restores step 10, the
// stream sends 11..13 again, and the deltas continue exactly.
TEST(SharedLibrary, StepsLostBySigkillBetweenCheckpointsAreSentAgain) {
  char dir_template[] = "/tmp/natgrad_c_replay_XXXXXX";
  ASSERT_NE(mkdtemp(dir_template), nullptr);
  const std::vector<std::string> flags = {std::string("--checkpoint_dir=") + dir_template,
                                          "--checkpoint_every_steps=10"};
  auto server = std::make_unique<ServerProcess>(flags);
  ASSERT_GT(server->port(), 0);
  const int port = server->port();
  natgrad_client* client = nullptr;
  ASSERT_EQ(natgrad_client_new(server->target().c_str(), nullptr, &client), NATGRAD_OK);
  const char* names[] = {"w"};
  const char* kinds[] = {"sgd"};
  const int32_t nd[] = {1};
  const int64_t dims[] = {3};
  const char* keys[] = {"learning_rate", "momentum", "state_float64"};
  const double values[] = {0.1, 0.9, 1};
  natgrad_session* s = nullptr;
  ASSERT_EQ(natgrad_session_create_simple(client, 1, names, kinds, nd, dims, 3, keys, values,
                                          nullptr, &s),
            NATGRAD_OK)
      << natgrad_last_error();
  // Heavy-ball SGD by hand, as above: the momentum buffer is what a lost
  // step would corrupt.
  double m[3] = {0, 0, 0};
  for (int t = 1; t <= 25; ++t) {
    double g[3] = {1.0 * t, -0.5, 0.25 / t};
    double delta[3];
    const double* gp[] = {g};
    double* dp[] = {delta};
    ASSERT_EQ(natgrad_session_step_f64(s, 1, names, nd, dims, gp, nullptr, nullptr, nullptr,
                                       nullptr, NAN, dp),
              NATGRAD_OK)
        << "step " << t << ": " << natgrad_last_error();
    for (int i = 0; i < 3; ++i) {
      m[i] = 0.9 * m[i] + g[i];
      ASSERT_NEAR(delta[i], -0.1 * m[i], 1e-12 * (1 + std::fabs(m[i]))) << t;
    }
    if (t == 13 || t == 17) {  // the server restarts at step 10
      server->Kill();
      server = std::make_unique<ServerProcess>(flags, port);
      ASSERT_EQ(server->port(), port);
    }
  }
  int64_t last = 0;
  ASSERT_EQ(natgrad_session_last_step(s, &last), NATGRAD_OK);
  EXPECT_EQ(last, 25);
  EXPECT_EQ(natgrad_session_delete(s), NATGRAD_OK);
  natgrad_session_free(s);
  natgrad_client_free(client);
}

// The version script keeps the client, protobuf code and absl inline
// functions private: a host with its own copies cannot bind to ours.
TEST(SharedLibrary, ExportsOnlyTheCApi) {
  const std::string cmd = std::string("nm -D --defined-only '") + NATGRAD_C_LIBRARY + "'";
  FILE* nm = popen(cmd.c_str(), "r");
  ASSERT_NE(nm, nullptr);
  char line[4096];
  int api = 0;
  std::vector<std::string> other;
  while (fgets(line, sizeof(line), nm) != nullptr) {
    // "<address> <type> <name>"
    std::string s(line);
    const size_t space = s.rfind(' ');
    std::string name = s.substr(space + 1);
    while (!name.empty() && (name.back() == '\n' || name.back() == '\r')) name.pop_back();
    if (name.rfind("natgrad_", 0) == 0) {
      ++api;
    } else {
      other.push_back(name);
    }
  }
  ASSERT_EQ(pclose(nm), 0) << cmd;
  EXPECT_GE(api, 15);
  EXPECT_TRUE(other.empty()) << "unexpected export: " << other.front();
}

}  // namespace
