// natgrad's one error-message convention for anything a block refuses:
//   block "NAME": FIELD WHAT        e.g.  block "fc1": gradient has shape [2, 3], want [3, 4]
// FIELD is the path inside the block's part of the step or config
// (`kfac.raw.activations`, `learning_rate`, `state tensor "a_ema"`); WHAT is
// a predicate. Session-wide errors name their field the same way without the
// block prefix (`step 3 is out of order: ...`).
#ifndef NATGRAD_SERVER_CORE_BLOCK_ERROR_H_
#define NATGRAD_SERVER_CORE_BLOCK_ERROR_H_

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace natgrad::core {

// Client strings (block names) are cut to this many characters in messages.
inline constexpr size_t kMaxNameInMessage = 64;

inline std::string QuotedBlockName(absl::string_view block) {
  if (block.size() <= kMaxNameInMessage) return absl::StrCat("\"", block, "\"");
  return absl::StrCat("\"", block.substr(0, kMaxNameInMessage), "...\"");
}

// Any other client string echoed in a message (session names, ids): the
// same cap, so an error never carries a client's megabytes back (or into
// the log).
inline std::string QuotedClientString(absl::string_view s) { return QuotedBlockName(s); }

inline absl::Status BlockError(absl::StatusCode code, absl::string_view block,
                               absl::string_view field, absl::string_view what) {
  return absl::Status(code, absl::StrCat("block ", QuotedBlockName(block), ": ",
                                         field, field.empty() ? "" : " ", what));
}

inline absl::Status InvalidBlockField(absl::string_view block,
                                      absl::string_view field,
                                      absl::string_view what) {
  return BlockError(absl::StatusCode::kInvalidArgument, block, field, what);
}

}  // namespace natgrad::core

#endif  // NATGRAD_SERVER_CORE_BLOCK_ERROR_H_
