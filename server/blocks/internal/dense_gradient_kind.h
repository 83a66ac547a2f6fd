// The wire behaviour every kind that takes a plain dense gradient shares
// (sgd, adam, shampoo): the step is gradient + optional params + optional
// learning_rate, the update is a delta in the gradient's dtype and shape.
// Such a kind derives from this and supplies only config, factory and state.
#ifndef NATGRAD_SERVER_BLOCKS_INTERNAL_DENSE_GRADIENT_KIND_H_
#define NATGRAD_SERVER_BLOCKS_INTERNAL_DENSE_GRADIENT_KIND_H_

#include <utility>

#include "server/blocks/block_kind.h"
#include "server/blocks/internal/dense_codec.h"

namespace natgrad::blocks::internal {

class DenseGradientKind : public BlockKind {
 public:
  absl::StatusOr<core::BlockStepInput> DecodeStep(natgrad::v1::BlockStep& step,
                                                  const natgrad::v1::BlockConfig&,
                                                  ReplyFormat* reply) const override {
    if (absl::Status s = RefuseParts(step, name(), false); !s.ok()) return s;
    absl::StatusOr<core::DenseStepInput> in = DecodeDenseStep(step, reply);
    if (!in.ok()) return in.status();
    return core::BlockStepInput(*std::move(in));
  }

  void EncodeUpdate(core::BlockStepOutput& output, const ReplyFormat& reply,
                    natgrad::v1::BlockUpdate* update) const override {
    EncodeDelta(output, reply, update);
  }
};

}  // namespace natgrad::blocks::internal

#endif  // NATGRAD_SERVER_BLOCKS_INTERNAL_DENSE_GRADIENT_KIND_H_
