// The OpenBLAS paths of kfac_kernels.h (Product, GramFactor) against Eigen
// in float64, above the BLAS threshold, with OpenBLAS threaded and held at
// one thread (the column-panel split of blas_products.cc).
#include "server/core/kfac/blas_products.h"

#include "gtest/gtest.h"
#include "server/core/kfac/kfac_kernels.h"

extern "C" {
void openblas_set_num_threads(int num_threads);
int openblas_get_num_threads(void);
}

namespace natgrad::core::kfac {
namespace {

class KfacBlasProducts : public ::testing::TestWithParam<int> {
 protected:
  void SetUp() override {
    saved_ = openblas_get_num_threads();
    openblas_set_num_threads(GetParam());
  }
  void TearDown() override { openblas_set_num_threads(saved_); }
  int saved_ = 1;
};

template <typename Scalar>
double RelError(const Matrix<Scalar>& got, const Eigen::MatrixXd& want) {
  return (got.template cast<double>() - want).norm() / want.norm();
}

template <typename Scalar>
void CheckProducts(double tol) {
  // Odd sizes, above kBlasMinWork and kBlasSplitWork.
  const int m = 203, k = 311, n = 257;
  for (bool ta : {false, true}) {
    for (bool tb : {false, true}) {
      const Matrix<Scalar> a = ta ? Matrix<Scalar>::Random(k, m)
                                  : Matrix<Scalar>::Random(m, k);
      const Matrix<Scalar> b = tb ? Matrix<Scalar>::Random(n, k)
                                  : Matrix<Scalar>::Random(k, n);
      ASSERT_TRUE(UseBlas(m, n, k));
      const Eigen::MatrixXd ad = a.template cast<double>();
      const Eigen::MatrixXd bd = b.template cast<double>();
      const Eigen::MatrixXd want = (ta ? Eigen::MatrixXd(ad.transpose()) : ad) *
                                   (tb ? Eigen::MatrixXd(bd.transpose()) : bd);
      const Matrix<Scalar> got = Product<Scalar>(a, ta, b, tb);
      ASSERT_EQ(got.rows(), m);
      ASSERT_EQ(got.cols(), n);
      EXPECT_LT(RelError(got, want), tol) << "ta " << ta << " tb " << tb;
    }
  }
}

template <typename Scalar>
void CheckGram(double tol) {
  for (bool bias : {false, true}) {
    const Matrix<Scalar> x = Matrix<Scalar>::Random(517, 301);
    const Eigen::MatrixXd xd = x.template cast<double>();
    Eigen::MatrixXd xb(xd.rows(), xd.cols() + (bias ? 1 : 0));
    xb.leftCols(xd.cols()) = xd;
    if (bias) xb.col(xd.cols()).setOnes();
    const Eigen::MatrixXd want = xb.transpose() * xb / 7.0;
    const Matrix<Scalar> got = GramFactor<Scalar>(x, bias, Scalar(7));
    EXPECT_LT(RelError(got, want), tol) << "bias " << bias;
    EXPECT_EQ(got, got.transpose());  // exactly symmetric
  }
}

TEST_P(KfacBlasProducts, ProductFloatMatchesFloat64) { CheckProducts<float>(1e-5); }
TEST_P(KfacBlasProducts, ProductDoubleMatchesFloat64) { CheckProducts<double>(1e-13); }
TEST_P(KfacBlasProducts, GramFloatMatchesFloat64) { CheckGram<float>(1e-5); }
TEST_P(KfacBlasProducts, GramDoubleMatchesFloat64) { CheckGram<double>(1e-13); }

TEST_P(KfacBlasProducts, PreconditionersMatchEigen) {
  const int dg = 150, da = 181;
  const Eigen::MatrixXd qg = Eigen::MatrixXd::Random(dg, dg);
  const Eigen::MatrixXd qa = Eigen::MatrixXd::Random(da, da);
  const Eigen::MatrixXd grad = Eigen::MatrixXd::Random(dg, da);
  const Eigen::VectorXd sg = Eigen::VectorXd::Random(dg).cwiseAbs();
  const Eigen::VectorXd sa = Eigen::VectorXd::Random(da).cwiseAbs();
  Eigen::MatrixXd rotated = qg.transpose() * grad * qa;
  rotated.array() /= ((sg * sa.transpose()).array() + 0.1);
  const Eigen::MatrixXd want_eigen = qg * rotated * qa.transpose();
  EXPECT_LT(RelError<double>(PreconditionEigen<double>(qg, sg, qa, sa, grad, 0.1),
                             want_eigen),
            1e-12);
  const Eigen::MatrixXd want_factored = qg * grad * qa;
  EXPECT_LT(RelError<double>(PreconditionFactored<double>(qg, qa, grad),
                             want_factored),
            1e-13);
}

INSTANTIATE_TEST_SUITE_P(Threads, KfacBlasProducts, ::testing::Values(1, 2),
                         [](const auto& info) {
                           return "openblas_threads_" +
                                  std::to_string(info.param);
                         });

}  // namespace
}  // namespace natgrad::core::kfac
