#include "server/common/log.h"

#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <mutex>
#include <string>

#include "absl/strings/ascii.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace natgrad::log {
namespace {

std::atomic<int> g_level{static_cast<int>(Level::kInfo)};
std::atomic<int> g_fd{2};
// A plain std::mutex: the logger must work before and after absl's
// synchronisation is usable (static destruction, signal-time shutdown).
std::mutex& WriteMutex() {
  static auto* mu = new std::mutex;
  return *mu;
}

}  // namespace

absl::StatusOr<Level> ParseLevel(absl::string_view name) {
  const std::string n = absl::AsciiStrToLower(name);
  if (n == "debug") return Level::kDebug;
  if (n == "info") return Level::kInfo;
  if (n == "warning" || n == "warn") return Level::kWarning;
  if (n == "error") return Level::kError;
  return absl::InvalidArgumentError(
      absl::StrCat("log level \"", name, "\": expected debug, info, warning or error"));
}

absl::string_view LevelName(Level level) {
  switch (level) {
    case Level::kDebug:
      return "debug";
    case Level::kInfo:
      return "info";
    case Level::kWarning:
      return "warning";
    case Level::kError:
      return "error";
  }
  return "unknown";
}

void SetLevel(Level level) { g_level.store(static_cast<int>(level), std::memory_order_relaxed); }

Level GetLevel() { return static_cast<Level>(g_level.load(std::memory_order_relaxed)); }

void SetFdForTesting(int fd) { g_fd.store(fd, std::memory_order_relaxed); }

void Write(Level level, absl::string_view message) {
  std::string line = absl::StrCat(
      absl::FormatTime("%Y-%m-%dT%H:%M:%E6SZ", absl::Now(), absl::UTCTimeZone()), " ",
      LevelName(level), " natgrad-server: ");
  const size_t body = line.size();
  absl::StrAppend(&line, message);
  for (size_t i = body; i < line.size(); ++i) {
    if (line[i] == '\n' || line[i] == '\r') line[i] = ' ';
  }
  line.push_back('\n');
  std::lock_guard<std::mutex> lock(WriteMutex());
  const int fd = g_fd.load(std::memory_order_relaxed);
  const char* p = line.data();
  size_t left = line.size();
  while (left > 0) {
    const ssize_t n = ::write(fd, p, left);
    if (n < 0) {
      if (errno == EINTR) continue;
      return;  // nowhere to report a failing stderr
    }
    p += n;
    left -= static_cast<size_t>(n);
  }
}

}  // namespace natgrad::log
