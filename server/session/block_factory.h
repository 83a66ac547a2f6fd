// natgrad.v1.BlockConfig -> core::ParameterBlock, with every config field
// validated (INVALID_ARGUMENT naming config.blocks[i].<field>).
#ifndef NATGRAD_SERVER_SESSION_BLOCK_FACTORY_H_
#define NATGRAD_SERVER_SESSION_BLOCK_FACTORY_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "natgrad/v1/session.pb.h"
#include "server/core/block.h"

namespace natgrad::session {

absl::StatusOr<std::unique_ptr<core::ParameterBlock>> NewBlock(
    const natgrad::v1::BlockConfig& config, natgrad::v1::DType state_dtype,
    const std::string& field);

// Validates a whole session config (names unique and non-empty, at least one
// block, every block buildable) without keeping the blocks.
absl::Status ValidateSessionConfig(const natgrad::v1::SessionConfig& config);

// Upper bound of the optimizer state a session with this config will hold,
// known before any step so limits are enforced at CreateSession.
int64_t EstimateStateBytes(const natgrad::v1::SessionConfig& config);

// The canonical parameter shape of a block (fills in the shape K-FAC and
// Gaussian blocks imply when the client left it empty).
std::vector<int64_t> CanonicalShape(const natgrad::v1::BlockConfig& config);

}  // namespace natgrad::session

#endif  // NATGRAD_SERVER_SESSION_BLOCK_FACTORY_H_
