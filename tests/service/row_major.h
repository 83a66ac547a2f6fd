// Row-major conversions between a tensor's flat values (the wire's order) and
// Eigen matrices, for tests that compare the service with core blocks called
// in-process.
#ifndef NATGRAD_TESTS_SERVICE_ROW_MAJOR_H_
#define NATGRAD_TESTS_SERVICE_ROW_MAJOR_H_

#include <cstdint>
#include <vector>

#include "Eigen/Core"

namespace natgrad::testing {

inline Eigen::MatrixXd RowMajorMatrix(const std::vector<double>& v, int64_t rows,
                                      int64_t cols) {
  Eigen::MatrixXd m(rows, cols);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) m(i, j) = v[i * cols + j];
  return m;
}

inline std::vector<double> RowMajorValues(const Eigen::MatrixXd& m) {
  std::vector<double> v;
  v.reserve(m.size());
  for (int64_t i = 0; i < m.rows(); ++i)
    for (int64_t j = 0; j < m.cols(); ++j) v.push_back(m(i, j));
  return v;
}

}  // namespace natgrad::testing

#endif  // NATGRAD_TESTS_SERVICE_ROW_MAJOR_H_
