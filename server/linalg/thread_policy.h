// Who runs dense linear algebra on which threads: the one statement of the
// policy, and the only functions that touch OpenBLAS's thread count.
//
// Two kinds of parallelism exist in the process, and they must not be
// stacked (a pool's panel calls into a multi-threaded OpenBLAS queue for its
// threads: measured 2x slower for a d=1024 K-FAC factor update, 1.7x for 8
// Gaussian copies at M=1024, than either kind alone).
//
// 1. OpenBLAS's own threads. Debian's OpenBLAS 0.3.21 (pthread build) has
//    only a process-global thread count (no openblas_set_num_threads_local).
//    The rule: OpenBLAS runs single-threaded, except inside the inversion
//    engine's decompositions of a lone large matrix.
//    - natgrad-server pins it to 1 at start-up (NatgradServer::Init);
//    - the engine's CPU backend (server/engine/cpu_backend.cc) raises it to
//      its thread count for a lone large matrix (fewer jobs than workers,
//      n >= threaded_blas_min_n), and sets it back to 1 as soon as that call
//      returns; for a batch it runs matrices side by side on its own workers
//      at 1.
//    Only those two places call SetBlasThreads (tests and benches aside),
//    and no code decides anything from the current count.
//
// 2. A ComputePool (compute_pool.h), created once by the server (sized by
//    --compute_threads) or by a test or bench, and passed to the block math
//    through core::StepContext::compute_pool. The products (products.h)
//    split a product of at least kBlasSplitWork multiply-adds into column
//    panels run on the pool, one BLAS call per panel; the Gaussian block runs
//    its copies on the pool. A null pool means "the caller's thread only":
//    then a product is one BLAS call, threaded only if OpenBLAS is (outside
//    the server: its default, one thread per core). No product ever creates
//    a thread.
//
// The two can still meet while the engine runs a lone large decomposition
// and a step's panels run at the same time; then the panels' BLAS calls
// queue for OpenBLAS's threads for that long. Results are the same either
// way (each panel computes the same entries); only the speed differs.
#ifndef NATGRAD_SERVER_LINALG_THREAD_POLICY_H_
#define NATGRAD_SERVER_LINALG_THREAD_POLICY_H_

namespace natgrad::linalg {

// Sets OpenBLAS's process-wide thread count (clamped to >= 1). Serialised,
// and a no-op when the value is already current (openblas_set_num_threads
// may touch OpenBLAS's thread pool). In the server only start-up and the
// engine's CPU backend call it (see above).
void SetBlasThreads(int threads);
// The current process-wide count; for tests and diagnostics, never for
// deciding how to run a product.
int BlasThreads();
// What OpenBLAS would use by default (its count of cores), at least 1.
int BlasMaxThreads();

}  // namespace natgrad::linalg

#endif  // NATGRAD_SERVER_LINALG_THREAD_POLICY_H_
