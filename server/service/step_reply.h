// The service's half of a step's reply: core results -> StepResponse, cached
// by the session as an opaque reply, and the replay of a cached one.
#ifndef NATGRAD_SERVER_SERVICE_STEP_REPLY_H_
#define NATGRAD_SERVER_SERVICE_STEP_REPLY_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "natgrad/v1/session.pb.h"
#include "natgrad/v1/step.pb.h"
#include "server/service/step_assembler.h"
#include "server/session/session.h"

namespace natgrad::service {

// A reply the service encoded; the session caches it without looking inside.
class ProtoReply final : public session::CachedReply {
 public:
  natgrad::v1::StepResponse response;
  std::string Serialized() const override { return response.SerializeAsString(); }
};

// Encodes an applied step in the dtypes and shapes its blocks were sent in,
// moving the blocks' output bytes into the reply (`result` is spent).
// `durable_step` is what the reply reports as StepResponse.durable_step.
std::shared_ptr<const ProtoReply> EncodeStepReply(session::StepResult& result,
                                                  const AssembledStep& step,
                                                  const natgrad::v1::SessionConfig& config,
                                                  const std::string& session_name,
                                                  int64_t durable_step);

// The response to send for `reply`: the encoded one itself for a new step; a
// copy marked replayed for a retried one (parsed from bytes when it came
// from a snapshot), reporting `durable_step` now rather than the value cached
// with it. INTERNAL when cached bytes do not parse.
absl::StatusOr<std::shared_ptr<const natgrad::v1::StepResponse>> ResponseFor(
    const session::StepOutcome& outcome, int64_t durable_step);

// Whether bytes from a snapshot are a StepResponse (checked before import).
bool IsStepResponse(const std::string& bytes);

}  // namespace natgrad::service

#endif  // NATGRAD_SERVER_SERVICE_STEP_REPLY_H_
