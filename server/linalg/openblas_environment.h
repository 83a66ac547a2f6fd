// OpenBLAS settings that must be in the environment before the library
// loads (it reads them in its load-time constructor, before main).
//
// Why: after every multi-threaded call, OpenBLAS 0.3.21's pthread workers
// spin on sched_yield for 2^OPENBLAS_THREAD_TIMEOUT cycles, 2^28 by default
// (about 0.1 s here), before they sleep. The server runs OpenBLAS threaded
// only for a lone large decomposition (thread_policy.h), and on a machine
// whose cores it shares with the training job (a sidecar, a laptop) that
// spinning takes a core from the job, or from the server's own compute pool,
// for 0.1 s after each one. 2^4 cycles makes the workers sleep at once; the
// cost is a condition-variable wake-up (microseconds) on the next threaded
// call, which only decompositions of n >= threaded_blas_min_n make.
#ifndef NATGRAD_SERVER_LINALG_OPENBLAS_ENVIRONMENT_H_
#define NATGRAD_SERVER_LINALG_OPENBLAS_ENVIRONMENT_H_

namespace natgrad::linalg {

// The value natgrad-server runs OpenBLAS with when the environment has none.
inline constexpr char kOpenBlasThreadTimeout[] = "4";

// Call first in main(), before any thread exists. If OPENBLAS_THREAD_TIMEOUT
// is unset, sets it to kOpenBlasThreadTimeout and executes this program
// again (the same binary, argv and pid), so that OpenBLAS loads with it;
// it does not return then. An operator's own OPENBLAS_THREAD_TIMEOUT is
// kept. Returns false (and the program goes on with OpenBLAS's default) if
// the exec failed, with errno set.
bool ReexecWithQuietOpenBlasThreads(char** argv);

}  // namespace natgrad::linalg

#endif  // NATGRAD_SERVER_LINALG_OPENBLAS_ENVIRONMENT_H_
