// The one table of block kinds. Service and session find a kind here; adding
// a kind is one directory plus one line in registry.cc.
#ifndef NATGRAD_SERVER_BLOCKS_REGISTRY_H_
#define NATGRAD_SERVER_BLOCKS_REGISTRY_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "natgrad/v1/session.pb.h"
#include "server/blocks/block_kind.h"

namespace natgrad::blocks {

// Every registered kind, in registration order.
const std::vector<const BlockKind*>& AllKinds();

// The kind of a config, or INVALID_ARGUMENT naming `field` when unset.
absl::StatusOr<const BlockKind*> KindOf(const natgrad::v1::BlockConfig& config,
                                        const std::string& field);

// The canonical shape of a block (the kind fills in what it implies).
std::vector<int64_t> CanonicalShape(const natgrad::v1::BlockConfig& config);

// Validates a whole session config (names unique and non-empty, at least
// one block, every block valid) without allocating any block's state.
absl::Status ValidateSessionConfig(const natgrad::v1::SessionConfig& config);

// Upper bound of the state a session with this config holds (saturating).
int64_t EstimateStateBytes(const natgrad::v1::SessionConfig& config);

}  // namespace natgrad::blocks

#endif  // NATGRAD_SERVER_BLOCKS_REGISTRY_H_
