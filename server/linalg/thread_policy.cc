#include "server/linalg/thread_policy.h"

#include <algorithm>
#include <mutex>

#include "server/linalg/cblas_lapacke.h"

namespace natgrad::linalg {

void SetBlasThreads(int threads) {
  threads = std::max(1, threads);
  static std::mutex mu;
  std::lock_guard<std::mutex> lock(mu);
  if (openblas_get_num_threads() == threads) return;
  openblas_set_num_threads(threads);
}

int BlasThreads() { return openblas_get_num_threads(); }

int BlasMaxThreads() { return std::max(1, openblas_get_num_procs()); }

}  // namespace natgrad::linalg
