// The `gaussian_diag` block kind: config, step and update wire formats.
#ifndef NATGRAD_SERVER_BLOCKS_GAUSSIAN_DIAG_GAUSSIAN_DIAG_KIND_H_
#define NATGRAD_SERVER_BLOCKS_GAUSSIAN_DIAG_GAUSSIAN_DIAG_KIND_H_

#include "server/blocks/block_kind.h"

namespace natgrad::blocks {

const BlockKind& GaussianDiagKind();

}  // namespace natgrad::blocks

#endif  // NATGRAD_SERVER_BLOCKS_GAUSSIAN_DIAG_GAUSSIAN_DIAG_KIND_H_
