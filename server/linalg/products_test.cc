// linalg::Gemm and linalg::GramLower against Eigen products in float64, on
// both sides of kBlasSplitWork, without a pool, with a pool of one and with
// pools that split; with OpenBLAS held at one thread and at its default
// (the engine's two settings). Also the split policy itself.
#include "server/linalg/products.h"

#include <algorithm>
#include <memory>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "Eigen/Core"
#include "gtest/gtest.h"
#include "server/linalg/thread_policy.h"

namespace natgrad::linalg {
namespace {

template <typename Scalar>
using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;

template <typename Scalar>
double RelError(const Matrix<Scalar>& got, const Eigen::MatrixXd& want) {
  return (got.template cast<double>() - want).norm() / want.norm();
}

template <typename Scalar>
double Tol() {
  return sizeof(Scalar) == 4 ? 1e-5 : 1e-13;
}

TEST(PanelCount, SplitsOnlyLargeProductsOnAPoolThatCan) {
  ComputePool one(1), three(3);
  EXPECT_EQ(PanelCount(kBlasSplitWork * 100, 4096, nullptr), 1);
  EXPECT_EQ(PanelCount(kBlasSplitWork * 100, 4096, &one), 1);
  EXPECT_EQ(PanelCount(kBlasSplitWork - 1, 4096, &three), 1);
  EXPECT_EQ(PanelCount(kBlasSplitWork, 4096, &three), 3);
  // Never a panel narrower than kMinPanelColumns (but at least one).
  EXPECT_EQ(PanelCount(kBlasSplitWork, 2 * kMinPanelColumns, &three), 2);
  EXPECT_EQ(PanelCount(kBlasSplitWork, kMinPanelColumns - 1, &three), 1);
  EXPECT_TRUE(UseBlas(64, 64, 64));
  EXPECT_FALSE(UseBlas(64, 64, 63));
}

// Param: (OpenBLAS threads: 1 or its default, pool parallelism: 0 = none).
class Products : public ::testing::TestWithParam<std::tuple<int, int>> {
 protected:
  void SetUp() override {
    saved_ = BlasThreads();
    const int blas = std::get<0>(GetParam());
    SetBlasThreads(blas == 0 ? BlasMaxThreads() : blas);
    if (std::get<1>(GetParam()) > 0) {
      pool_ = std::make_unique<ComputePool>(std::get<1>(GetParam()));
    }
  }
  void TearDown() override { SetBlasThreads(saved_); }
  ComputePool* pool() { return pool_.get(); }

  template <typename Scalar>
  void CheckGemm(int m, int n, int k) {
    for (bool ta : {false, true}) {
      for (bool tb : {false, true}) {
        // Leading dimensions larger than the operands: the panels must
        // follow them.
        const Matrix<Scalar> abig = Matrix<Scalar>::Random((ta ? k : m) + 3, ta ? m : k);
        const Matrix<Scalar> bbig = Matrix<Scalar>::Random((tb ? n : k) + 5, tb ? k : n);
        const Matrix<Scalar> a = abig.topRows(abig.rows() - 3);
        const Matrix<Scalar> b = bbig.topRows(bbig.rows() - 5);
        Matrix<Scalar> cbig = Matrix<Scalar>::Random(m + 2, n);
        const Eigen::MatrixXd c0 = cbig.topRows(m).template cast<double>();
        const Eigen::MatrixXd ad = a.template cast<double>();
        const Eigen::MatrixXd bd = b.template cast<double>();
        const Eigen::MatrixXd want =
            1.5 * (ta ? Eigen::MatrixXd(ad.transpose()) : ad) *
                (tb ? Eigen::MatrixXd(bd.transpose()) : bd) +
            0.5 * c0;
        const Matrix<Scalar> below = cbig.bottomRows(2);
        Gemm<Scalar>(ta, tb, m, n, k, Scalar(1.5), abig.data(), abig.rows(),
                     bbig.data(), bbig.rows(), Scalar(0.5), cbig.data(),
                     cbig.rows(), pool());
        const Matrix<Scalar> got = cbig.topRows(m);
        EXPECT_LT(RelError(got, want), Tol<Scalar>())
            << m << "x" << n << "x" << k << " ta " << ta << " tb " << tb;
        EXPECT_EQ(Matrix<Scalar>(cbig.bottomRows(2)), below) << "rows past m written";
      }
    }
  }

  template <typename Scalar>
  void CheckGram(int n, int k) {
    const Matrix<Scalar> xbig = Matrix<Scalar>::Random(k + 4, n);
    const Matrix<Scalar> x = xbig.topRows(k);
    const Eigen::MatrixXd xd = x.template cast<double>();
    const Eigen::MatrixXd want = xd.transpose() * xd / 7.0;
    Matrix<Scalar> c = Matrix<Scalar>::Constant(n + 1, n, Scalar(42));
    GramLower<Scalar>(n, k, Scalar(1) / Scalar(7), xbig.data(), xbig.rows(),
                      c.data(), c.rows(), pool());
    Matrix<Scalar> lower = c.topRows(n).template triangularView<Eigen::Lower>();
    const Eigen::MatrixXd want_lower = want.triangularView<Eigen::Lower>();
    EXPECT_LT(RelError(lower, want_lower), Tol<Scalar>()) << n << "x" << k;
    // The strict upper triangle and the row past n are untouched.
    for (int j = 0; j < n; ++j) {
      for (int i = 0; i < j; ++i) ASSERT_EQ(c(i, j), Scalar(42)) << i << "," << j;
      ASSERT_EQ(c(n, j), Scalar(42)) << j;
    }
  }

 private:
  int saved_ = 1;
  std::unique_ptr<ComputePool> pool_;
};

// 203 x 257 x 311 is above kBlasSplitWork (split on a pool of 2+); 70 x 90 x
// 80 is above kBlasMinWork but below the split.
TEST_P(Products, GemmFloatLarge) { CheckGemm<float>(203, 257, 311); }
TEST_P(Products, GemmDoubleLarge) { CheckGemm<double>(203, 257, 311); }
TEST_P(Products, GemmFloatBelowSplit) { CheckGemm<float>(70, 90, 80); }
TEST_P(Products, GemmDoubleBelowSplit) { CheckGemm<double>(70, 90, 80); }
TEST_P(Products, GramFloatLarge) { CheckGram<float>(301, 517); }
TEST_P(Products, GramDoubleLarge) { CheckGram<double>(301, 517); }
TEST_P(Products, GramDoubleBelowSplit) { CheckGram<double>(90, 100); }

INSTANTIATE_TEST_SUITE_P(
    ThreadsAndPools, Products,
    ::testing::Combine(::testing::Values(1, 0), ::testing::Values(0, 1, 2, 5)),
    [](const auto& info) {
      const int blas = std::get<0>(info.param);
      const int pool = std::get<1>(info.param);
      return std::string(blas == 1 ? "blas1" : "blasdefault") + "_" +
             (pool == 0 ? std::string("nopool") : "pool" + std::to_string(pool));
    });

TEST(Products, SplitGivesTheUnsplitResultOnPanelsOfOpenBlas) {
  // Each panel is its own GEMM over the same k, so the split result should
  // match the unsplit one to rounding of the same order.
  ComputePool pool(4);
  const int m = 300, n = 300, k = 300;
  const Eigen::MatrixXd a = Eigen::MatrixXd::Random(m, k), b = Eigen::MatrixXd::Random(k, n);
  Eigen::MatrixXd split(m, n), whole(m, n);
  ASSERT_GT(PanelCount(int64_t{m} * n * k, n, &pool), 1);
  Gemm<double>(false, false, m, n, k, 1.0, a.data(), m, b.data(), k, 0.0, split.data(), m, &pool);
  Gemm<double>(false, false, m, n, k, 1.0, a.data(), m, b.data(), k, 0.0, whole.data(), m, nullptr);
  EXPECT_LT((split - whole).norm() / whole.norm(), 1e-14);
}

TEST(Products, ConcurrentCallersShareOnePool) {
  // Steps of several sessions split their products on the server's one pool
  // at the same time.
  ComputePool pool(3);
  const int m = 200, n = 220, k = 240;
  ASSERT_GT(PanelCount(int64_t{m} * n * k, n, &pool), 1);
  const Eigen::MatrixXd a = Eigen::MatrixXd::Random(m, k), b = Eigen::MatrixXd::Random(k, n);
  const Eigen::MatrixXd want = a * b;
  constexpr int kCallers = 4, kRounds = 10;
  std::vector<double> worst(kCallers, 0);
  std::vector<std::thread> callers;
  for (int c = 0; c < kCallers; ++c) {
    callers.emplace_back([&, c] {
      for (int r = 0; r < kRounds; ++r) {
        Eigen::MatrixXd got(m, n);
        Gemm<double>(false, false, m, n, k, 1.0, a.data(), m, b.data(), k, 0.0, got.data(), m,
                     &pool);
        worst[c] = std::max(worst[c], (got - want).norm() / want.norm());
      }
    });
  }
  for (std::thread& t : callers) t.join();
  for (int c = 0; c < kCallers; ++c) EXPECT_LT(worst[c], 1e-13) << "caller " << c;
}

}  // namespace
}  // namespace natgrad::linalg
