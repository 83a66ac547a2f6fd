#include "server/service/step_reply.h"

#include <algorithm>

#include "server/blocks/registry.h"

namespace natgrad::service {

std::shared_ptr<const ProtoReply> EncodeStepReply(session::StepResult& result,
                                                  const AssembledStep& step,
                                                  const natgrad::v1::SessionConfig& config,
                                                  const std::string& session_name,
                                                  int64_t durable_step) {
  const absl::Time start = absl::Now();
  auto reply = std::make_shared<ProtoReply>();
  natgrad::v1::StepResponse& r = reply->response;
  r.set_session(session_name);
  r.set_step(result.step);
  r.set_durable_step(durable_step);
  r.set_kl_clip_scale(result.kl_clip_scale);
  if (result.damping.has_value()) r.set_damping(*result.damping);
  for (session::BlockResult& b : result.blocks) {
    natgrad::v1::BlockUpdate* u = r.add_updates();
    u->set_name(b.name);
    const natgrad::v1::BlockConfig& bc = config.blocks(static_cast<int>(b.index));
    auto kind = blocks::KindOf(bc, "");
    if (kind.ok() && step.replies[b.index].has_value()) {
      (*kind)->EncodeUpdate(b.output, *step.replies[b.index], u);
    }
  }
  natgrad::v1::StepTiming* timing = r.mutable_timing();
  timing->set_compute_micros(result.compute_micros);
  timing->set_inversion_micros(result.inversion_micros);
  timing->set_decode_micros(absl::ToInt64Microseconds(step.decode_time));
  if (step.decoded != absl::InfinitePast() && step.started != absl::InfinitePast()) {
    timing->set_queue_micros(
        std::max<int64_t>(0, absl::ToInt64Microseconds(step.started - step.decoded)));
  }
  const absl::Time now = absl::Now();
  timing->set_encode_micros(absl::ToInt64Microseconds(now - start));
  if (step.first_message != absl::InfinitePast()) {
    timing->set_server_micros(absl::ToInt64Microseconds(now - step.first_message));
  }
  return reply;
}

absl::StatusOr<std::shared_ptr<const natgrad::v1::StepResponse>> ResponseFor(
    const session::StepOutcome& outcome, int64_t durable_step) {
  const auto* proto = dynamic_cast<const ProtoReply*>(outcome.reply.get());
  if (!outcome.replayed && proto != nullptr) {
    // Shares the cached reply: no copy of the deltas.
    return std::shared_ptr<const natgrad::v1::StepResponse>(outcome.reply, &proto->response);
  }
  auto replay = std::make_shared<natgrad::v1::StepResponse>();
  if (proto != nullptr) {
    *replay = proto->response;
  } else if (outcome.reply == nullptr || !replay->ParseFromString(outcome.reply->Serialized())) {
    return absl::InternalError("the cached reply of the last step does not parse");
  }
  replay->set_replayed(outcome.replayed);
  replay->set_durable_step(durable_step);
  return replay;
}

bool IsStepResponse(const std::string& bytes) {
  natgrad::v1::StepResponse r;
  return r.ParseFromString(bytes);
}

}  // namespace natgrad::service
