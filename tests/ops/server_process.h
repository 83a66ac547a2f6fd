// natgrad-server as a child process, for tests that kill, restart and signal
// it. The binary path comes from NATGRAD_SERVER (set by CTest).
#ifndef NATGRAD_TESTS_OPS_SERVER_PROCESS_H_
#define NATGRAD_TESTS_OPS_SERVER_PROCESS_H_

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <optional>
#include <string>
#include <thread>
#include <vector>

extern char** environ;

namespace natgrad::testing {

inline std::string MakeTempDir(const std::string& prefix) {
  std::string tmpl = "/tmp/" + prefix + "XXXXXX";
  return mkdtemp(tmpl.data());
}

class ServerProcess {
 public:
  // Starts the server with --address=127.0.0.1:0 and waits (bounded) until
  // it has written its port file, i.e. it is serving.
  // With `log_file`, the server's stdout and stderr go there (tests that
  // check a log line).
  explicit ServerProcess(std::vector<std::string> flags, std::string log_file = "") {
    const char* bin = std::getenv("NATGRAD_SERVER");
#ifdef NATGRAD_SERVER_PATH
    binary_ = bin != nullptr ? bin : NATGRAD_SERVER_PATH;
#else
    binary_ = bin != nullptr ? bin : "natgrad-server";
#endif
    port_file_ = MakeTempDir("ngport") + "/port";
    std::vector<std::string> args = {binary_, "--address=127.0.0.1:0",
                                     "--port_file=" + port_file_, "--inversion_backend=cpu"};
    args.insert(args.end(), flags.begin(), flags.end());
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    if (!log_file.empty()) {
      posix_spawn_file_actions_addopen(&actions, 1, log_file.c_str(),
                                       O_WRONLY | O_CREAT | O_APPEND, 0644);
      posix_spawn_file_actions_adddup2(&actions, 1, 2);
    }
    const int spawned =
        posix_spawn(&pid_, binary_.c_str(), &actions, nullptr, argv.data(), environ);
    posix_spawn_file_actions_destroy(&actions);
    if (spawned != 0) {
      pid_ = -1;
      return;
    }
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    while (std::chrono::steady_clock::now() < deadline) {
      std::ifstream in(port_file_);
      if (in >> port_) return;
      int status;
      if (waitpid(pid_, &status, WNOHANG) == pid_) {  // died during start-up
        pid_ = -1;
        return;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
  }
  ~ServerProcess() {
    if (pid_ > 0) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
  }

  bool running() const { return pid_ > 0 && port_ > 0; }
  pid_t pid() const { return pid_; }
  int port() const { return port_; }
  std::string target() const { return "127.0.0.1:" + std::to_string(port_); }

  void Signal(int sig) { kill(pid_, sig); }

  // Waits for exit; the exit status, or nullopt on timeout.
  std::optional<int> WaitExit(std::chrono::milliseconds timeout) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < deadline) {
      int status = 0;
      if (waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    return std::nullopt;
  }

  void Kill() {
    Signal(SIGKILL);
    WaitExit(std::chrono::seconds(10));
  }

 private:
  std::string binary_;
  std::string port_file_;
  pid_t pid_ = -1;
  int port_ = 0;
};

}  // namespace natgrad::testing

#endif  // NATGRAD_TESTS_OPS_SERVER_PROCESS_H_
