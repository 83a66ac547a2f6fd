#include "server/wire/tensor_codec.h"

#include <bit>
#include <cmath>
#include <cstring>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace natgrad::wire {
namespace {

using RowMajor =
    Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

size_t ElementSize(natgrad::v1::DType dtype) {
  switch (dtype) {
    case natgrad::v1::FLOAT32:
      return 4;
    case natgrad::v1::FLOAT64:
      return 8;
    default:
      return 0;
  }
}

// The wire is little-endian; so is every platform natgrad builds for.
static_assert(std::endian::native == std::endian::little);

// The one finiteness scan of a received tensor (TakeTensor marks the core
// tensor checked, so the blocks do not scan it again). x * 0 is NaN exactly
// for NaN and +-Inf, and the sum vectorises where a branch per value would
// not. The payload may be unaligned.
template <typename T>
bool AllFinite(const std::string& bytes) {
  const Eigen::Index n = static_cast<Eigen::Index>(bytes.size() / sizeof(T));
  if (n == 0) return true;
  const Eigen::Map<const Eigen::Array<T, Eigen::Dynamic, 1>, Eigen::Unaligned> v(
      reinterpret_cast<const T*>(bytes.data()), n);
  return !std::isnan((v * T(0)).sum());
}

template <typename T>
void CopyOut(const char* bytes, double* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    T v;
    std::memcpy(&v, bytes + i * sizeof(T), sizeof(T));
    out[i] = static_cast<double>(v);
  }
}

std::pair<int64_t, int64_t> MatrixDims(const natgrad::v1::Tensor& t,
                                       int skip) {
  const int rank = t.shape_size() - skip;
  if (rank <= 0) return {1, 1};
  const int64_t rows = t.shape(skip);
  int64_t cols = 1;
  for (int i = skip + 1; i < t.shape_size(); ++i) cols *= t.shape(i);
  return {rows, cols};
}

Eigen::MatrixXd DecodeRange(const natgrad::v1::Tensor& t, int64_t offset,
                            int64_t rows, int64_t cols) {
  RowMajor m(rows, cols);
  const int64_t n = rows * cols;
  // Read in place: no intermediate copy of the (possibly large) payload.
  const char* part = t.data().data() + offset * ElementSize(t.dtype());
  if (t.dtype() == natgrad::v1::FLOAT32) {
    CopyOut<float>(part, m.data(), n);
  } else {
    CopyOut<double>(part, m.data(), n);
  }
  return m;
}

}  // namespace

int64_t NumElements(const natgrad::v1::Tensor& tensor) {
  int64_t n = 1;
  for (int64_t d : tensor.shape()) n *= d;
  return n;
}

absl::Status ValidateTensorLayout(const natgrad::v1::Tensor& tensor,
                                  absl::string_view field) {
  const size_t es = ElementSize(tensor.dtype());
  if (es == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, " has dtype ",
                     natgrad::v1::DType_Name(tensor.dtype()),
                     ", want FLOAT32 or FLOAT64"));
  }
  int64_t n = 1;
  for (int64_t d : tensor.shape()) {
    if (d < 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          field, " has a negative dimension in shape [",
          absl::StrJoin(tensor.shape(), ", "), "]"));
    }
    // Guard the product against overflow before multiplying.
    if (d != 0 && n > (int64_t{1} << 40) / d) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, " has too large a shape"));
    }
    n *= d;
  }
  if (tensor.data().size() != static_cast<size_t>(n) * es) {
    return absl::InvalidArgumentError(absl::StrCat(
        field, " has ", tensor.data().size(), " bytes of data, shape [",
        absl::StrJoin(tensor.shape(), ", "), "] of ",
        natgrad::v1::DType_Name(tensor.dtype()), " needs ", n * es));
  }
  return absl::OkStatus();
}

absl::Status ValidateTensor(const natgrad::v1::Tensor& tensor,
                            absl::string_view field) {
  if (absl::Status s = ValidateTensorLayout(tensor, field); !s.ok()) return s;
  const bool finite = tensor.dtype() == natgrad::v1::FLOAT32
                          ? AllFinite<float>(tensor.data())
                          : AllFinite<double>(tensor.data());
  if (!finite) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, " contains NaN or Inf"));
  }
  return absl::OkStatus();
}

namespace {

// The validated payload moved into a core tensor, marked finite or not.
core::DenseTensor MoveIntoCore(natgrad::v1::Tensor* tensor, bool scanned) {
  std::string bytes;
  tensor->mutable_data()->swap(bytes);
  const core::DType dtype =
      tensor->dtype() == natgrad::v1::FLOAT32 ? core::DType::kFloat32 : core::DType::kFloat64;
  std::vector<int64_t> shape(tensor->shape().begin(), tensor->shape().end());
  return scanned ? core::DenseTensor::FromCheckedBytes(dtype, std::move(shape), std::move(bytes))
                 : core::DenseTensor::FromBytes(dtype, std::move(shape), std::move(bytes));
}

}  // namespace

absl::StatusOr<core::DenseTensor> TakeTensor(natgrad::v1::Tensor* tensor,
                                             absl::string_view field) {
  if (absl::Status s = ValidateTensor(*tensor, field); !s.ok()) return s;
  return MoveIntoCore(tensor, /*scanned=*/true);
}

absl::StatusOr<core::DenseTensor> TakeTensorUnscanned(natgrad::v1::Tensor* tensor,
                                                      absl::string_view field) {
  if (absl::Status s = ValidateTensorLayout(*tensor, field); !s.ok()) return s;
  return MoveIntoCore(tensor, /*scanned=*/false);
}


void EncodeTensor(core::DenseTensor tensor, natgrad::v1::DType dtype,
                  const std::vector<int64_t>& shape, natgrad::v1::Tensor* out) {
  out->set_dtype(dtype);
  out->clear_shape();
  for (int64_t d : shape) out->add_shape(d);
  const bool have32 = tensor.dtype() == core::DType::kFloat32;
  const bool want32 = dtype == natgrad::v1::FLOAT32;
  if (have32 == want32) {
    out->set_data(tensor.TakeBytes());
    return;
  }
  const Eigen::Index n = tensor.size();
  std::string* data = out->mutable_data();
  if (want32) {
    data->resize(n * 4);
    Eigen::Map<Eigen::ArrayXf, Eigen::Unaligned>(reinterpret_cast<float*>(data->data()), n) =
        Eigen::Map<const Eigen::ArrayXd, Eigen::Unaligned>(
            reinterpret_cast<const double*>(tensor.data()), n)
            .cast<float>();
  } else {
    data->resize(n * 8);
    Eigen::Map<Eigen::ArrayXd, Eigen::Unaligned>(reinterpret_cast<double*>(data->data()), n) =
        Eigen::Map<const Eigen::ArrayXf, Eigen::Unaligned>(
            reinterpret_cast<const float*>(tensor.data()), n)
            .cast<double>();
  }
}

Eigen::MatrixXd DecodeMatrix(const natgrad::v1::Tensor& tensor) {
  auto [rows, cols] = MatrixDims(tensor, 0);
  return DecodeRange(tensor, 0, rows, cols);
}

std::vector<Eigen::MatrixXd> DecodeSlices(const natgrad::v1::Tensor& tensor) {
  std::vector<Eigen::MatrixXd> out;
  if (tensor.shape_size() == 0) return out;
  const int64_t k = tensor.shape(0);
  auto [rows, cols] = MatrixDims(tensor, 1);
  out.reserve(k);
  for (int64_t i = 0; i < k; ++i) {
    out.push_back(DecodeRange(tensor, i * rows * cols, rows, cols));
  }
  return out;
}

natgrad::v1::Tensor EncodeMatrix(const Eigen::MatrixXd& matrix,
                                 natgrad::v1::DType dtype,
                                 std::vector<int64_t> shape) {
  natgrad::v1::Tensor t;
  t.set_dtype(dtype);
  for (int64_t d : shape) t.add_shape(d);
  const RowMajor rm = matrix;
  const int64_t n = rm.size();
  std::string* data = t.mutable_data();
  if (dtype == natgrad::v1::FLOAT32) {
    data->resize(n * 4);
    for (int64_t i = 0; i < n; ++i) {
      const float v = static_cast<float>(rm.data()[i]);
      std::memcpy(data->data() + i * 4, &v, 4);
    }
  } else {
    data->resize(n * 8);
    std::memcpy(data->data(), rm.data(), n * 8);
  }
  return t;
}

natgrad::v1::Tensor EncodeMatrix(const Eigen::MatrixXd& matrix,
                                 natgrad::v1::DType dtype) {
  return EncodeMatrix(matrix, dtype, {matrix.rows(), matrix.cols()});
}

}  // namespace natgrad::wire
