#include "server/blocks/gaussian/math/gaussian_linalg.h"

#include <limits>

#include "Eigen/Cholesky"
#include "server/linalg/blas.h"

namespace natgrad::core::gaussian_linalg {
namespace {

// Below this size OpenBLAS's threaded factorisations spend more time syncing
// threads than computing (when the process runs it multi-threaded); Eigen
// does them in place instead.
constexpr int kSmall = 128;

template <typename T>
using MapM = Eigen::Map<GMatrix<T>>;

// Lower-triangle-only small kernels (uplo 'L', plus 'U' for Lauum).
template <typename T>
int SmallPotrf(int n, T* a) {
  MapM<T> m(a, n, n);
  Eigen::LLT<GMatrix<T>, Eigen::Lower> llt(m);
  if (llt.info() != Eigen::Success) return 1;
  m.template triangularView<Eigen::Lower>() = llt.matrixL();
  return 0;
}
template <typename T>
int SmallTrtri(int n, T* a) {
  MapM<T> m(a, n, n);
  GMatrix<T> inv = GMatrix<T>::Identity(n, n);
  m.template triangularView<Eigen::Lower>().solveInPlace(inv);
  m.template triangularView<Eigen::Lower>() = inv;
  return 0;
}
template <typename T>
int SmallLauum(char uplo, int n, T* a) {
  MapM<T> m(a, n, n);
  if (uplo == 'L') {  // LᵀL
    const GMatrix<T> l = m.template triangularView<Eigen::Lower>();
    GMatrix<T> r = GMatrix<T>::Zero(n, n);
    r.template selfadjointView<Eigen::Lower>().rankUpdate(l.transpose());
    m.template triangularView<Eigen::Lower>() = r;
  } else {  // U Uᵀ
    const GMatrix<T> u = m.template triangularView<Eigen::Upper>();
    GMatrix<T> r = GMatrix<T>::Zero(n, n);
    r.template selfadjointView<Eigen::Upper>().rankUpdate(u);
    m.template triangularView<Eigen::Upper>() = r;
  }
  return 0;
}

template <typename T>
int Potrf(char uplo, int n, T* a) {
  if (n < kSmall && uplo == 'L') return SmallPotrf(n, a);
  return linalg::blas::Potrf(uplo, n, a, n);
}
template <typename T>
int Trtri(char uplo, int n, T* a) {
  if (n < kSmall && uplo == 'L') return SmallTrtri(n, a);
  return linalg::blas::Trtri(uplo, n, a, n);
}
template <typename T>
int Lauum(char uplo, int n, T* a) {
  if (n < kSmall) return SmallLauum(uplo, n, a);
  return linalg::blas::Lauum(uplo, n, a, n);
}
template <typename T>
int Potri(char uplo, int n, T* a) {
  if (n < kSmall && uplo == 'L') {
    SmallTrtri(n, a);
    return SmallLauum('L', n, a);
  }
  return linalg::blas::Potri(uplo, n, a, n);
}

// Copies the lower triangle onto the upper one.
template <typename T>
void MirrorLower(GMatrix<T>* a) {
  GMatrix<T>& m = *a;
  ForUpperTiles(m.rows(), [&](Eigen::Index i, Eigen::Index j) { m(i, j) = m(j, i); });
}

template <typename T>
void ZeroUpper(GMatrix<T>* a) {
  const Eigen::Index n = a->rows();
  for (Eigen::Index j = 1; j < n; ++j)
    for (Eigen::Index i = 0; i < j; ++i) (*a)(i, j) = T(0);
}

template <typename T>
bool FactorOk(const GMatrix<T>& chol) {
  return chol.allFinite() && (chol.diagonal().array() > T(0)).all();
}

}  // namespace

template <typename T>
bool LowerCholesky(const GMatrix<T>& a, GMatrix<T>* chol) {
  const int n = static_cast<int>(a.rows());
  *chol = a;
  if (n == 0) return true;
  if (Potrf('L', n, chol->data()) != 0) return false;
  ZeroUpper(chol);
  return FactorOk(*chol);
}

template <typename T>
GMatrix<T> InverseFromCholesky(const GMatrix<T>& chol) {
  const int n = static_cast<int>(chol.rows());
  GMatrix<T> inv = chol;
  if (n == 0) return inv;
  if (Potri('L', n, inv.data()) != 0) {
    inv.setConstant(std::numeric_limits<T>::quiet_NaN());
    return inv;
  }
  MirrorLower(&inv);
  return inv;
}

template <typename T>
GMatrix<T> OuterFromCholesky(const GMatrix<T>& chol) {
  const int n = static_cast<int>(chol.rows());
  if (n == 0) return chol;
  // R = J L J is upper triangular and R Rᵀ = J L Lᵀ J.
  GMatrix<T> r = chol.template triangularView<Eigen::Lower>();
  r = r.reverse().eval();
  Lauum('U', n, r.data());
  GMatrix<T> s = r.reverse();  // J (R Rᵀ) J: lower triangle valid
  MirrorLower(&s);
  return s;
}

template <typename T>
InverseStatus InverseAndItsCholesky(const GMatrix<T>& p, GMatrix<T>* cov,
                                    GMatrix<T>* cov_chol) {
  const int n = static_cast<int>(p.rows());
  if (n == 0) {
    *cov = p;
    *cov_chol = p;
    return InverseStatus::kOk;
  }
  GMatrix<T> w = p.reverse();  // J P J
  if (Potrf('L', n, w.data()) != 0) return InverseStatus::kNotPd;  // L'
  ZeroUpper(&w);
  if (!FactorOk(w)) return InverseStatus::kNotPd;
  if (Trtri('L', n, w.data()) != 0) return InverseStatus::kIllConditioned;
  // J Wᵀ J with W = L'⁻¹: lower; entry (i, j) is W(n-1-j, n-1-i).
  cov_chol->setZero(n, n);
  {
    GMatrix<T>& c = *cov_chol;
    const Eigen::Index k = n - 1;
    for (Eigen::Index d = 0; d < n; ++d) c(d, d) = w(k - d, k - d);
    ForUpperTiles(n, [&](Eigen::Index i, Eigen::Index j) {
      c(j, i) = w(k - i, k - j);
    });
  }
  if (!FactorOk(*cov_chol)) return InverseStatus::kIllConditioned;
  Lauum('L', n, w.data());  // W^T W = (J P J)^-1 = J S J, lower triangle
  *cov = w.reverse();       // upper triangle of S valid
  GMatrix<T>& s = *cov;
  ForUpperTiles(s.rows(), [&](Eigen::Index i, Eigen::Index j) { s(j, i) = s(i, j); });
  return cov->allFinite() ? InverseStatus::kOk : InverseStatus::kIllConditioned;
}

template <typename T>
GMatrix<T> SymmetricTimes(const GMatrix<T>& a, const GMatrix<T>& b) {
  GMatrix<T> c(a.rows(), b.cols());
  if (c.size() == 0) return c;
  // Small products: a BLAS call (and its thread hand-off) costs more than it
  // saves, as with the factorisations above.
  if (a.rows() < kSmall) {
    c.noalias() = a.template selfadjointView<Eigen::Lower>() * b;
    return c;
  }
  linalg::blas::SymmLower(true, b.rows(), b.cols(), T(1), a.data(), a.rows(),
                          b.data(), b.rows(), T(0), c.data(), c.rows());
  return c;
}

template <typename T>
GMatrix<T> TimesSymmetric(const GMatrix<T>& b, const GMatrix<T>& a) {
  GMatrix<T> c(b.rows(), a.cols());
  if (c.size() == 0) return c;
  if (a.rows() < kSmall) {
    c.noalias() = b * a.template selfadjointView<Eigen::Lower>();
    return c;
  }
  linalg::blas::SymmLower(false, b.rows(), b.cols(), T(1), a.data(), a.rows(),
                          b.data(), b.rows(), T(0), c.data(), c.rows());
  return c;
}

template <typename T>
void LowerTriangularMultiply(const GMatrix<T>& l, bool left, bool trans,
                             GMatrix<T>* b) {
  if (b->size() == 0) return;
  if (l.rows() < kSmall) {
    const auto tri = l.template triangularView<Eigen::Lower>();
    if (left) {
      *b = trans ? (tri.transpose() * *b).eval() : (tri * *b).eval();
    } else {
      *b = trans ? (*b * tri.transpose()).eval() : (*b * tri).eval();
    }
    return;
  }
  linalg::blas::TrmmLower(left, trans, b->rows(), b->cols(), T(1), l.data(),
                          l.rows(), b->data(), b->rows());
}

template <typename T>
void LowerTriangularSolve(const GMatrix<T>& l, bool left, bool trans,
                          GMatrix<T>* b) {
  if (b->size() == 0) return;
  if (l.rows() < kSmall) {
    const auto tri = l.template triangularView<Eigen::Lower>();
    if (left) {
      if (trans) {
        tri.transpose().solveInPlace(*b);
      } else {
        tri.solveInPlace(*b);
      }
    } else if (trans) {
      tri.transpose().template solveInPlace<Eigen::OnTheRight>(*b);
    } else {
      tri.template solveInPlace<Eigen::OnTheRight>(*b);
    }
    return;
  }
  linalg::blas::TrsmLower(left, trans, b->rows(), b->cols(), T(1), l.data(),
                          l.rows(), b->data(), b->rows());
}

#define NATGRAD_INSTANTIATE(T)                                                \
  template bool LowerCholesky<T>(const GMatrix<T>&, GMatrix<T>*);             \
  template GMatrix<T> InverseFromCholesky<T>(const GMatrix<T>&);              \
  template GMatrix<T> OuterFromCholesky<T>(const GMatrix<T>&);                \
  template InverseStatus InverseAndItsCholesky<T>(                             \
      const GMatrix<T>&, GMatrix<T>*, GMatrix<T>*);                           \
  template GMatrix<T> SymmetricTimes<T>(const GMatrix<T>&, const GMatrix<T>&); \
  template GMatrix<T> TimesSymmetric<T>(const GMatrix<T>&, const GMatrix<T>&); \
  template void LowerTriangularMultiply<T>(const GMatrix<T>&, bool, bool,     \
                                           GMatrix<T>*);                      \
  template void LowerTriangularSolve<T>(const GMatrix<T>&, bool, bool,        \
                                        GMatrix<T>*);
NATGRAD_INSTANTIATE(float)
NATGRAD_INSTANTIATE(double)
#undef NATGRAD_INSTANTIATE

}  // namespace natgrad::core::gaussian_linalg
