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

TEST(TensorCodec, TakenTensorsAreCheckedOnce) {
  natgrad::v1::Tensor t = Floats({1, 2, 3}, {3});
  absl::StatusOr<core::DenseTensor> d = TakeTensor(&t, "g");
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_TRUE(d->known_finite());  // the blocks do not scan it again
  EXPECT_TRUE(t.data().empty());   // moved, not copied
  natgrad::v1::Tensor bad = Floats({1, std::numeric_limits<float>::quiet_NaN()}, {2});
  EXPECT_THAT(TakeTensor(&bad, "g").status().message(), HasSubstr("g contains NaN or Inf"));
}

// What the reply encoder does with a block's delta: its bytes move when the
// dtypes agree, else one converting pass that equals EncodeMatrix's bit for bit.
TEST(TensorCodec, EncodeTensorMovesOrConvertsLikeEncodeMatrix) {
  Eigen::MatrixXd m(2, 3);
  m << 0.1, 1.0 / 3.0, -2.5e30, 7, 1e-40, -0.0;
  const std::vector<int64_t> shape = {3, 2};  // any wire shape of 6 values
  for (auto want : {natgrad::v1::FLOAT32, natgrad::v1::FLOAT64}) {
    const natgrad::v1::Tensor ref = EncodeMatrix(m, want, shape);
    natgrad::v1::Tensor from64, from32;
    EncodeTensor(core::DenseTensor::FromMatrix(m), want, shape, &from64);
    EXPECT_EQ(from64.SerializeAsString(), ref.SerializeAsString());
    const Eigen::MatrixXf f = m.cast<float>();
    EncodeTensor(core::DenseTensor::FromMatrix(f), want, shape, &from32);
    EXPECT_EQ(from32.SerializeAsString(),
              EncodeMatrix(f.cast<double>(), want, shape).SerializeAsString());
  }
  core::DenseTensor same = core::DenseTensor::FromMatrix(m);
  const void* bytes = same.data();
  natgrad::v1::Tensor out;
  EncodeTensor(std::move(same), natgrad::v1::FLOAT64, shape, &out);
  EXPECT_EQ(static_cast<const void*>(out.data().data()), bytes);  // moved
}

}  // namespace
}  // namespace natgrad::wire
