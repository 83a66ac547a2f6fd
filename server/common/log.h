// One-line server logging: "<UTC timestamp> <level> natgrad-server: <msg>"
// on stderr, below a process-wide level (--log_level). Thread-safe: a line is
// formatted first and written with one call under a lock, so lines from
// concurrent threads never interleave.
#ifndef NATGRAD_SERVER_COMMON_LOG_H_
#define NATGRAD_SERVER_COMMON_LOG_H_

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace natgrad::log {

enum class Level { kDebug = 0, kInfo = 1, kWarning = 2, kError = 3 };

// "debug", "info", "warning" (or "warn"), "error"; case-insensitive.
absl::StatusOr<Level> ParseLevel(absl::string_view name);
absl::string_view LevelName(Level level);

// Lines below `level` are dropped. Default: kInfo.
void SetLevel(Level level);
Level GetLevel();
inline bool Enabled(Level level) { return level >= GetLevel(); }

// Writes one line (a trailing newline is added; embedded newlines are
// replaced by spaces so a line stays one record for log collectors).
void Write(Level level, absl::string_view message);

// Tests: the destination file descriptor (default 2, stderr).
void SetFdForTesting(int fd);

}  // namespace natgrad::log

// NATGRAD_LOG(kInfo, "session ", name, " created"): the arguments are
// absl::StrCat'ed, and only evaluated when the level is enabled.
#define NATGRAD_LOG(level, ...)                                              \
  do {                                                                       \
    if (::natgrad::log::Enabled(::natgrad::log::Level::level)) {             \
      ::natgrad::log::Write(::natgrad::log::Level::level, ::absl::StrCat(__VA_ARGS__)); \
    }                                                                        \
  } while (0)

#endif  // NATGRAD_SERVER_COMMON_LOG_H_
