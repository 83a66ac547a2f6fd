#include "server/core/dense_tensor.h"

#include <cmath>

namespace natgrad::core {
namespace {

template <typename T>
bool AllFiniteValues(const char* data, size_t n) {
  // Values may be unaligned in the wire buffer: copy each one out.
  for (size_t i = 0; i < n; ++i) {
    T v;
    std::memcpy(&v, data + i * sizeof(T), sizeof(T));
    if (!std::isfinite(v)) return false;
  }
  return true;
}

}  // namespace

void DenseTensor::SetFromMatrix(const Eigen::MatrixXd& m) {
  dtype_ = DType::kFloat64;
  shape_ = {m.rows(), m.cols()};
  bytes_.resize(static_cast<size_t>(m.size()) * sizeof(double));
  Eigen::Map<Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>,
             Eigen::Unaligned>
      dst(reinterpret_cast<double*>(bytes_.data()), m.rows(), m.cols());
  dst = m;
}

int64_t DenseTensor::cols() const {
  int64_t c = 1;
  for (size_t i = 1; i < shape_.size(); ++i) c *= shape_[i];
  return c;
}

bool DenseTensor::AllFinite() const {
  const size_t n = static_cast<size_t>(size());
  return dtype_ == DType::kFloat32 ? AllFiniteValues<float>(bytes_.data(), n)
                                   : AllFiniteValues<double>(bytes_.data(), n);
}

}  // namespace natgrad::core
