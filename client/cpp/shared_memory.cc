#include "client/cpp/shared_memory.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <functional>

#include "absl/random/random.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace natgrad::client {
namespace {

constexpr int64_t kAlignment = 64;

int64_t AlignUp(int64_t x) { return (x + kAlignment - 1) / kAlignment * kAlignment; }

// Every Tensor in `m`, depth first.
absl::Status ForEachTensor(google::protobuf::Message* m,
                           const std::function<absl::Status(natgrad::v1::Tensor*)>& fn) {
  if (auto* t = dynamic_cast<natgrad::v1::Tensor*>(m)) return fn(t);
  const google::protobuf::Reflection* r = m->GetReflection();
  std::vector<const google::protobuf::FieldDescriptor*> fields;
  r->ListFields(*m, &fields);
  for (const auto* f : fields) {
    if (f->cpp_type() != google::protobuf::FieldDescriptor::CPPTYPE_MESSAGE || f->is_map()) {
      continue;
    }
    if (f->is_repeated()) {
      for (int i = 0; i < r->FieldSize(*m, f); ++i) {
        if (absl::Status s = ForEachTensor(r->MutableRepeatedMessage(m, f, i), fn); !s.ok()) {
          return s;
        }
      }
    } else if (absl::Status s = ForEachTensor(r->MutableMessage(m, f), fn); !s.ok()) {
      return s;
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::shared_ptr<SharedMemoryRegion>> SharedMemoryRegion::Create(int64_t bytes) {
  if (bytes <= 0) return absl::InvalidArgumentError("a shared-memory region needs bytes > 0");
  absl::BitGen gen;
  const std::string name = absl::StrFormat("natgrad-%d-%016x", getpid(),
                                           absl::Uniform<uint64_t>(gen));
  const int fd = shm_open(name.c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
  if (fd < 0) {
    return absl::UnavailableError(
        absl::StrCat("cannot create /dev/shm/", name, ": ", std::strerror(errno)));
  }
  // posix_fallocate reserves the pages now: a full /dev/shm fails here, not
  // with SIGBUS when a tensor is written.
  if (const int e = posix_fallocate(fd, 0, bytes); e != 0) {
    close(fd);
    shm_unlink(name.c_str());
    return absl::ResourceExhaustedError(absl::StrCat("cannot size /dev/shm/", name, " to ", bytes,
                                                     " bytes: ", std::strerror(e)));
  }
  void* p = mmap(nullptr, static_cast<size_t>(bytes), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  const int map_error = errno;
  close(fd);
  if (p == MAP_FAILED) {
    shm_unlink(name.c_str());
    return absl::UnavailableError(
        absl::StrCat("cannot map /dev/shm/", name, ": ", std::strerror(map_error)));
  }
  return std::shared_ptr<SharedMemoryRegion>(
      new SharedMemoryRegion(name, static_cast<char*>(p), bytes));
}

SharedMemoryRegion::~SharedMemoryRegion() {
  munmap(data_, static_cast<size_t>(size_));
  shm_unlink(name_.c_str());
}

natgrad::v1::SharedMemorySpan SharedMemoryRegion::Span(int64_t offset, int64_t length) const {
  natgrad::v1::SharedMemorySpan s;
  s.set_region(name_);
  s.set_offset(offset);
  s.set_length(length);
  return s;
}

absl::StatusOr<absl::string_view> SharedMemoryRegion::Bytes(
    const natgrad::v1::SharedMemorySpan& span) const {
  if (span.region() != name_) {
    return absl::InvalidArgumentError(
        absl::StrCat("span of region ", span.region(), ", not of ", name_));
  }
  if (span.offset() < 0 || span.length() < 0 || span.offset() > size_ ||
      span.length() > size_ - span.offset()) {
    return absl::InvalidArgumentError(absl::StrCat("span [", span.offset(), ", ",
                                                   span.offset() + span.length(),
                                                   ") beyond region ", name_, " of ", size_));
  }
  return absl::string_view(data_ + span.offset(), static_cast<size_t>(span.length()));
}

absl::StatusOr<int64_t> SharedMemoryArena::Take(int64_t bytes) {
  const int64_t at = AlignUp(used_);
  if (bytes < 0 || at > region_->size() || bytes > region_->size() - at) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "shared-memory region ", region_->name(), " of ", region_->size(), " bytes has ",
        std::max<int64_t>(0, region_->size() - at), " left, a tensor needs ", bytes));
  }
  used_ = at + bytes;
  return at;
}

natgrad::v1::SharedMemorySpan SharedMemoryArena::Rest() const {
  const int64_t at = std::min(AlignUp(used_), region_->size());
  return region_->Span(at, region_->size() - at);
}

absl::StatusOr<absl::string_view> TensorBytes(const natgrad::v1::Tensor& tensor,
                                              const SharedMemoryRegion& region) {
  if (!tensor.has_shared_memory()) return absl::string_view(tensor.data());
  return region.Bytes(tensor.shared_memory());
}

absl::Status CheckDisjoint(const google::protobuf::Message& message,
                           const natgrad::v1::SharedMemorySpan& span) {
  // The walk only reads; it takes a mutable message to share one walker.
  return ForEachTensor(const_cast<google::protobuf::Message*>(&message),
                       [&](natgrad::v1::Tensor* t) -> absl::Status {
                         if (!t->has_shared_memory()) return absl::OkStatus();
                         const natgrad::v1::SharedMemorySpan& s = t->shared_memory();
                         if (s.region() != span.region() || s.length() == 0 ||
                             span.length() == 0) {
                           return absl::OkStatus();
                         }
                         if (s.offset() < span.offset() + span.length() &&
                             span.offset() < s.offset() + s.length()) {
                           return absl::InvalidArgumentError(absl::StrCat(
                               "the reply buffer [", span.offset(), ", ",
                               span.offset() + span.length(), ") overlaps a tensor of the step at [",
                               s.offset(), ", ", s.offset() + s.length(), ") in ", s.region(),
                               " (use SharedMemoryArena::Rest() after placing the step)"));
                         }
                         return absl::OkStatus();
                       });
}

absl::Status InlineSpans(google::protobuf::Message* message, const SharedMemoryRegion& region) {
  return ForEachTensor(message, [&](natgrad::v1::Tensor* t) -> absl::Status {
    if (!t->has_shared_memory()) return absl::OkStatus();
    absl::StatusOr<absl::string_view> bytes = region.Bytes(t->shared_memory());
    if (!bytes.ok()) return bytes.status();
    t->set_data(bytes->data(), bytes->size());
    t->clear_shared_memory();
    return absl::OkStatus();
  });
}

}  // namespace natgrad::client
