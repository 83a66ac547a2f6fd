// Direct LAPACKE kernels for one symmetric PSD matrix (server/engine/README.md).
// Eigen's LAPACKE hook routes SelfAdjointEigenSolver to ?syev; we call ?syevd
// (divide and conquer, several times faster with eigenvectors) and
// ?potrf + ?potri ourselves. These are the CPU backend's per-matrix unit and
// the CUDA backend's fallback for jobs the GPU could not finish.
#ifndef NATGRAD_SERVER_ENGINE_LAPACK_KERNELS_H_
#define NATGRAD_SERVER_ENGINE_LAPACK_KERNELS_H_

#include "Eigen/Core"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "server/engine/inversion_engine.h"

namespace natgrad::engine {

template <typename Scalar>
using MatrixX = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;

// Square check, finiteness check (INVALID_ARGUMENT, before any solver sees a
// NaN) and in-place symmetrisation (A + Aᵀ)/2. Shared by every backend.
template <typename Scalar>
absl::Status PrepareSymmetric(MatrixX<Scalar>& a);

// Raw kernels on an already prepared matrix, overwritten in place. Return the
// LAPACK info (0 = success, < 0 = bad argument, > 0 = numerical failure).
// SyevdInPlace leaves eigenvectors in `a` and ascending eigenvalues in `w`.
// PotrfPotriInPlace leaves the full symmetric inverse in `a`; it returns n+1
// when the inverse overflowed (non-finite), and on any failure the strict
// upper triangle of `a` still holds the input.
template <typename Scalar>
int SyevdInPlace(MatrixX<Scalar>& a,
                 Eigen::Matrix<Scalar, Eigen::Dynamic, 1>& w);
template <typename Scalar>
int PotrfPotriInPlace(MatrixX<Scalar>& a);

// The jitter added to the diagonal on retry: `relative` times the mean
// diagonal entry (the trace scale), or `relative` when the trace is not
// positive.
template <typename Scalar>
Scalar JitterFor(const MatrixX<Scalar>& a, double relative);

// Decomposes one matrix with the full policy: prepare (symmetrise, refuse
// non-finite), run; on failure (info != 0 or a non-finite result) retry with
// diagonal jitter scaled to the trace, then (float jobs) in float64 with
// jitter, then (double jobs) with a larger jitter. Eigenvalues come back
// ascending and clamped at 0, jitter subtracted again. `retries` counts the
// failed attempts that were recovered from. `already_prepared` skips
// PrepareSymmetric (the CUDA fallback path has done it).
template <typename Scalar>
absl::StatusOr<Decomposition<Scalar>> DecomposeLapack(
    MatrixX<Scalar> a, DecompositionKind kind, bool already_prepared = false);

}  // namespace natgrad::engine

#endif  // NATGRAD_SERVER_ENGINE_LAPACK_KERNELS_H_
