// The `ekfac` block kind: config, step and update wire formats.
#ifndef NATGRAD_SERVER_BLOCKS_EKFAC_EKFAC_KIND_H_
#define NATGRAD_SERVER_BLOCKS_EKFAC_EKFAC_KIND_H_

#include "server/blocks/block_kind.h"

namespace natgrad::blocks {

const BlockKind& EkfacKind();

}  // namespace natgrad::blocks

#endif  // NATGRAD_SERVER_BLOCKS_EKFAC_EKFAC_KIND_H_
