#include "server/core/dense_tensor.h"

#include <cmath>

namespace natgrad::core {
namespace {

// x * 0 is 0 for finite x and NaN for NaN or +-Inf, so the (vectorised) sum
// is NaN iff a value is not finite; a per-value isfinite loop with a branch
// does not vectorise. The values may be unaligned in a wire buffer.
template <typename T>
bool AllFiniteValues(const char* data, size_t n) {
  if (n == 0) return true;
  const Eigen::Map<const Eigen::Array<T, Eigen::Dynamic, 1>, Eigen::Unaligned> v(
      reinterpret_cast<const T*>(data), static_cast<Eigen::Index>(n));
  return !std::isnan((v * T(0)).sum());
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

bool DenseTensor::ScanFinite() const {
  const size_t n = static_cast<size_t>(size());
  return dtype_ == DType::kFloat32 ? AllFiniteValues<float>(bytes_.data(), n)
                                   : AllFiniteValues<double>(bytes_.data(), n);
}

}  // namespace natgrad::core
