// The scalar state of a block whose step size γ may be halved by a
// safeguard (the Gaussian kinds): steps taken, the γ the last step used, and
// how many halvings that took. Exported in snapshots as three scalars.
#ifndef NATGRAD_SERVER_CORE_STEP_SIZE_RECORD_H_
#define NATGRAD_SERVER_CORE_STEP_SIZE_RECORD_H_

#include <cmath>
#include <cstdint>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "server/core/block.h"
#include "server/core/block_error.h"

namespace natgrad::core {

struct StepSizeRecord {
  int64_t steps = 0;
  double gamma_used = 0;
  int halvings = 0;

  void ExportTo(BlockState& state) const {
    state.scalars["steps"] = static_cast<double>(steps);
    state.scalars["gamma_used"] = gamma_used;
    state.scalars["halvings"] = halvings;
  }

  // A block's whole state when it keeps no tensors: refuses tensors,
  // unknown scalars and out-of-range values, naming the block.
  static absl::StatusOr<StepSizeRecord> Import(const BlockState& state, absl::string_view block,
                                               int max_halvings) {
    if (!state.tensors.empty()) {
      return InvalidBlockField(block, "state",
                               absl::StrCat("has tensor \"", state.tensors.begin()->first,
                                            "\"; this block keeps none"));
    }
    double steps = 0, gamma_used = 0, halvings = 0;
    for (const auto& [key, value] : state.scalars) {
      if (key == "steps") {
        steps = value;
      } else if (key == "gamma_used") {
        gamma_used = value;
      } else if (key == "halvings") {
        halvings = value;
      } else {
        return InvalidBlockField(block, "state", absl::StrCat("has unknown scalar \"", key, "\""));
      }
    }
    const auto is_count = [](double x, double max) {
      return std::isfinite(x) && x >= 0 && x <= max && x == std::floor(x);
    };
    if (!is_count(steps, 9.0e15)) {
      return InvalidBlockField(block, "state scalar steps",
                               absl::StrCat("is ", steps, ", not a non-negative integer"));
    }
    if (!std::isfinite(gamma_used) || gamma_used < 0) {
      return InvalidBlockField(block, "state scalar gamma_used",
                               absl::StrCat("is ", gamma_used, ", not finite and >= 0"));
    }
    if (!is_count(halvings, max_halvings)) {
      return InvalidBlockField(block, "state scalar halvings",
                               absl::StrCat("is ", halvings, ", not an integer in [0, ",
                                            max_halvings, "]"));
    }
    return StepSizeRecord{static_cast<int64_t>(steps), gamma_used, static_cast<int>(halvings)};
  }
};

}  // namespace natgrad::core

#endif  // NATGRAD_SERVER_CORE_STEP_SIZE_RECORD_H_
