#include "server/wire/tensor_codec.h"

#include <cstring>
#include <limits>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace natgrad::wire {
namespace {

using ::testing::HasSubstr;

natgrad::v1::Tensor Floats(std::vector<float> v, std::vector<int64_t> shape) {
  natgrad::v1::Tensor t;
  t.set_dtype(natgrad::v1::FLOAT32);
  for (auto d : shape) t.add_shape(d);
  t.set_data(std::string(reinterpret_cast<const char*>(v.data()), v.size() * 4));
  return t;
}

TEST(TensorCodec, RowMajorWireBecomesTheSameMatrix) {
  // [[1, 2, 3], [4, 5, 6]] on the wire, row-major.
  auto t = Floats({1, 2, 3, 4, 5, 6}, {2, 3});
  ASSERT_TRUE(ValidateTensor(t, "x").ok());
  Eigen::MatrixXd m = DecodeMatrix(t);
  ASSERT_EQ(m.rows(), 2);
  ASSERT_EQ(m.cols(), 3);
  EXPECT_EQ(m(0, 2), 3);
  EXPECT_EQ(m(1, 0), 4);
  natgrad::v1::Tensor back = EncodeMatrix(m, natgrad::v1::FLOAT32);
  EXPECT_EQ(back.data(), t.data());
}

TEST(TensorCodec, RanksMapToMatrices) {
  EXPECT_EQ(DecodeMatrix(Floats({7}, {})).size(), 1);
  Eigen::MatrixXd v = DecodeMatrix(Floats({1, 2, 3}, {3}));
  EXPECT_EQ(v.rows(), 3);
  EXPECT_EQ(v.cols(), 1);
  // A conv kernel [out=2, in=1, 2, 2] is [2, 4].
  Eigen::MatrixXd k = DecodeMatrix(Floats({1, 2, 3, 4, 5, 6, 7, 8}, {2, 1, 2, 2}));
  EXPECT_EQ(k.rows(), 2);
  EXPECT_EQ(k.cols(), 4);
  EXPECT_EQ(k(1, 0), 5);
}

TEST(TensorCodec, SlicesOfAStack) {
  auto slices = DecodeSlices(Floats({1, 2, 3, 4, 5, 6, 7, 8}, {2, 2, 2}));
  ASSERT_EQ(slices.size(), 2u);
  EXPECT_EQ(slices[1](0, 1), 6);
  auto vectors = DecodeSlices(Floats({1, 2, 3, 4}, {2, 2}));
  EXPECT_EQ(vectors[1].rows(), 2);
  EXPECT_EQ(vectors[1](1, 0), 4);
}

TEST(TensorCodec, Float64IsExact) {
  Eigen::MatrixXd m(2, 2);
  m << 0.1, 1.0 / 3.0, -2.5e-300, 7;
  EXPECT_EQ(DecodeMatrix(EncodeExact(m)), m);
}

TEST(TensorCodec, RejectsWhatCannotBeRead) {
  natgrad::v1::Tensor t = Floats({1, 2}, {2});
  t.set_dtype(natgrad::v1::DTYPE_UNSPECIFIED);
  EXPECT_THAT(ValidateTensor(t, "f").message(), HasSubstr("f has dtype"));
  t = Floats({1, 2}, {3});
  EXPECT_THAT(ValidateTensor(t, "f").message(), HasSubstr("has 8 bytes of data"));
  t = Floats({1, 2}, {-2});
  EXPECT_THAT(ValidateTensor(t, "f").message(), HasSubstr("negative"));
  t = Floats({1, std::numeric_limits<float>::infinity()}, {2});
  EXPECT_THAT(ValidateTensor(t, "f").message(), HasSubstr("NaN or Inf"));
  t = Floats({}, {1 << 30, 1 << 30, 1 << 30});
  EXPECT_THAT(ValidateTensor(t, "f").message(), HasSubstr("too large"));
}

}  // namespace
}  // namespace natgrad::wire
