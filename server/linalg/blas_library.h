// Which BLAS the process runs and which of its kernel sets: logged by
// natgrad-server at start-up and exported as the natgrad_blas_info metric.
//
// Why an operator needs it: Debian's OpenBLAS is a DYNAMIC_ARCH build that
// picks its kernels for the CPU when it loads, unless OPENBLAS_CORETYPE
// names a set. That choice moves a K-FAC step's time by about a quarter on
// an AVX-512 machine (the AE step of bench/e2e/step_roundtrip_bench: 76-79 ms
// with the detected Cooperlake kernels, 98-114 ms with OPENBLAS_CORETYPE=
// Haswell, which some hosts set because older OpenBLAS builds miscompute on
// their CPUs). The variable is read before main, so the server can only
// report it, and it does, next to the kernels actually in use.
#ifndef NATGRAD_SERVER_LINALG_BLAS_LIBRARY_H_
#define NATGRAD_SERVER_LINALG_BLAS_LIBRARY_H_

#include <string>

namespace natgrad::linalg {

struct BlasLibraryInfo {
  // The library's own build line (openblas_get_config()), e.g.
  // "OpenBLAS 0.3.21 DYNAMIC_ARCH NO_AFFINITY Haswell MAX_THREADS=64".
  std::string config;
  // The kernel set in use (openblas_get_corename()), e.g. "Haswell".
  std::string core;
  // $OPENBLAS_CORETYPE as the process found it ("" when unset): when set,
  // OpenBLAS ran `core` because the environment asked, not because it
  // detected this CPU.
  std::string coretype_env;
};

// Read once, on first use.
const BlasLibraryInfo& GetBlasLibraryInfo();

// One line for the start-up log, e.g. "OpenBLAS 0.3.21 ..., kernels
// Cooperlake (detected for this CPU)".
std::string DescribeBlasLibrary(const BlasLibraryInfo& info);

}  // namespace natgrad::linalg

#endif  // NATGRAD_SERVER_LINALG_BLAS_LIBRARY_H_
