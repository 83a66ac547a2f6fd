// Building and reading natgrad.v1.Tensor from plain arrays (row-major,
// little-endian), for C++ clients.
//
// MakeTensor(pointer or vector) copies the values once, into the tensor's
// bytes; that copy is the last one on the way to the socket (SessionStream
// sends the tensor's bytes without copying them again). To skip it too,
// produce the values in place (InitTensor) or hand over a std::string that
// already holds them (MakeTensor(std::string&&, ...)).
#ifndef NATGRAD_CLIENT_CPP_TENSOR_H_
#define NATGRAD_CLIENT_CPP_TENSOR_H_

#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>
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

// A tensor of `dtype` and `shape` that takes `bytes` (the values, row-major,
// little-endian) without copying them. The server checks that the byte count
// matches the shape.
inline natgrad::v1::Tensor MakeTensor(std::string&& bytes, std::vector<int64_t> shape,
                                      natgrad::v1::DType dtype) {
  natgrad::v1::Tensor t;
  t.set_dtype(dtype);
  for (int64_t d : shape) t.add_shape(d);
  t.set_data(std::move(bytes));
  return t;
}

// Makes `*t` a T tensor of `shape` and returns where its values go (valid
// until `*t` changes or is moved from): fill them in place, no staging array.
// The values start zeroed.
template <typename T>
T* InitTensor(natgrad::v1::Tensor* t, const std::vector<int64_t>& shape) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>);
  t->Clear();
  t->set_dtype(std::is_same_v<T, float> ? natgrad::v1::FLOAT32 : natgrad::v1::FLOAT64);
  int64_t n = 1;
  for (int64_t d : shape) {
    t->add_shape(d);
    n *= d;
  }
  std::string* data = t->mutable_data();
  data->resize(static_cast<size_t>(n) * sizeof(T));
  // std::string storage is malloc'd (or inline in the string object), so it
  // is aligned for float and double.
  return reinterpret_cast<T*>(data->data());
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
