#include "server/engine/lapack_kernels.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "absl/strings/str_cat.h"
#include "server/linalg/cblas_lapacke.h"

namespace natgrad::engine {
namespace {

template <typename Scalar>
using VectorX = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;

// True when every entry is finite. Eigen's allFinite() is a scalar loop with
// a branch per entry (its all() does not vectorise), ~1 ns an entry; here
// x·0 is 0 for finite x and NaN for NaN/±Inf, and the vectorised sum of those
// is NaN iff some entry is not finite (no -ffast-math in this build).
template <typename Derived>
bool AllFinite(const Eigen::DenseBase<Derived>& x) {
  using S = typename Derived::Scalar;
  if (x.size() == 0) return true;
  return !std::isnan((x.derived().array() * S(0)).sum());
}

// One attempt of `kind` on a prepared copy. Returns true on success and fills
// `out`; `jitter` has already been added to the diagonal of `a`.
template <typename Scalar>
bool Attempt(MatrixX<Scalar>& a, DecompositionKind kind, Scalar jitter,
             Decomposition<Scalar>& out) {
  out.kind = kind;
  if (kind == DecompositionKind::kEigh) {
    VectorX<Scalar> w;
    if (SyevdInPlace(a, w) != 0) return false;
    if (!AllFinite(w) || !AllFinite(a)) return false;
    // Adding jitter·I shifts eigenvalues and leaves eigenvectors alone, so
    // undo the shift exactly; then clamp (PSD by contract, rounding aside).
    w.array() = (w.array() - jitter).max(Scalar(0));
    out.eigenvalues = std::move(w);
    out.matrix = std::move(a);
    return true;
  }
  // PotrfPotriInPlace checks the inverse for non-finite entries itself
  // (before mirroring), so no second pass over the matrix here.
  if (PotrfPotriInPlace(a) != 0) return false;
  out.eigenvalues.resize(0);
  out.matrix = std::move(a);
  return true;
}

template <typename Scalar>
void AddJitter(MatrixX<Scalar>& a, Scalar jitter) {
  if (jitter != Scalar(0)) a.diagonal().array() += jitter;
}

// Relative jitter for the first retry: large enough to lift a singular PSD
// matrix clear of rounding noise (≈ n·eps·‖A‖), small against its spectrum.
template <typename Scalar>
double FirstJitter(Eigen::Index n) {
  const double eps = std::numeric_limits<Scalar>::epsilon();
  return std::max(1e-12, 10.0 * static_cast<double>(std::max<Eigen::Index>(n, 1)) * eps);
}

enum class TileOp { kAverage, kLowerToUpper, kUpperToLower };

constexpr Eigen::Index kTile = 16;

// One pair of off-diagonal tiles: `lower` (below the diagonal) and `upper`
// (its mirror above). Fixed-size 16x16 tiles for the interior (unrolled,
// vectorised), dynamic ones at the right/bottom edge. For kAverage returns
// Σ t·0 over the averaged tile (NaN iff some entry is not finite), else 0.
template <typename Scalar, typename Lower, typename Upper, typename Tmp>
Scalar TilePair(Lower lower, Upper upper, Tmp& t, TileOp op) {
  switch (op) {
    case TileOp::kAverage:
      // a/2 + b/2 rounds exactly like (a + b)/2 but cannot overflow, so the
      // average is finite iff both inputs are.
      t = lower * Scalar(0.5) + upper.transpose() * Scalar(0.5);
      lower = t;
      upper = t.transpose();
      return (t.array() * Scalar(0)).sum();
    case TileOp::kLowerToUpper: upper = lower.transpose(); break;
    case TileOp::kUpperToLower: lower = upper.transpose(); break;
  }
  return Scalar(0);
}

// Visits the matrix as pairs of 16x16 tiles (i-block, j-block) and
// (j-block, i-block) below/above the diagonal. Whole tiles keep every cache
// line fully used; an element-wise a(j, i) walk strides by n, which for
// power-of-two n maps every access to one L1 set (measured 8 ms at n=1024,
// against 1 ms for a copy). For kAverage returns false when an entry (before
// averaging) is NaN or ±Inf; the check rides along in the same pass.
template <typename Scalar>
bool ApplyTileOp(MatrixX<Scalar>& a, TileOp op) {
  const Eigen::Index n = a.rows();
  Eigen::Matrix<Scalar, kTile, kTile> full;
  Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, 0, kTile, kTile> edge;
  Scalar acc(0);
  for (Eigen::Index jb = 0; jb < n; jb += kTile) {
    const Eigen::Index bj = std::min(kTile, n - jb);
    // Diagonal tile: element by element, it is small.
    for (Eigen::Index j = jb; j < jb + bj; ++j) {
      if (op == TileOp::kAverage) acc += a(j, j) * Scalar(0);
      for (Eigen::Index i = j + 1; i < jb + bj; ++i) {
        switch (op) {
          case TileOp::kAverage: {
            const Scalar v = a(i, j) * Scalar(0.5) + a(j, i) * Scalar(0.5);
            a(i, j) = a(j, i) = v;
            acc += v * Scalar(0);
            break;
          }
          case TileOp::kLowerToUpper: a(j, i) = a(i, j); break;
          case TileOp::kUpperToLower: a(i, j) = a(j, i); break;
        }
      }
    }
    for (Eigen::Index ib = jb + bj; ib < n; ib += kTile) {
      const Eigen::Index bi = std::min(kTile, n - ib);
      if (bi == kTile && bj == kTile) {
        acc += TilePair<Scalar>(a.template block<kTile, kTile>(ib, jb),
                                a.template block<kTile, kTile>(jb, ib), full, op);
      } else {
        edge.resize(bi, bj);
        acc += TilePair<Scalar>(a.block(ib, jb, bi, bj), a.block(jb, ib, bj, bi), edge, op);
      }
    }
  }
  return !std::isnan(acc);
}

}  // namespace

template <typename Scalar>
absl::Status PrepareSymmetric(MatrixX<Scalar>& a) {
  if (a.rows() != a.cols()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "matrix must be square, got ", a.rows(), "x", a.cols()));
  }
  // One pass: symmetrise and check finiteness together (the matrix is the
  // job's own; on refusal its contents no longer matter).
  if (!ApplyTileOp(a, TileOp::kAverage)) {
    return absl::InvalidArgumentError(
        "matrix has non-finite entries (NaN or Inf); refused before the solver");
  }
  return absl::OkStatus();
}

namespace {
// ?syevd through LAPACKE's _work layer: no second NaN scan of the input
// (PrepareSymmetric has done it) and the workspace (1 + 6n + 2n² scalars,
// 3 + 5n ints) reused per thread instead of malloc'd and page-faulted per
// call; workspaces above kMaxCachedWorkBytes are freed after the call.
constexpr size_t kMaxCachedWorkBytes = size_t{32} << 20;

template <typename Scalar, typename Fn>
int SyevdWithWorkspace(MatrixX<Scalar>& a, VectorX<Scalar>& w, Fn syevd_work) {
  const lapack_int n = static_cast<lapack_int>(a.rows());
  w.resize(n);
  if (n == 0) return 0;
  Scalar work_query = 0;
  lapack_int iwork_query = 0;
  int info = syevd_work(LAPACK_COL_MAJOR, 'V', 'L', n, a.data(), n, w.data(), &work_query,
                        lapack_int{-1}, &iwork_query, lapack_int{-1});
  if (info != 0) return info;
  const size_t lwork = static_cast<size_t>(work_query);
  const size_t liwork = static_cast<size_t>(iwork_query);
  thread_local std::vector<Scalar> work;
  thread_local std::vector<lapack_int> iwork;
  if (work.size() < lwork) work.resize(lwork);
  if (iwork.size() < liwork) iwork.resize(liwork);
  info = syevd_work(LAPACK_COL_MAJOR, 'V', 'L', n, a.data(), n, w.data(), work.data(),
                    static_cast<lapack_int>(lwork), iwork.data(),
                    static_cast<lapack_int>(liwork));
  if (work.size() * sizeof(Scalar) > kMaxCachedWorkBytes) std::vector<Scalar>().swap(work);
  return info;
}
}  // namespace

template <>
int SyevdInPlace<float>(MatrixX<float>& a, VectorX<float>& w) {
  return SyevdWithWorkspace<float>(a, w, LAPACKE_ssyevd_work);
}

template <>
int SyevdInPlace<double>(MatrixX<double>& a, VectorX<double>& w) {
  return SyevdWithWorkspace<double>(a, w, LAPACKE_dsyevd_work);
}

namespace {
// ?potri leaves the inverse in the lower triangle only.
template <typename Scalar>
void FillUpperFromLower(MatrixX<Scalar>& a) {
  ApplyTileOp(a, TileOp::kLowerToUpper);
}

template <typename Scalar>
bool LowerFinite(const MatrixX<Scalar>& a) {
  const Eigen::Index n = a.rows();
  Scalar acc(0);
  for (Eigen::Index j = 0; j < n; ++j) acc += (a.col(j).tail(n - j).array() * Scalar(0)).sum();
  return !std::isnan(acc);
}

// The reverse: ?potrf/?potri ('L') never touch the strict upper triangle, so
// after a failure the input is the upper triangle mirrored plus the diagonal.
template <typename Scalar>
void RestoreLowerFromUpper(MatrixX<Scalar>& a,
                           const Eigen::Matrix<Scalar, Eigen::Dynamic, 1>& diag) {
  ApplyTileOp(a, TileOp::kUpperToLower);
  a.diagonal() = diag;
}
}  // namespace

template <>
int PotrfPotriInPlace<float>(MatrixX<float>& a) {
  const lapack_int n = static_cast<lapack_int>(a.rows());
  if (n == 0) return 0;
  int info = LAPACKE_spotrf_work(LAPACK_COL_MAJOR, 'L', n, a.data(), n);
  if (info != 0) return info;
  info = LAPACKE_spotri_work(LAPACK_COL_MAJOR, 'L', n, a.data(), n);
  if (info != 0) return info;
  if (!LowerFinite(a)) return n + 1;  // before mirroring: keep the upper input
  FillUpperFromLower(a);
  return 0;
}

template <>
int PotrfPotriInPlace<double>(MatrixX<double>& a) {
  const lapack_int n = static_cast<lapack_int>(a.rows());
  if (n == 0) return 0;
  int info = LAPACKE_dpotrf_work(LAPACK_COL_MAJOR, 'L', n, a.data(), n);
  if (info != 0) return info;
  info = LAPACKE_dpotri_work(LAPACK_COL_MAJOR, 'L', n, a.data(), n);
  if (info != 0) return info;
  if (!LowerFinite(a)) return n + 1;  // before mirroring: keep the upper input
  FillUpperFromLower(a);
  return 0;
}

template <typename Scalar>
Scalar JitterFor(const MatrixX<Scalar>& a, double relative) {
  const Eigen::Index n = a.rows();
  double scale = n > 0 ? static_cast<double>(a.trace()) / n : 1.0;
  if (!(scale > 0) || !std::isfinite(scale)) scale = 1.0;
  return static_cast<Scalar>(relative * scale);
}

template <typename Scalar>
absl::StatusOr<Decomposition<Scalar>> DecomposeLapack(MatrixX<Scalar> a,
                                                      DecompositionKind kind,
                                                      bool already_prepared) {
  if (!already_prepared) {
    if (absl::Status s = PrepareSymmetric(a); !s.ok()) return s;
  }
  const Eigen::Index n = a.rows();
  const double rel = FirstJitter<Scalar>(n);
  Decomposition<Scalar> out;

  // Attempt 0: as given, keeping what the retries need. ?syevd overwrites all
  // of `a`, so eigh works on a copy (O(n²) against its O(n³)); the Cholesky
  // path works in place and can rebuild its input from the untouched upper
  // triangle and the saved diagonal, which matters for its cheaper O(n³).
  if (kind == DecompositionKind::kEigh) {
    MatrixX<Scalar> work = a;
    if (Attempt<Scalar>(work, kind, Scalar(0), out)) return out;
  } else {
    const Eigen::Matrix<Scalar, Eigen::Dynamic, 1> diag = a.diagonal();
    if (Attempt<Scalar>(a, kind, Scalar(0), out)) return out;
    // Attempt moves `a` into `out` only on success, so `a` is still here.
    RestoreLowerFromUpper(a, diag);
  }
  // Attempt 1: native precision, jitter scaled to the trace.
  {
    MatrixX<Scalar> work = a;
    const Scalar jitter = JitterFor(a, rel);
    AddJitter(work, jitter);
    if (Attempt<Scalar>(work, kind, jitter, out)) {
      out.retries = 1;
      return out;
    }
  }
  // Attempt 2: float jobs go to float64 with the same relative jitter; double
  // jobs get a 1000x larger jitter.
  if constexpr (std::is_same_v<Scalar, float>) {
    MatrixX<double> work = a.template cast<double>();
    const double jitter = JitterFor(work, rel);
    AddJitter(work, jitter);
    Decomposition<double> out64;
    if (Attempt<double>(work, kind, jitter, out64)) {
      out.kind = kind;
      out.eigenvalues = out64.eigenvalues.template cast<float>();
      out.matrix = out64.matrix.template cast<float>();
      if (out.matrix.allFinite()) {  // the float64 inverse may overflow float
        out.retries = 2;
        return out;
      }
    }
  } else {
    MatrixX<Scalar> work = a;
    const Scalar jitter = JitterFor(a, rel * 1000.0);
    AddJitter(work, jitter);
    if (Attempt<Scalar>(work, kind, jitter, out)) {
      out.retries = 2;
      return out;
    }
  }
  return absl::InternalError(absl::StrCat(
      kind == DecompositionKind::kEigh ? "?syevd" : "?potrf/?potri",
      " failed on a ", n, "x", n,
      " matrix after retries with jitter and float64"));
}

template absl::Status PrepareSymmetric<float>(MatrixX<float>&);
template absl::Status PrepareSymmetric<double>(MatrixX<double>&);
template float JitterFor<float>(const MatrixX<float>&, double);
template double JitterFor<double>(const MatrixX<double>&, double);
template absl::StatusOr<Decomposition<float>> DecomposeLapack<float>(
    MatrixX<float>, DecompositionKind, bool);
template absl::StatusOr<Decomposition<double>> DecomposeLapack<double>(
    MatrixX<double>, DecompositionKind, bool);

}  // namespace natgrad::engine
