// A block kind as the service and session see it: everything that turns a
// kind's wire messages into its core block and back. One implementation per
// directory under server/blocks/, registered once in registry.cc; the math
// lives in the kind's core library and never sees protobuf.
#ifndef NATGRAD_SERVER_BLOCKS_BLOCK_KIND_H_
#define NATGRAD_SERVER_BLOCKS_BLOCK_KIND_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "natgrad/v1/blocks.pb.h"
#include "natgrad/v1/step.pb.h"
#include "natgrad/v1/tensor.pb.h"
#include "server/core/block.h"

namespace natgrad::blocks {

// How a block's update goes back on the wire: in the dtype and shapes the
// client sent (the kind decides which shapes it records).
struct ReplyFormat {
  natgrad::v1::DType dtype = natgrad::v1::FLOAT32;
  std::vector<std::vector<int64_t>> shapes;
};

class BlockKind {
 public:
  virtual ~BlockKind() = default;

  // The BlockConfig oneof field name; also the metrics label.
  virtual absl::string_view name() const = 0;
  virtual natgrad::v1::BlockConfig::KindCase config_case() const = 0;

  // The parameter shape the block holds: the config's, or the one the kind
  // implies when the config leaves it empty.
  virtual std::vector<int64_t> CanonicalShape(const natgrad::v1::BlockConfig& config) const {
    return {config.shape().begin(), config.shape().end()};
  }

  // Checks every field of the config without allocating the block's state
  // (INVALID_ARGUMENT naming `field`, e.g. "config.blocks[2]").
  virtual absl::Status Validate(const natgrad::v1::BlockConfig& config,
                                natgrad::v1::DType state_dtype,
                                const std::string& field) const = 0;

  // Upper bound of the state bytes the block will hold; saturates at
  // INT64_MAX instead of overflowing, so limits stay meaningful.
  virtual int64_t EstimateStateBytes(const natgrad::v1::BlockConfig& config,
                                     natgrad::v1::DType state_dtype) const = 0;

  virtual absl::StatusOr<std::unique_ptr<core::ParameterBlock>> NewBlock(
      const natgrad::v1::BlockConfig& config, natgrad::v1::DType state_dtype,
      const std::string& field) const = 0;

  // The kind's part of a step, decoded (tensors moved out of `step`) and
  // checked at the wire level; the block checks the rest.
  virtual absl::StatusOr<core::BlockStepInput> DecodeStep(
      natgrad::v1::BlockStep& step, const natgrad::v1::BlockConfig& config,
      ReplyFormat* reply) const = 0;

  // Writes the block's output into `update` (name already set), moving its
  // tensors' bytes into the message where the dtypes allow (`output` is
  // spent afterwards).
  virtual void EncodeUpdate(core::BlockStepOutput& output,
                            const ReplyFormat& reply,
                            natgrad::v1::BlockUpdate* update) const = 0;

  // For blocks with a curvature model that session-wide Levenberg-Marquardt
  // damping can drive: the damping they start from (step 1 of their
  // schedule). Empty for every other kind.
  virtual std::optional<double> InitialDamping(const natgrad::v1::BlockConfig&) const {
    return std::nullopt;
  }

  // The tensor names the block's snapshot may hold (docs and checks).
  virtual std::vector<std::string> SnapshotTensorNames() const = 0;
};

}  // namespace natgrad::blocks

#endif  // NATGRAD_SERVER_BLOCKS_BLOCK_KIND_H_
