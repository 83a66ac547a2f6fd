// The `soap` block kind: config, step and update wire formats.
#ifndef NATGRAD_SERVER_BLOCKS_SOAP_SOAP_KIND_H_
#define NATGRAD_SERVER_BLOCKS_SOAP_SOAP_KIND_H_

#include "server/blocks/block_kind.h"

namespace natgrad::blocks {

const BlockKind& SoapKind();

}  // namespace natgrad::blocks

#endif  // NATGRAD_SERVER_BLOCKS_SOAP_SOAP_KIND_H_
