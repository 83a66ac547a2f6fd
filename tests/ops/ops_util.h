// Helpers of the issue-11 operations tests: port files, metric samples, log
// files, and polling with a deadline (never a fixed sleep as synchronisation).
#ifndef NATGRAD_TESTS_OPS_OPS_UTIL_H_
#define NATGRAD_TESTS_OPS_OPS_UTIL_H_

#include <chrono>
#include <fstream>
#include <functional>
#include <sstream>
#include <string>
#include <thread>

namespace natgrad::testing {

inline std::string ReadText(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

// The number in a port file (written by the server before it serves), or 0.
inline int ReadPort(const std::string& path) {
  std::ifstream in(path);
  int port = 0;
  return in >> port ? port : 0;
}

// The value of the sample "series value" in Prometheus text, or -1.
inline double MetricSample(const std::string& text, const std::string& series) {
  const size_t at = ("\n" + text).find("\n" + series + " ");
  if (at == std::string::npos) return -1;
  return std::stod(text.substr(at + series.size() + 1));
}

// Polls `done` every 20 ms until it holds or `timeout` passes.
inline bool PollUntil(const std::function<bool()>& done, std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < deadline) {
    if (done()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return done();
}

}  // namespace natgrad::testing

#endif  // NATGRAD_TESTS_OPS_OPS_UTIL_H_
