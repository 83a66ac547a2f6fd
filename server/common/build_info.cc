#include "server/common/build_info.h"

// Defined by server/common/CMakeLists.txt for this file only, so a new
// commit or configuration recompiles one file.
#ifndef NATGRAD_BUILD_VERSION
#error "NATGRAD_BUILD_VERSION must be defined by the build"
#endif

namespace natgrad {

const BuildInfo& GetBuildInfo() {
  static const BuildInfo* info = new BuildInfo{
      NATGRAD_BUILD_VERSION, NATGRAD_BUILD_GIT_COMMIT, NATGRAD_BUILD_TYPE,
      NATGRAD_BUILD_CUDA != 0};
  return *info;
}

}  // namespace natgrad
