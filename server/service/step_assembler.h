// Collects the messages of one step (a step may span several messages, the
// last one marked) and decodes each block's part through its kind
// (server/blocks), moving tensor payloads out of the request instead of
// copying them. What the session needs goes into session::StepData; how to
// answer each block stays here, with the service.
#ifndef NATGRAD_SERVER_SERVICE_STEP_ASSEMBLER_H_
#define NATGRAD_SERVER_SERVICE_STEP_ASSEMBLER_H_

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "natgrad/v1/session.pb.h"
#include "natgrad/v1/step.pb.h"
#include "server/blocks/block_kind.h"
#include "server/session/session.h"

namespace natgrad::service {

struct AssembledStep {
  session::StepData data;
  // By config index: how to encode the block's update (absent: not sent).
  std::vector<std::optional<blocks::ReplyFormat>> replies;
  // The read completion of the step's first message (StepTiming.server_micros).
  absl::Time first_message = absl::InfinitePast();
  // Time spent parsing and decoding its messages (StepTiming.decode_micros).
  absl::Duration decode_time;
  // When its last message was decoded, and when a worker started it
  // (StepTiming.queue_micros; the reactor sets `started`).
  absl::Time decoded = absl::InfinitePast();
  absl::Time started = absl::InfinitePast();
  // StepRequest.reply_buffer of the step's messages (the last one set).
  std::optional<natgrad::v1::SharedMemorySpan> reply_buffer;
};

class StepAssembler {
 public:
  // `config` must outlive the assembler. `max_step_bytes` bounds the bytes
  // of one step's messages (RESOURCE_EXHAUSTED beyond).
  StepAssembler(const natgrad::v1::SessionConfig& config, int64_t max_step_bytes);

  // Adds one message of the current step, taking its tensors. On error the
  // partial step is dropped (the stream ends), and nothing reached the session.
  // `received`: the read completion of the message, before it was parsed
  // (its decode time counts from there); unset means now.
  absl::Status Add(natgrad::v1::StepRequest& request,
                   absl::Time received = absl::InfinitePast());

  bool complete() const { return complete_; }
  // Moves out the blocks decoded so far (after a message before the last),
  // for the session to propose while the rest of the step arrives; Take()
  // then holds only the blocks added since. A block taken still counts
  // for "sent twice".
  std::vector<session::BlockStepData> TakeBlocks();
  // The completed step; resets the assembler for the next one.
  AssembledStep Take();

 private:
  struct Entry {
    size_t index;
    const natgrad::v1::BlockConfig* config;
    const blocks::BlockKind* kind;
  };

  absl::Status AddMessage(natgrad::v1::StepRequest& request);
  absl::Status AddBlock(natgrad::v1::BlockStep& block);

  std::map<std::string, Entry> blocks_;
  const size_t num_blocks_;
  const int64_t max_step_bytes_;
  int64_t bytes_ = 0;
  bool started_ = false;
  bool complete_ = false;
  AssembledStep step_;
};

}  // namespace natgrad::service

#endif  // NATGRAD_SERVER_SERVICE_STEP_ASSEMBLER_H_
