// natgrad.v1.Tensor <-> Eigen. Wire tensors are row-major little-endian
// (docs/architecture.md); Eigen matrices are column-major, so every copy transposes
// through a row-major map.
#ifndef NATGRAD_SERVER_WIRE_TENSOR_CODEC_H_
#define NATGRAD_SERVER_WIRE_TENSOR_CODEC_H_

#include <cstdint>
#include <string>
#include <vector>

#include "Eigen/Core"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "natgrad/v1/tensor.pb.h"
#include "server/core/dense_tensor.h"

namespace natgrad::wire {

int64_t NumElements(const natgrad::v1::Tensor& tensor);

// Checks dtype, non-negative shape, byte length and finiteness. `field` names
// the tensor in error messages ("blocks[0].gradient").
absl::Status ValidateTensor(const natgrad::v1::Tensor& tensor,
                            absl::string_view field);
// The same without finiteness.
absl::Status ValidateTensorLayout(const natgrad::v1::Tensor& tensor,
                                  absl::string_view field);

// Validates `tensor` and moves its values into a core tensor (the wire
// message keeps an empty payload): no conversion, no copy of the values. The
// core tensor is marked finite (DenseTensor::FromCheckedBytes), so this is
// the only finiteness scan the step path makes of it.
absl::StatusOr<core::DenseTensor> TakeTensor(natgrad::v1::Tensor* tensor,
                                             absl::string_view field);
// The same without the finiteness scan, for a tensor whose block finds
// non-finite values as a side effect of its first pass over them (raw K-FAC
// statistics: a Gram's diagonal is non-finite exactly when its column holds a
// non-finite value). The core tensor is not marked finite, so any
// DenseTensor::AllFinite() on it still scans: reading it unchecked is never
// silent.
absl::StatusOr<core::DenseTensor> TakeTensorUnscanned(natgrad::v1::Tensor* tensor,
                                                      absl::string_view field);

// Decodes as a rows x cols matrix: rank 0 is 1x1, rank 1 is n x 1, rank 2 is
// itself, higher ranks are [shape[0], prod(rest)]. Call ValidateTensor first.
Eigen::MatrixXd DecodeMatrix(const natgrad::v1::Tensor& tensor);

// Decodes a [k, ...] tensor into k slices decoded as above from the rest of
// the shape (a Gaussian block's copies).
std::vector<Eigen::MatrixXd> DecodeSlices(const natgrad::v1::Tensor& tensor);

// Writes `tensor`'s values into `out` as `dtype` with the wire shape `shape`
// (same count, row-major): the bytes are moved when the dtypes agree, else
// converted in one pass (float64 -> float32 rounds as static_cast does;
// float32 -> float64 is exact).
void EncodeTensor(core::DenseTensor tensor, natgrad::v1::DType dtype,
                  const std::vector<int64_t>& shape, natgrad::v1::Tensor* out);

// Encodes a matrix with the given wire shape (row-major order of values).
natgrad::v1::Tensor EncodeMatrix(const Eigen::MatrixXd& matrix,
                                 natgrad::v1::DType dtype,
                                 std::vector<int64_t> shape);
// Shape [rows, cols].
natgrad::v1::Tensor EncodeMatrix(const Eigen::MatrixXd& matrix,
                                 natgrad::v1::DType dtype);

// Checkpoints store state exactly: float64 always.
inline natgrad::v1::Tensor EncodeExact(const Eigen::MatrixXd& matrix) {
  return EncodeMatrix(matrix, natgrad::v1::FLOAT64);
}

}  // namespace natgrad::wire

#endif  // NATGRAD_SERVER_WIRE_TENSOR_CODEC_H_
