// What this binary was built from, fixed at configure time (CMake): exported
// as the natgrad_build_info metric and logged at start-up.
#ifndef NATGRAD_SERVER_COMMON_BUILD_INFO_H_
#define NATGRAD_SERVER_COMMON_BUILD_INFO_H_

#include <string>

namespace natgrad {

struct BuildInfo {
  std::string version;     // project version, e.g. "0.1.0"
  std::string git_commit;  // short commit hash at configure time, or "unknown"
  std::string build_type;  // CMake configuration, e.g. "RelWithDebInfo"
  bool cuda = false;       // the cuSOLVER inversion backend is compiled in
};

const BuildInfo& GetBuildInfo();

}  // namespace natgrad

#endif  // NATGRAD_SERVER_COMMON_BUILD_INFO_H_
