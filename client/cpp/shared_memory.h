// Tensors through POSIX shared memory, for a C++ client on the server's own
// host (docs/shared_memory.md; the server needs --shared_memory). Instead of
// the bytes, a step's messages carry where they are in a /dev/shm object the
// client made; the server copies them out on arrival, and can write the
// reply's deltas into the same object.
//
//   auto region = SharedMemoryRegion::Create(64 << 20).value();
//   SharedMemoryArena arena(region);
//   block.mutable_gradient()->Swap(&arena.Place(grad.data(), {rows, cols}).value());
//   stream->UseSharedMemory(region, arena.Rest());   // the reply goes there
//   auto reply = stream->Step(std::move(blocks));
//   absl::string_view delta = TensorBytes(reply->updates(0).delta(), *region).value();
//   arena.Reset();                                   // next step
//
// A region's spans may be written again once their step's response has
// come (the server has copied them by then). A reply's spans stay valid
// until the next step on the stream.
#ifndef NATGRAD_CLIENT_CPP_SHARED_MEMORY_H_
#define NATGRAD_CLIENT_CPP_SHARED_MEMORY_H_

#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "google/protobuf/message.h"
#include "natgrad/v1/tensor.pb.h"

namespace natgrad::client {

class SharedMemoryRegion {
 public:
  // A new object /dev/shm/natgrad-<pid>-<random> of `bytes` bytes (mode
  // 0600), mapped read-write; removed when the region is destroyed.
  static absl::StatusOr<std::shared_ptr<SharedMemoryRegion>> Create(int64_t bytes);
  ~SharedMemoryRegion();
  SharedMemoryRegion(const SharedMemoryRegion&) = delete;
  SharedMemoryRegion& operator=(const SharedMemoryRegion&) = delete;

  const std::string& name() const { return name_; }
  char* data() { return data_; }
  const char* data() const { return data_; }
  int64_t size() const { return size_; }

  natgrad::v1::SharedMemorySpan Span(int64_t offset, int64_t length) const;
  // The bytes a span names in this region; INVALID_ARGUMENT for another
  // region's span or one beyond this one.
  absl::StatusOr<absl::string_view> Bytes(const natgrad::v1::SharedMemorySpan& span) const;

 private:
  SharedMemoryRegion(std::string name, char* data, int64_t size)
      : name_(std::move(name)), data_(data), size_(size) {}
  std::string name_;
  char* data_;
  int64_t size_;
};

// Lays one step's tensors out in a region, each 64-byte aligned after the
// last; Reset() starts the next step at the front again.
class SharedMemoryArena {
 public:
  explicit SharedMemoryArena(std::shared_ptr<SharedMemoryRegion> region)
      : region_(std::move(region)) {}

  // A tensor whose values are a copy of `values` (prod(shape) of them) in
  // the region; RESOURCE_EXHAUSTED when the region is full.
  template <typename T>
  absl::StatusOr<natgrad::v1::Tensor> Place(const T* values, const std::vector<int64_t>& shape) {
    static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>);
    T* at = nullptr;
    absl::StatusOr<natgrad::v1::Tensor> t = Allocate<T>(shape, &at);
    if (t.ok()) std::memcpy(at, values, t->shared_memory().length());
    return t;
  }
  // A tensor of `shape` whose values the caller writes at `*values` (in
  // place, no staging copy) before the step is sent.
  template <typename T>
  absl::StatusOr<natgrad::v1::Tensor> Allocate(const std::vector<int64_t>& shape, T** values) {
    static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>);
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    absl::StatusOr<int64_t> offset = Take(n * static_cast<int64_t>(sizeof(T)));
    if (!offset.ok()) return offset.status();
    *values = reinterpret_cast<T*>(region_->data() + *offset);
    natgrad::v1::Tensor t;
    t.set_dtype(std::is_same_v<T, float> ? natgrad::v1::FLOAT32 : natgrad::v1::FLOAT64);
    for (int64_t d : shape) t.add_shape(d);
    *t.mutable_shared_memory() = region_->Span(*offset, n * static_cast<int64_t>(sizeof(T)));
    return t;
  }
  // The region after the last tensor placed: what a reply buffer can use.
  natgrad::v1::SharedMemorySpan Rest() const;
  void Reset() { used_ = 0; }
  int64_t used() const { return used_; }
  const std::shared_ptr<SharedMemoryRegion>& region() const { return region_; }

 private:
  absl::StatusOr<int64_t> Take(int64_t bytes);
  std::shared_ptr<SharedMemoryRegion> region_;
  int64_t used_ = 0;
};

// A tensor's values: its data, or the bytes its span names in `region`.
absl::StatusOr<absl::string_view> TensorBytes(const natgrad::v1::Tensor& tensor,
                                              const SharedMemoryRegion& region);

// INVALID_ARGUMENT when a tensor of `message` lies in `span`'s bytes.
absl::Status CheckDisjoint(const google::protobuf::Message& message,
                           const natgrad::v1::SharedMemorySpan& span);

// Replaces every span in `message`'s tensors by a copy of the bytes it
// names in `region` (what a step kept for replay, or compared bit for bit,
// must hold: the region will be written again).
absl::Status InlineSpans(google::protobuf::Message* message, const SharedMemoryRegion& region);

}  // namespace natgrad::client

#endif  // NATGRAD_CLIENT_CPP_SHARED_MEMORY_H_
