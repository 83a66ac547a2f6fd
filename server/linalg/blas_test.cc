// The typed BLAS / LAPACKE wrappers (blas.h) against Eigen in float64, and
// the thread-count setters of thread_policy.h.
#include "server/linalg/blas.h"

#include "Eigen/Cholesky"
#include "Eigen/Core"
#include "Eigen/LU"
#include "gtest/gtest.h"
#include "server/linalg/thread_policy.h"

namespace natgrad::linalg {
namespace {

using Eigen::MatrixXd;

double Rel(const MatrixXd& got, const MatrixXd& want) {
  return (got - want).norm() / want.norm();
}

MatrixXd Spd(int n) {
  const MatrixXd x = MatrixXd::Random(2 * n, n);
  return x.transpose() * x / (2.0 * n) + 0.1 * MatrixXd::Identity(n, n);
}

MatrixXd Lower(int n) {
  MatrixXd l = MatrixXd::Random(n, n).triangularView<Eigen::Lower>();
  l.diagonal().array() = l.diagonal().array().abs() + 2.0;
  return l;
}

TEST(Blas, GemmAndSyrkFloat) {
  const Eigen::MatrixXf a = Eigen::MatrixXf::Random(7, 5), b = Eigen::MatrixXf::Random(5, 6);
  Eigen::MatrixXf c(7, 6);
  blas::Gemm(false, false, 7, 6, 5, 1.0f, a.data(), 7, b.data(), 5, 0.0f, c.data(), 7);
  EXPECT_LT(Rel(c.cast<double>(), a.cast<double>() * b.cast<double>()), 1e-6);
  Eigen::MatrixXf g = Eigen::MatrixXf::Zero(5, 5);
  blas::SyrkLowerTrans(5, 7, 2.0f, a.data(), 7, 0.0f, g.data(), 5);
  const MatrixXd want = 2.0 * a.cast<double>().transpose() * a.cast<double>();
  EXPECT_LT(Rel(g.cast<double>().triangularView<Eigen::Lower>(),
                want.triangularView<Eigen::Lower>()),
            1e-6);
}

TEST(Blas, SymmReadsTheLowerTriangle) {
  const int m = 9, n = 4;
  const MatrixXd s = Spd(m);
  MatrixXd a_lower = s.triangularView<Eigen::Lower>();  // upper zero: must not be read
  const MatrixXd b = MatrixXd::Random(m, n), bt = MatrixXd::Random(n, m);
  MatrixXd c(m, n), ct(n, m);
  blas::SymmLower(true, m, n, 1.0, a_lower.data(), m, b.data(), m, 0.0, c.data(), m);
  EXPECT_LT(Rel(c, s * b), 1e-14);
  blas::SymmLower(false, n, m, 1.0, a_lower.data(), m, bt.data(), n, 0.0, ct.data(), n);
  EXPECT_LT(Rel(ct, bt * s), 1e-14);
}

TEST(Blas, TrmmAndTrsm) {
  const int m = 8, n = 3;
  const MatrixXd l = Lower(m);
  for (bool trans : {false, true}) {
    const MatrixXd op = trans ? MatrixXd(l.transpose()) : l;
    MatrixXd b = MatrixXd::Random(m, n);
    const MatrixXd b0 = b;
    blas::TrmmLower(true, trans, m, n, 1.0, l.data(), m, b.data(), m);
    EXPECT_LT(Rel(b, op * b0), 1e-14) << trans;
    blas::TrsmLower(true, trans, m, n, 1.0, l.data(), m, b.data(), m);
    EXPECT_LT(Rel(b, b0), 1e-13) << trans;
    MatrixXd r = MatrixXd::Random(n, m);
    const MatrixXd r0 = r;
    blas::TrmmLower(false, trans, n, m, 1.0, l.data(), m, r.data(), n);
    EXPECT_LT(Rel(r, r0 * op), 1e-14) << trans;
    blas::TrsmLower(false, trans, n, m, 1.0, l.data(), m, r.data(), n);
    EXPECT_LT(Rel(r, r0), 1e-13) << trans;
  }
}

TEST(Blas, CholeskyInverseAndLauum) {
  const int n = 10;
  const MatrixXd s = Spd(n);
  MatrixXd f = s;
  ASSERT_EQ(blas::Potrf('L', n, f.data(), n), 0);
  const MatrixXd l = f.triangularView<Eigen::Lower>();
  EXPECT_LT(Rel(l, s.llt().matrixL().toDenseMatrix()), 1e-13);
  MatrixXd inv = f;
  ASSERT_EQ(blas::Potri('L', n, inv.data(), n), 0);
  EXPECT_LT(Rel(inv.triangularView<Eigen::Lower>(),
                MatrixXd(s.inverse()).triangularView<Eigen::Lower>()),
            1e-12);
  MatrixXd t = l;
  ASSERT_EQ(blas::Trtri('L', n, t.data(), n), 0);
  EXPECT_LT(Rel(t.triangularView<Eigen::Lower>(), l.inverse()), 1e-12);
  MatrixXd u = l;
  ASSERT_EQ(blas::Lauum('L', n, u.data(), n), 0);  // L^T L, lower triangle
  EXPECT_LT(Rel(u.triangularView<Eigen::Lower>(),
                MatrixXd(l.transpose() * l).triangularView<Eigen::Lower>()),
            1e-13);
  // Not positive definite: a positive info, not a crash.
  MatrixXd bad = -MatrixXd::Identity(3, 3);
  EXPECT_GT(blas::Potrf('L', 3, bad.data(), 3), 0);
  Eigen::MatrixXf badf = -Eigen::MatrixXf::Identity(3, 3);
  EXPECT_GT(blas::Potrf('L', 3, badf.data(), 3), 0);
}

TEST(ThreadPolicy, SetBlasThreadsTakesEffectAndClamps) {
  const int saved = BlasThreads();
  SetBlasThreads(1);
  EXPECT_EQ(BlasThreads(), 1);
  SetBlasThreads(0);
  EXPECT_EQ(BlasThreads(), 1);
  SetBlasThreads(BlasMaxThreads());
  EXPECT_EQ(BlasThreads(), BlasMaxThreads());
  EXPECT_GE(BlasMaxThreads(), 1);
  SetBlasThreads(saved);
}

}  // namespace
}  // namespace natgrad::linalg
