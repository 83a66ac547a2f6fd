// Building and reading natgrad.v1.Tensor from plain arrays (row-major,
// little-endian), for C++ clients.
#ifndef NATGRAD_CLIENT_CPP_TENSOR_H_
#define NATGRAD_CLIENT_CPP_TENSOR_H_

#include <cstdint>
#include <cstring>
#include <vector>

#include "natgrad/v1/tensor.pb.h"

namespace natgrad::client {

template <typename T>
natgrad::v1::Tensor MakeTensor(const T* data, std::vector<int64_t> shape) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>);
  natgrad::v1::Tensor t;
  t.set_dtype(std::is_same_v<T, float> ? natgrad::v1::FLOAT32 : natgrad::v1::FLOAT64);
  int64_t n = 1;
  for (int64_t d : shape) {
    t.add_shape(d);
    n *= d;
  }
  t.set_data(reinterpret_cast<const char*>(data), n * sizeof(T));
  return t;
}

template <typename T>
natgrad::v1::Tensor MakeTensor(const std::vector<T>& data, std::vector<int64_t> shape) {
  return MakeTensor(data.data(), std::move(shape));
}

// Values as double whatever the wire dtype.
inline std::vector<double> TensorValues(const natgrad::v1::Tensor& t) {
  const size_t es = t.dtype() == natgrad::v1::FLOAT64 ? 8 : 4;
  const size_t n = t.data().size() / es;
  std::vector<double> out(n);
  for (size_t i = 0; i < n; ++i) {
    if (es == 8) {
      std::memcpy(&out[i], t.data().data() + 8 * i, 8);
    } else {
      float f;
      std::memcpy(&f, t.data().data() + 4 * i, 4);
      out[i] = f;
    }
  }
  return out;
}

}  // namespace natgrad::client

#endif  // NATGRAD_CLIENT_CPP_TENSOR_H_
