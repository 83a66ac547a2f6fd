// The OpenBLAS paths of kfac_kernels.h (Product, GramFactor, the two
// preconditioners) against Eigen in float64, above the BLAS and split
// thresholds, with OpenBLAS threaded and held at one thread, without a
// compute pool and with one that splits the products into column panels.
// Also the checks of kfac_step_checks.h that lean on them: the raw Gram as
// its own finiteness check, and the fused bound of CheckCommittable.
#include "server/blocks/kfac_dense/math/kfac_kernels.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <tuple>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/blocks/kfac_dense/math/kfac_step_checks.h"
#include "server/linalg/compute_pool.h"
#include "server/linalg/thread_policy.h"

namespace natgrad::core::kfac {
namespace {

// Param: (OpenBLAS threads, compute pool parallelism; 0 = no pool).
class KfacKernels : public ::testing::TestWithParam<std::tuple<int, int>> {
 protected:
  void SetUp() override {
    saved_ = linalg::BlasThreads();
    linalg::SetBlasThreads(std::get<0>(GetParam()));
    if (std::get<1>(GetParam()) > 0) {
      pool_ = std::make_unique<linalg::ComputePool>(std::get<1>(GetParam()));
    }
  }
  void TearDown() override { linalg::SetBlasThreads(saved_); }
  linalg::ComputePool* pool() { return pool_.get(); }

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
        ASSERT_TRUE(linalg::UseBlas(m, n, k));
        const Eigen::MatrixXd ad = a.template cast<double>();
        const Eigen::MatrixXd bd = b.template cast<double>();
        const Eigen::MatrixXd want = (ta ? Eigen::MatrixXd(ad.transpose()) : ad) *
                                     (tb ? Eigen::MatrixXd(bd.transpose()) : bd);
        const Matrix<Scalar> got = Product<Scalar>(a, ta, b, tb, pool());
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
      const Matrix<Scalar> got = GramFactor<Scalar>(x, bias, Scalar(7), pool());
      EXPECT_LT(RelError(got, want), tol) << "bias " << bias;
      EXPECT_EQ(got, got.transpose());  // exactly symmetric
      // The same rows stored row-major, as raw statistics arrive; also below
      // the BLAS threshold (Eigen's rank update).
      for (Eigen::Index rows : {Eigen::Index{517}, Eigen::Index{3}}) {
        const Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> rm =
            x.topRows(rows);
        Eigen::MatrixXd xr = xb.topRows(rows);
        const Eigen::MatrixXd want_rows = xr.transpose() * xr / 7.0;
        const Matrix<Scalar> got_rows = GramFactorRowMajor<Scalar>(
            rm.data(), rows, x.cols(), bias, Scalar(7), pool());
        EXPECT_LT(RelError(got_rows, want_rows), tol) << "row-major, rows " << rows;
        EXPECT_EQ(got_rows, got_rows.transpose());
      }
    }
  }

  // CheckedRawGram on received bytes nobody scanned (wire::TakeTensorUnscanned):
  // every non-finite value, wherever it lies, is refused with its place, as a
  // scan would have found it; finite values give GramFactorRowMajor's Gram
  // exactly; finite values whose squares overflow are refused as overflow.
  template <typename Scalar>
  void CheckRawGramFindsNonFinite() {
    using RowMajor = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
    const DType dtype = std::is_same_v<Scalar, float> ? DType::kFloat32 : DType::kFloat64;
    auto received = [&](const RowMajor& m) {
      std::string bytes(static_cast<size_t>(m.size()) * sizeof(Scalar), '\0');
      std::memcpy(bytes.data(), m.data(), bytes.size());
      return DenseTensor::FromBytes(dtype, {m.rows(), m.cols()}, std::move(bytes));
    };
    const Scalar inf = std::numeric_limits<Scalar>::infinity();
    const Scalar nan = std::numeric_limits<Scalar>::quiet_NaN();
    for (auto [rows, cols] : {std::pair<Eigen::Index, Eigen::Index>{517, 301}, {3, 5}, {4, 1}}) {
      const RowMajor x = RowMajor::Random(rows, cols);
      for (bool bias : {false, true}) {
        const DenseTensor good = received(x);
        ASSERT_FALSE(good.known_finite());
        absl::StatusOr<Matrix<Scalar>> gram =
            CheckedRawGram<Scalar>("fc", "kfac.raw.activations", good, bias, Scalar(7), pool(),
                                   "overflows");
        ASSERT_TRUE(gram.ok()) << gram.status();
        const Matrix<Scalar> want =
            GramFactorRowMajor<Scalar>(x.data(), rows, cols, bias, Scalar(7), pool());
        EXPECT_EQ(*gram, want);
        for (Scalar bad : {nan, inf, -inf}) {
          for (auto [i, j] : {std::pair<Eigen::Index, Eigen::Index>{0, 0},
                              {rows - 1, cols - 1}, {rows / 2, cols / 2}}) {
            RowMajor y = x;
            y(i, j) = bad;
            absl::StatusOr<Matrix<Scalar>> r = CheckedRawGram<Scalar>(
                "fc", "kfac.raw.activations", received(y), bias, Scalar(7), pool(), "overflows");
            ASSERT_FALSE(r.ok()) << rows << "x" << cols << " bad " << bad << " at " << i << "," << j;
            EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
            EXPECT_THAT(std::string(r.status().message()),
                        ::testing::HasSubstr(absl::StrCat(
                            "block \"fc\": kfac.raw.activations has a non-finite value (",
                            static_cast<double>(bad), ") at [", i, ", ", j, "]")));
          }
        }
      }
      // Finite, but a square overflows float32 (float64 holds 1e30 squared).
      RowMajor big = x;
      big(rows - 1, 0) = Scalar(1e30);
      const DenseTensor huge = received(big);
      absl::StatusOr<Matrix<Scalar>> r = CheckedRawGram<Scalar>(
          "fc", "kfac.raw.activations", huge, false, Scalar(1), pool(), "overflows in a^T a / n");
      if (std::is_same_v<Scalar, float>) {
        ASSERT_FALSE(r.ok());
        EXPECT_EQ(r.status().message(),
                  "block \"fc\": kfac.raw.activations overflows in a^T a / n");
      } else {
        ASSERT_TRUE(r.ok()) << r.status();
        EXPECT_TRUE(r->allFinite());
      }
      EXPECT_TRUE(huge.AllFinite());
    }
  }

  template <typename Scalar>
  static double RelError(const Matrix<Scalar>& got, const Eigen::MatrixXd& want) {
    return (got.template cast<double>() - want).norm() / want.norm();
  }

 private:
  int saved_ = 1;
  std::unique_ptr<linalg::ComputePool> pool_;
};

TEST_P(KfacKernels, ProductFloatMatchesFloat64) { CheckProducts<float>(1e-5); }
TEST_P(KfacKernels, ProductDoubleMatchesFloat64) { CheckProducts<double>(1e-13); }
TEST_P(KfacKernels, GramFloatMatchesFloat64) { CheckGram<float>(1e-5); }
TEST_P(KfacKernels, GramDoubleMatchesFloat64) { CheckGram<double>(1e-13); }
TEST_P(KfacKernels, RawGramFloatFindsEveryNonFiniteValue) { CheckRawGramFindsNonFinite<float>(); }
TEST_P(KfacKernels, RawGramDoubleFindsEveryNonFiniteValue) { CheckRawGramFindsNonFinite<double>(); }

TEST_P(KfacKernels, PreconditionersMatchEigen) {
  const int dg = 150, da = 181;
  const Eigen::MatrixXd qg = Eigen::MatrixXd::Random(dg, dg);
  const Eigen::MatrixXd qa = Eigen::MatrixXd::Random(da, da);
  const Eigen::MatrixXd grad = Eigen::MatrixXd::Random(dg, da);
  const Eigen::VectorXd sg = Eigen::VectorXd::Random(dg).cwiseAbs();
  const Eigen::VectorXd sa = Eigen::VectorXd::Random(da).cwiseAbs();
  Eigen::MatrixXd rotated = qg.transpose() * grad * qa;
  rotated.array() /= ((sg * sa.transpose()).array() + 0.1);
  const Eigen::MatrixXd want_eigen = qg * rotated * qa.transpose();
  EXPECT_LT(RelError<double>(
                PreconditionEigen<double>(qg, sg, qa, sa, grad, 0.1, pool()),
                want_eigen),
            1e-12);
  const Eigen::MatrixXd want_factored = qg * grad * qa;
  EXPECT_LT(RelError<double>(PreconditionFactored<double>(qg, qa, grad, pool()),
                             want_factored),
            1e-13);
}

INSTANTIATE_TEST_SUITE_P(
    ThreadsAndPools, KfacKernels,
    ::testing::Combine(::testing::Values(1, 2), ::testing::Values(0, 3)),
    [](const auto& info) {
      const int pool = std::get<1>(info.param);
      return "openblas_threads_" + std::to_string(std::get<0>(info.param)) +
             (pool == 0 ? std::string("_nopool") : "_pool" + std::to_string(pool));
    });

}  // namespace
}  // namespace natgrad::core::kfac

namespace natgrad::core::kfac {
namespace {

// CheckCommittable's fused largest-entry check against the definition it
// stands for: |v| + |decayed| (and lr times it) built in float64, every
// entry checked finite and, for a float32 reader, within float32's range.
template <typename Scalar>
absl::Status CommittableOracle(const Matrix<Scalar>& v, const std::optional<Matrix<Scalar>>& d,
                               double lr, DType gradient_dtype) {
  Eigen::MatrixXd bound = v.template cast<double>().cwiseAbs();
  if (d) bound += d->template cast<double>().cwiseAbs();
  const DType state = sizeof(Scalar) == 4 ? DType::kFloat32 : DType::kFloat64;
  if (absl::Status s = first_order_internal::CheckCommittable("fc", "momentum", state, bound);
      !s.ok()) {
    return s;
  }
  bound *= lr;
  return first_order_internal::CheckCommittable(
      "fc", "delta", gradient_dtype == DType::kFloat32 ? DType::kFloat32 : state, bound);
}

template <typename Scalar>
void CheckCommittableAgainstOracle() {
  const Scalar inf = std::numeric_limits<Scalar>::infinity();
  const Scalar nan = std::numeric_limits<Scalar>::quiet_NaN();
  const Scalar big = std::numeric_limits<Scalar>::max();
  int refused = 0;
  for (int c = 0; c < 9; ++c) {
    Matrix<Scalar> v = Matrix<Scalar>::Random(37, 23);
    std::optional<Matrix<Scalar>> d;
    if (c % 3 != 0) d = Matrix<Scalar>::Random(37, 23);
    if (c == 1) v(36, 22) = nan;
    if (c == 2) (*d)(0, 5) = -inf;
    if (c == 4) v(3, 3) = big, (*d)(3, 3) = -big;  // |v| + |d| = 2 max
    if (c == 5) (*d)(10, 1) = big;                 // within range alone
    for (double lr : {0.0, 0.1, 1.0, 3.0, 1e300}) {
      for (DType g : {DType::kFloat32, DType::kFloat64}) {
        const absl::Status want = CommittableOracle<Scalar>(v, d, lr, g);
        const absl::Status got = CheckCommittable<Scalar>("fc", v, d, lr, g);
        EXPECT_EQ(got, want) << "case " << c << " lr " << lr;
        refused += !want.ok();
      }
    }
  }
  EXPECT_GT(refused, 10);  // the cases reach every refusal, not only the OK path
}

TEST(KfacCheckCommittable, FloatMatchesTheDenseDefinition) {
  CheckCommittableAgainstOracle<float>();
}
TEST(KfacCheckCommittable, DoubleMatchesTheDenseDefinition) {
  CheckCommittableAgainstOracle<double>();
}

}  // namespace
}  // namespace natgrad::core::kfac
