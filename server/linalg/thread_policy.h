// Who runs dense linear algebra on which threads: the one statement of the
// policy, and the only functions that touch OpenBLAS's thread count.
//
// Two kinds of parallelism exist in the process:
//
// 1. OpenBLAS's own threads. Debian's OpenBLAS 0.3.21 (pthread build) has
//    only a process-global thread count (no openblas_set_num_threads_local),
//    so it is owned by exactly one party: the inversion engine's CPU backend
//    (server/engine/cpu_backend.cc). It pins the count to 1 while it runs a
//    batch of matrices side by side on its own workers (one LAPACK call per
//    worker; a threaded OpenBLAS would make the calls fight over its single
//    thread pool), and raises it to the backend's thread count for a lone
//    large matrix (fewer jobs than workers, n >= threaded_blas_min_n). Nobody
//    else calls SetBlasThreads (tests and benches aside), and no code decides
//    anything from the current count: it changes from batch to batch.
//
// 2. A ComputePool (compute_pool.h), created once by the server (sized by
//    --compute_threads) or by a test or bench, and passed to the block math
//    through core::StepContext::compute_pool. The products (products.h)
//    split a product of at least kBlasSplitWork multiply-adds into column
//    panels run on the pool, one BLAS call per panel; the Gaussian block runs
//    its copies on the pool. A null pool means "the caller's thread only":
//    then a product is one BLAS call, which OpenBLAS threads or not as the
//    engine last set. No product ever creates a thread.
//
// The two meet when a step's panels run while the engine has OpenBLAS at
// several threads (a lone large decomposition in flight): each panel's BLAS
// call then queues on OpenBLAS's internal lock for its threads. Results are
// the same either way (each panel computes the same entries); only the speed
// differs. With the engine streaming batches (count 1) the panels are
// single-threaded BLAS calls side by side, which is the case the split is
// for.
#ifndef NATGRAD_SERVER_LINALG_THREAD_POLICY_H_
#define NATGRAD_SERVER_LINALG_THREAD_POLICY_H_

namespace natgrad::linalg {

// Sets OpenBLAS's process-wide thread count (clamped to >= 1). Serialised,
// and a no-op when the value is already current (openblas_set_num_threads
// may touch OpenBLAS's thread pool). The engine's CPU backend is its only
// caller in the server.
void SetBlasThreads(int threads);
// The current process-wide count; for tests and diagnostics, never for
// deciding how to run a product.
int BlasThreads();
// What OpenBLAS would use by default (its count of cores), at least 1.
int BlasMaxThreads();

}  // namespace natgrad::linalg

#endif  // NATGRAD_SERVER_LINALG_THREAD_POLICY_H_
