#include "server/linalg/blas_library.h"

#include <cstdlib>

#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "server/linalg/cblas_lapacke.h"

namespace natgrad::linalg {

const BlasLibraryInfo& GetBlasLibraryInfo() {
  static const BlasLibraryInfo* info = [] {
    auto* i = new BlasLibraryInfo;
    // Both return pointers to static strings of the library (never freed).
    if (const char* c = openblas_get_config(); c != nullptr) {
      i->config = std::string(absl::StripAsciiWhitespace(c));
    }
    if (const char* c = openblas_get_corename(); c != nullptr) i->core = c;
    if (const char* e = std::getenv("OPENBLAS_CORETYPE"); e != nullptr) i->coretype_env = e;
    return i;
  }();
  return *info;
}

std::string DescribeBlasLibrary(const BlasLibraryInfo& info) {
  return absl::StrCat(info.config.empty() ? "unknown BLAS" : info.config, ", kernels ",
                      info.core.empty() ? "unknown" : info.core,
                      info.coretype_env.empty()
                          ? " (detected for this CPU)"
                          : absl::StrCat(" (OPENBLAS_CORETYPE=", info.coretype_env,
                                         " in the environment; unset it to let OpenBLAS "
                                         "pick this CPU's own)"));
}

}  // namespace natgrad::linalg
