#include "server/service/step_assembler.h"

#include <cmath>
#include <utility>

#include "absl/strings/str_cat.h"
#include "server/blocks/registry.h"
#include "server/core/block_error.h"

namespace natgrad::service {

StepAssembler::StepAssembler(const natgrad::v1::SessionConfig& config,
                             int64_t max_step_bytes)
    : num_blocks_(config.blocks_size()), max_step_bytes_(max_step_bytes) {
  for (int i = 0; i < config.blocks_size(); ++i) {
    const natgrad::v1::BlockConfig& b = config.blocks(i);
    // The session validated its config: every block has a registered kind.
    auto kind = blocks::KindOf(b, "");
    blocks_[b.name()] = Entry{static_cast<size_t>(i), &b, kind.ok() ? *kind : nullptr};
  }
  step_.replies.resize(num_blocks_);
}

absl::Status StepAssembler::Add(natgrad::v1::StepRequest& request, absl::Time received) {
  const absl::Time start = received == absl::InfinitePast() ? absl::Now() : received;
  if (step_.first_message == absl::InfinitePast()) step_.first_message = start;
  absl::Status status = AddMessage(request);
  const absl::Time end = absl::Now();
  step_.decode_time += end - start;
  step_.decoded = end;
  return status;
}

absl::Status StepAssembler::AddMessage(natgrad::v1::StepRequest& request) {
  bytes_ += static_cast<int64_t>(request.ByteSizeLong());
  if (bytes_ > max_step_bytes_) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "step ", request.step(), ": its messages exceed ", max_step_bytes_,
        " bytes (the per-session limit)"));
  }
  if (request.step() < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("step: must be >= 1, got ", request.step()));
  }
  if (!started_) {
    started_ = true;
    step_.data.step = request.step();
  } else if (request.step() != step_.data.step) {
    return absl::InvalidArgumentError(absl::StrCat(
        "step: message for step ", request.step(), " arrived before step ",
        step_.data.step, " was marked last"));
  }
  if (request.has_reply_buffer()) step_.reply_buffer = request.reply_buffer();
  if (request.has_loss()) {
    if (!std::isfinite(request.loss())) {
      return absl::InvalidArgumentError("loss: must be finite");
    }
    step_.data.loss = request.loss();
  }
  for (natgrad::v1::BlockStep& block : *request.mutable_blocks()) {
    if (absl::Status s = AddBlock(block); !s.ok()) return s;
  }
  if (request.last()) complete_ = true;
  return absl::OkStatus();
}

absl::Status StepAssembler::AddBlock(natgrad::v1::BlockStep& b) {
  auto it = blocks_.find(b.name());
  if (it == blocks_.end() || it->second.kind == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(
        "block ", core::QuotedBlockName(b.name()), ": unknown block (not in the session)"));
  }
  const Entry& e = it->second;
  if (step_.replies[e.index].has_value()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "block ", core::QuotedBlockName(b.name()), ": sent twice in step ", step_.data.step));
  }
  blocks::ReplyFormat reply;
  absl::StatusOr<core::BlockStepInput> input = e.kind->DecodeStep(b, *e.config, &reply);
  if (!input.ok()) return input.status();
  step_.replies[e.index] = std::move(reply);
  step_.data.blocks.push_back({b.name(), *std::move(input)});
  return absl::OkStatus();
}

std::vector<session::BlockStepData> StepAssembler::TakeBlocks() {
  return std::exchange(step_.data.blocks, {});
}

AssembledStep StepAssembler::Take() {
  AssembledStep out = std::move(step_);
  step_ = AssembledStep();
  step_.replies.resize(num_blocks_);
  started_ = false;
  complete_ = false;
  bytes_ = 0;
  return out;
}

}  // namespace natgrad::service
