// Tensors through POSIX shared memory (docs/shared_memory.md): a client on
// the server's host writes a step's tensors into a /dev/shm object and sends
// only their spans (natgrad.v1.SharedMemorySpan); the server copies them out
// of the object when the message arrives and, when asked, writes the reply's
// tensors into a span of the client's instead of the response.
//
// The client is not trusted: a span must lie inside the object as it is
// when read, the object may be truncated or replaced at any time, and its
// bytes may change while they are copied. So every span is copied into the
// server's own memory before anything looks at it (the checks of the copy
// are then the checks of what is used), the object's size is read again at
// each use, and a copy that faults because the object shrank under it (a
// SIGBUS) is caught and becomes an error of that step.
#ifndef NATGRAD_SERVER_WIRE_SHARED_MEMORY_H_
#define NATGRAD_SERVER_WIRE_SHARED_MEMORY_H_

#include <sys/types.h>

#include <cstdint>
#include <map>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "google/protobuf/message.h"
#include "natgrad/v1/step.pb.h"
#include "natgrad/v1/tensor.pb.h"

namespace natgrad::wire {

// Region names the server opens: "natgrad-" then 1..200 of [A-Za-z0-9._-]
// (so it never opens another program's shared memory, and never a path).
bool IsSharedMemoryName(absl::string_view region);

// The bytes in `message`'s tensors that are spans rather than data (0: none
// is), each span checked against its tensor's dtype and shape (length =
// elements * size) and its region name; errors name the tensor's field
// (`block "fc1": kfac.raw.activations.shared_memory ...` inside a step's
// blocks).
absl::StatusOr<int64_t> SpannedBytes(const google::protobuf::Message& message);

// The bytes of `response`'s tensors that were written into shared memory.
int64_t SpannedReplyBytes(const natgrad::v1::StepResponse& response);

// A copy that survives the source being unmapped or truncated under it:
// false (and `dst` partly written) if reading `src` raised SIGBUS. The
// process's SIGBUS handler is installed on first use; a SIGBUS outside a
// guarded copy still ends the process, as it would without it.
bool GuardedCopy(void* dst, const void* src, size_t bytes);
// The same, appended to `out` (reserved first, so the bytes are written once,
// not zero-filled and then copied). On false `out` is as it was.
bool GuardedAppend(std::string* out, const char* src, size_t bytes);

// The mapped regions of one Step stream: mapped on first use, kept while
// the object behind the name stays the same (device, inode and size are
// checked at every use), unmapped when the stream ends.
class SharedMemoryRegions {
 public:
  SharedMemoryRegions() = default;
  ~SharedMemoryRegions();
  SharedMemoryRegions(const SharedMemoryRegions&) = delete;
  SharedMemoryRegions& operator=(const SharedMemoryRegions&) = delete;

  // Replaces every span in `message`'s tensors by the bytes it names
  // (copied out, data set, the span cleared). Call SpannedBytes first. On
  // error `message` may be partly inlined; the caller drops it.
  absl::Status Inline(google::protobuf::Message* message);

  // `response` with its updates' tensors written into `buffer` (each at
  // the next 64-byte-aligned offset of the object, in the order they
  // appear) and sent as spans; a tensor that does not fit what is left
  // stays inline. INVALID_ARGUMENT for a bad name, a missing or read-only
  // object, or a buffer beyond the object.
  absl::StatusOr<natgrad::v1::StepResponse> WriteReply(
      const natgrad::v1::StepResponse& response, const natgrad::v1::SharedMemorySpan& buffer);

  // Whether a reply could be written into `buffer` now: a natgrad name, an
  // object the server can open for writing, the span inside it.
  absl::Status CheckReplyBuffer(const natgrad::v1::SharedMemorySpan& buffer);

  // Regions mapped now (tests).
  size_t mapped() const { return regions_.size(); }

 private:
  struct Mapping {
    char* data = nullptr;
    size_t size = 0;
    dev_t device = 0;
    ino_t inode = 0;
    bool writable = false;
  };
  // The object named `region` as it is now, mapped.
  absl::StatusOr<Mapping*> Map(absl::string_view region, bool write);
  void Unmap(absl::string_view region);
  // The span's bytes inside its mapping (null for an empty object).
  absl::StatusOr<char*> Locate(const natgrad::v1::SharedMemorySpan& span, bool write);

  // A stream uses one or two regions; more are unmapped beyond this.
  static constexpr size_t kMaxRegions = 16;
  std::map<std::string, Mapping, std::less<>> regions_;
};

}  // namespace natgrad::wire

#endif  // NATGRAD_SERVER_WIRE_SHARED_MEMORY_H_
