// A tensor as a client sent it: dtype, row-major shape and the raw
// little-endian values, owned. Blocks read it straight into their own
// precision (a float32 tensor never passes through double on its way to a
// float32 block). Pure C++: the service moves the wire bytes in, the math
// reads them out.
#ifndef NATGRAD_SERVER_CORE_DENSE_TENSOR_H_
#define NATGRAD_SERVER_CORE_DENSE_TENSOR_H_

#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "Eigen/Core"

namespace natgrad::core {

enum class DType { kFloat32, kFloat64 };

class DenseTensor {
 public:
  template <typename Scalar>
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;
  template <typename Scalar>
  using RowMajorMap = Eigen::Map<
      const Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>;

  DenseTensor() = default;
  // A float64 [rows, cols] tensor holding m (tests and in-process callers).
  template <typename Derived>
  DenseTensor(const Eigen::MatrixBase<Derived>& m) {  // NOLINT: implicit by design
    SetFromMatrix(Eigen::MatrixXd(m.template cast<double>()));
  }

  // `bytes` must hold prod(shape) values of `dtype` (the service checks).
  static DenseTensor FromBytes(DType dtype, std::vector<int64_t> shape,
                               std::string bytes) {
    DenseTensor t;
    t.dtype_ = dtype;
    t.shape_ = std::move(shape);
    t.bytes_ = std::move(bytes);
    return t;
  }
  // The same for bytes whose every value the caller has just found finite
  // (wire::TakeTensor, which scans each received tensor once): AllFinite()
  // then answers without scanning them a second time.
  static DenseTensor FromCheckedBytes(DType dtype, std::vector<int64_t> shape,
                                      std::string bytes) {
    DenseTensor t = FromBytes(dtype, std::move(shape), std::move(bytes));
    t.known_finite_ = true;
    return t;
  }

  // A [rows, cols] tensor of m's own scalar type (float or double), written
  // row-major in one pass: a block's result goes to the wire bytes without a
  // detour through double (the encoder moves the bytes into the reply).
  template <typename Derived>
  static DenseTensor FromMatrix(const Eigen::MatrixBase<Derived>& m) {
    using Scalar = typename Derived::Scalar;
    static_assert(std::is_same_v<Scalar, float> || std::is_same_v<Scalar, double>);
    DenseTensor t = Zeros<Scalar>({m.rows(), m.cols()});
    Eigen::Map<Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>(
        t.MutableData<Scalar>(), m.rows(), m.cols()) = m;
    return t;
  }

  // A zero-filled tensor of `shape` whose values the caller writes through
  // MutableData<Scalar>() (row-major).
  template <typename Scalar>
  static DenseTensor Zeros(std::vector<int64_t> shape) {
    DenseTensor t;
    t.dtype_ = sizeof(Scalar) == 4 ? DType::kFloat32 : DType::kFloat64;
    t.shape_ = std::move(shape);
    int64_t n = 1;
    for (int64_t d : t.shape_) n *= d;
    t.bytes_.assign(static_cast<size_t>(n) * sizeof(Scalar), '\0');
    return t;
  }
  template <typename Scalar>
  Scalar* MutableData() {
    known_finite_ = false;  // the caller may write anything
    return reinterpret_cast<Scalar*>(bytes_.data());
  }
  // The raw little-endian values.
  const std::string& bytes() const { return bytes_; }
  // Moves the values out (the encoder hands them to the wire message); the
  // tensor is left empty.
  std::string TakeBytes() {
    std::string out = std::move(bytes_);
    bytes_.clear();
    shape_.clear();
    known_finite_ = false;
    return out;
  }

  DType dtype() const { return dtype_; }
  const std::vector<int64_t>& shape() const { return shape_; }
  // The block's matrix view: [shape[0], prod(rest)]; a rank-1 tensor of n
  // values is n x 1, a scalar 1 x 1.
  int64_t rows() const { return shape_.empty() ? 1 : shape_[0]; }
  int64_t cols() const;
  int64_t size() const { return static_cast<int64_t>(bytes_.size() / element_size()); }
  bool empty() const { return bytes_.empty(); }
  size_t element_size() const { return dtype_ == DType::kFloat32 ? 4 : 8; }
  const char* data() const { return bytes_.data(); }

  // The values as the rows x cols matrix, column-major, in Scalar: one pass
  // from the stored dtype (a transpose-copy; no intermediate double).
  template <typename Scalar>
  Matrix<Scalar> ToMatrix() const {
    return dtype_ == DType::kFloat32 ? Convert<float, Scalar>()
                                     : Convert<double, Scalar>();
  }

  // Zero-copy row-major view; Scalar must be the stored dtype.
  template <typename Scalar>
  RowMajorMap<Scalar> View() const {
    return RowMajorMap<Scalar>(reinterpret_cast<const Scalar*>(bytes_.data()),
                               rows(), cols());
  }

  // Whether every value is finite: one pass over the stored values, or none
  // for a tensor made by FromCheckedBytes.
  bool AllFinite() const { return known_finite_ || ScanFinite(); }
  // Whether AllFinite() is already known true without a scan.
  bool known_finite() const { return known_finite_; }

 private:
  void SetFromMatrix(const Eigen::MatrixXd& m);
  bool ScanFinite() const;

  template <typename From, typename To>
  Matrix<To> Convert() const {
    // memcpy-free read: the bytes may be unaligned, so map them unaligned.
    Eigen::Map<const Eigen::Matrix<From, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>,
               Eigen::Unaligned>
        src(reinterpret_cast<const From*>(bytes_.data()), rows(), cols());
    return src.template cast<To>();
  }

  DType dtype_ = DType::kFloat64;
  std::vector<int64_t> shape_;
  std::string bytes_;
  bool known_finite_ = false;
};

}  // namespace natgrad::core

#endif  // NATGRAD_SERVER_CORE_DENSE_TENSOR_H_
