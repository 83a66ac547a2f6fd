#include "server/linalg/openblas_environment.h"

#include <limits.h>
#include <stdlib.h>
#include <unistd.h>

namespace natgrad::linalg {

bool ReexecWithQuietOpenBlasThreads(char** argv) {
  if (getenv("OPENBLAS_THREAD_TIMEOUT") != nullptr) return true;
  // Set before the exec, so the new image sees it and does not exec again.
  if (setenv("OPENBLAS_THREAD_TIMEOUT", kOpenBlasThreadTimeout, 1) != 0) return false;
  // The binary's own path, not /proc/self/exe: the process's name (ps,
  // pgrep, /proc/<pid>/comm) is the basename of what was executed.
  char path[PATH_MAX];
  const ssize_t n = readlink("/proc/self/exe", path, sizeof(path) - 1);
  if (n <= 0) return false;
  path[n] = '\0';
  execv(path, argv);
  return false;  // exec failed: run on with the default spinning
}

}  // namespace natgrad::linalg
