// Collects the messages of one step (a step may span several messages, the
// last one marked) and decodes them into session::StepData, validating every
// wire-level field: tensors, names, which statistics a block kind takes.
#ifndef NATGRAD_SERVER_SERVICE_STEP_ASSEMBLER_H_
#define NATGRAD_SERVER_SERVICE_STEP_ASSEMBLER_H_

#include <cstdint>
#include <map>
#include <optional>
#include <string>

#include "absl/status/status.h"
#include "natgrad/v1/session.pb.h"
#include "natgrad/v1/step.pb.h"
#include "server/session/session.h"

namespace natgrad::service {

class StepAssembler {
 public:
  // `config` must outlive the assembler. `max_step_bytes` bounds the bytes
  // of one step's messages (RESOURCE_EXHAUSTED beyond).
  StepAssembler(const natgrad::v1::SessionConfig& config, int64_t max_step_bytes);

  // Adds one message of the current step. On error the partial step is
  // dropped (the stream ends), and nothing reached the session.
  absl::Status Add(const natgrad::v1::StepRequest& request);

  bool complete() const { return complete_; }
  // The completed step; resets the assembler for the next one.
  session::StepData Take();

 private:
  absl::Status AddBlock(const natgrad::v1::BlockStep& block);

  std::map<std::string, const natgrad::v1::BlockConfig*> kinds_;
  const int64_t max_step_bytes_;
  int64_t bytes_ = 0;
  bool started_ = false;
  bool complete_ = false;
  session::StepData data_;
};

}  // namespace natgrad::service

#endif  // NATGRAD_SERVER_SERVICE_STEP_ASSEMBLER_H_
