#include "server/core/dense_tensor.h"

#include <cmath>
#include <cstring>
#include <limits>

#include "gtest/gtest.h"

namespace natgrad::core {
namespace {

template <typename T>
std::string Bytes(const std::vector<T>& v) {
  std::string s(v.size() * sizeof(T), '\0');
  std::memcpy(s.data(), v.data(), s.size());
  return s;
}

TEST(DenseTensor, Float32ReadsStraightIntoFloatColumnMajor) {
  // Row-major [2, 3]: 1 2 3 / 4 5 6.
  const DenseTensor t =
      DenseTensor::FromBytes(DType::kFloat32, {2, 3}, Bytes<float>({1, 2, 3, 4, 5, 6}));
  EXPECT_EQ(t.rows(), 2);
  EXPECT_EQ(t.cols(), 3);
  EXPECT_EQ(t.size(), 6);
  const Eigen::MatrixXf m = t.ToMatrix<float>();
  Eigen::MatrixXf want(2, 3);
  want << 1, 2, 3, 4, 5, 6;
  EXPECT_EQ(m, want);
  EXPECT_EQ(t.View<float>()(1, 2), 6.0f);
  EXPECT_EQ(t.ToMatrix<double>()(1, 0), 4.0);
}

TEST(DenseTensor, HigherRanksAreLeadingDimensionByTheRest) {
  std::vector<double> v(2 * 3 * 4);
  for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<double>(i);
  const DenseTensor t = DenseTensor::FromBytes(DType::kFloat64, {2, 3, 4}, Bytes(v));
  EXPECT_EQ(t.rows(), 2);
  EXPECT_EQ(t.cols(), 12);
  EXPECT_EQ(t.ToMatrix<double>()(1, 5), 17.0);
  const DenseTensor vec = DenseTensor::FromBytes(DType::kFloat64, {3}, Bytes<double>({7, 8, 9}));
  EXPECT_EQ(vec.rows(), 3);
  EXPECT_EQ(vec.cols(), 1);
  EXPECT_EQ(vec.ToMatrix<double>()(2, 0), 9.0);
}

TEST(DenseTensor, FromEigenIsExactFloat64) {
  Eigen::MatrixXd m(2, 2);
  m << 0.1, -2.5e300, 3, 1e-300;
  const DenseTensor t = m;
  EXPECT_EQ(t.dtype(), DType::kFloat64);
  EXPECT_EQ(t.ToMatrix<double>(), m);
}

TEST(DenseTensor, UnalignedBytesReadCorrectly) {
  std::string padded = "x" + Bytes<double>({1.5, -2.25});
  const DenseTensor t = DenseTensor::FromBytes(DType::kFloat64, {2}, padded.substr(1));
  EXPECT_EQ(t.ToMatrix<double>()(1, 0), -2.25);
}

TEST(DenseTensor, AllFiniteFindsNanAndInf) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  EXPECT_TRUE(DenseTensor::FromBytes(DType::kFloat32, {2}, Bytes<float>({1, 2})).AllFinite());
  EXPECT_FALSE(DenseTensor::FromBytes(DType::kFloat32, {2}, Bytes<float>({1, nan})).AllFinite());
  EXPECT_FALSE(DenseTensor::FromBytes(DType::kFloat64, {1},
                                      Bytes<double>({-std::numeric_limits<double>::infinity()}))
                   .AllFinite());
}

TEST(DenseTensor, AllFiniteScansEveryValueOfALongTensor) {
  // Long enough for the vectorised scan's main loop and its tail.
  for (size_t n : {1, 7, 8, 1001}) {
    for (size_t at : {size_t{0}, n / 2, n - 1}) {
      std::vector<float> v(n, 1.5f);
      v[at] = std::numeric_limits<float>::infinity();
      EXPECT_FALSE(DenseTensor::FromBytes(DType::kFloat32, {int64_t(n)}, Bytes(v)).AllFinite())
          << n << " " << at;
      v[at] = -3e38f;
      EXPECT_TRUE(DenseTensor::FromBytes(DType::kFloat32, {int64_t(n)}, Bytes(v)).AllFinite());
    }
  }
}

TEST(DenseTensor, FromMatrixKeepsThePrecisionAndWritesRowMajor) {
  Eigen::MatrixXf f(2, 3);
  f << 1, 2, 3, 4, 5, 6.25f;
  DenseTensor t = DenseTensor::FromMatrix(f);
  EXPECT_EQ(t.dtype(), DType::kFloat32);
  EXPECT_EQ(t.shape(), (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(t.bytes(), Bytes<float>({1, 2, 3, 4, 5, 6.25f}));
  EXPECT_EQ(t.ToMatrix<float>(), f);
  // An expression is evaluated straight into the bytes, in its own scalar.
  const DenseTensor d = DenseTensor::FromMatrix(-2.0 * f.cast<double>());
  EXPECT_EQ(d.dtype(), DType::kFloat64);
  EXPECT_EQ(d.bytes(), Bytes<double>({-2, -4, -6, -8, -10, -12.5}));
  const std::string moved = t.TakeBytes();
  EXPECT_EQ(moved, Bytes<float>({1, 2, 3, 4, 5, 6.25f}));
  EXPECT_TRUE(t.empty());
}

TEST(DenseTensor, CheckedBytesAreKnownFiniteUntilWritten) {
  DenseTensor t = DenseTensor::FromCheckedBytes(DType::kFloat32, {2}, Bytes<float>({1, 2}));
  EXPECT_TRUE(t.known_finite());
  EXPECT_TRUE(t.AllFinite());
  EXPECT_FALSE(DenseTensor::FromBytes(DType::kFloat32, {2}, Bytes<float>({1, 2})).known_finite());
  // Writing through MutableData forgets it: the scan decides again.
  t.MutableData<float>()[1] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_FALSE(t.known_finite());
  EXPECT_FALSE(t.AllFinite());
}

}  // namespace
}  // namespace natgrad::core
