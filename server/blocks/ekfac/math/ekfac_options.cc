#include "server/blocks/ekfac/math/ekfac_options.h"

#include <algorithm>
#include <limits>
#include <memory>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace natgrad::core {
namespace {

int64_t Add(int64_t a, int64_t b) {
  return a > std::numeric_limits<int64_t>::max() - b
             ? std::numeric_limits<int64_t>::max()
             : a + b;
}

int64_t Mul(int64_t a, int64_t b) {
  if (a <= 0 || b <= 0) return 0;
  return a > std::numeric_limits<int64_t>::max() / b
             ? std::numeric_limits<int64_t>::max()
             : a * b;
}

}  // namespace

absl::StatusOr<EkfacOptions> NormalizeEkfacOptions(absl::string_view block_name,
                                                   const EkfacOptions& options) {
  EkfacOptions o = options;
  if (absl::Status s = NormalizeKfacLayerOptions("ekfac", block_name, o); !s.ok()) return s;
  return o;
}

int64_t EkfacStateBytes(const EkfacOptions& options, Precision precision) {
  const int64_t a = Add(std::max<int64_t>(options.d_in, 0), options.has_bias ? 1 : 0);
  const int64_t g = std::max<int64_t>(options.d_out, 0);
  const int64_t scalar = precision == Precision::kFloat32 ? 4 : 8;
  // A, G and their eigenvectors (2 a^2 + 2 g^2), scaling and momentum (2 g a).
  const int64_t squares = Add(Mul(a, a), Mul(g, g));
  return Mul(scalar, Add(Mul(2, squares), Mul(2, Mul(g, a))));
}

}  // namespace natgrad::core
