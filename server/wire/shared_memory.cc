#include "server/wire/shared_memory.h"

#include <fcntl.h>
#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <functional>
#include <mutex>
#include <string>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "server/core/block_error.h"

namespace natgrad::wire {
namespace {

using google::protobuf::FieldDescriptor;
using google::protobuf::Message;
using natgrad::v1::SharedMemorySpan;
using natgrad::v1::Tensor;

constexpr absl::string_view kPrefix = "natgrad-";
constexpr size_t kMaxNameLength = 200;
constexpr int64_t kReplyAlignment = 64;

// The tensors of a message, depth first in field order, with their paths
// ("kfac.raw.activations", "updates[2].delta"). `fn` returning an error
// stops the walk.
using TensorVisitor = std::function<absl::Status(Tensor*, const std::string& path)>;

absl::Status Walk(Message* m, const std::string& prefix, const TensorVisitor& fn) {
  if (auto* t = dynamic_cast<Tensor*>(m)) return fn(t, prefix);
  const google::protobuf::Reflection* r = m->GetReflection();
  std::vector<const FieldDescriptor*> fields;
  r->ListFields(*m, &fields);
  for (const FieldDescriptor* f : fields) {
    if (f->cpp_type() != FieldDescriptor::CPPTYPE_MESSAGE || f->is_map()) continue;
    const std::string name = prefix.empty() ? f->name() : absl::StrCat(prefix, ".", f->name());
    if (f->is_repeated()) {
      for (int i = 0; i < r->FieldSize(*m, f); ++i) {
        if (absl::Status s = Walk(r->MutableRepeatedMessage(m, f, i),
                                  absl::StrCat(name, "[", i, "]"), fn);
            !s.ok()) {
          return s;
        }
      }
    } else if (absl::Status s = Walk(r->MutableMessage(m, f), name, fn); !s.ok()) {
      return s;
    }
  }
  return absl::OkStatus();
}

// Walks a step's blocks one by one, so that errors follow the block
// convention (`block "fc1": gradient.shared_memory ...`); any other message
// is walked whole, errors naming the path from its root.
absl::Status WalkTensors(Message* m, const TensorVisitor& fn) {
  auto* request = dynamic_cast<natgrad::v1::StepRequest*>(m);
  if (request == nullptr) {
    return Walk(m, "", [&](Tensor* t, const std::string& path) -> absl::Status {
      absl::Status s = fn(t, path);
      if (s.ok()) return s;
      return absl::Status(s.code(), absl::StrCat(path, ".shared_memory ", s.message()));
    });
  }
  for (natgrad::v1::BlockStep& block : *request->mutable_blocks()) {
    absl::Status s = Walk(&block, "", [&](Tensor* t, const std::string& path) {
      absl::Status s = fn(t, path);
      if (s.ok()) return s;
      return core::BlockError(s.code(), block.name(), absl::StrCat(path, ".shared_memory"),
                              s.message());
    });
    if (!s.ok()) return s;
  }
  return absl::OkStatus();
}

// One set non-message field of `src` into `dst` (same type).
void CopyScalarField(const Message& src, const FieldDescriptor* f, Message* dst) {
  const google::protobuf::Reflection* from = src.GetReflection();
  const google::protobuf::Reflection* to = dst->GetReflection();
  if (f->is_repeated()) {
    for (int i = 0; i < from->FieldSize(src, f); ++i) {
      switch (f->cpp_type()) {
        case FieldDescriptor::CPPTYPE_INT32: to->AddInt32(dst, f, from->GetRepeatedInt32(src, f, i)); break;
        case FieldDescriptor::CPPTYPE_INT64: to->AddInt64(dst, f, from->GetRepeatedInt64(src, f, i)); break;
        case FieldDescriptor::CPPTYPE_UINT32: to->AddUInt32(dst, f, from->GetRepeatedUInt32(src, f, i)); break;
        case FieldDescriptor::CPPTYPE_UINT64: to->AddUInt64(dst, f, from->GetRepeatedUInt64(src, f, i)); break;
        case FieldDescriptor::CPPTYPE_DOUBLE: to->AddDouble(dst, f, from->GetRepeatedDouble(src, f, i)); break;
        case FieldDescriptor::CPPTYPE_FLOAT: to->AddFloat(dst, f, from->GetRepeatedFloat(src, f, i)); break;
        case FieldDescriptor::CPPTYPE_BOOL: to->AddBool(dst, f, from->GetRepeatedBool(src, f, i)); break;
        case FieldDescriptor::CPPTYPE_ENUM: to->AddEnumValue(dst, f, from->GetRepeatedEnumValue(src, f, i)); break;
        case FieldDescriptor::CPPTYPE_STRING: to->AddString(dst, f, from->GetRepeatedString(src, f, i)); break;
        case FieldDescriptor::CPPTYPE_MESSAGE: break;  // not a scalar
      }
    }
    return;
  }
  switch (f->cpp_type()) {
    case FieldDescriptor::CPPTYPE_INT32: to->SetInt32(dst, f, from->GetInt32(src, f)); break;
    case FieldDescriptor::CPPTYPE_INT64: to->SetInt64(dst, f, from->GetInt64(src, f)); break;
    case FieldDescriptor::CPPTYPE_UINT32: to->SetUInt32(dst, f, from->GetUInt32(src, f)); break;
    case FieldDescriptor::CPPTYPE_UINT64: to->SetUInt64(dst, f, from->GetUInt64(src, f)); break;
    case FieldDescriptor::CPPTYPE_DOUBLE: to->SetDouble(dst, f, from->GetDouble(src, f)); break;
    case FieldDescriptor::CPPTYPE_FLOAT: to->SetFloat(dst, f, from->GetFloat(src, f)); break;
    case FieldDescriptor::CPPTYPE_BOOL: to->SetBool(dst, f, from->GetBool(src, f)); break;
    case FieldDescriptor::CPPTYPE_ENUM: to->SetEnumValue(dst, f, from->GetEnumValue(src, f)); break;
    case FieldDescriptor::CPPTYPE_STRING: to->SetString(dst, f, from->GetString(src, f)); break;
    case FieldDescriptor::CPPTYPE_MESSAGE: break;  // not a scalar
  }
}

// dst = src (same type, dst empty), except that each Tensor gets only its
// dtype and shape here and `tensor` decides where its bytes go. So a reply
// written into shared memory is not first copied whole, bytes included
// (about 1 ms and a fresh allocation per 10 MB), only to move them out.
using TensorCopy = std::function<void(const Tensor& from, Tensor* to)>;

void CopyLeavingTensorBytes(const Message& src, Message* dst, const TensorCopy& tensor) {
  if (const auto* t = dynamic_cast<const Tensor*>(&src)) {
    auto* d = static_cast<Tensor*>(dst);
    d->set_dtype(t->dtype());
    *d->mutable_shape() = t->shape();
    tensor(*t, d);
    return;
  }
  const google::protobuf::Reflection* from = src.GetReflection();
  const google::protobuf::Reflection* to = dst->GetReflection();
  std::vector<const FieldDescriptor*> fields;
  from->ListFields(src, &fields);
  for (const FieldDescriptor* f : fields) {
    if (f->cpp_type() != FieldDescriptor::CPPTYPE_MESSAGE) {
      CopyScalarField(src, f, dst);
    } else if (f->is_repeated()) {  // maps too, as their entries
      for (int i = 0; i < from->FieldSize(src, f); ++i) {
        CopyLeavingTensorBytes(from->GetRepeatedMessage(src, f, i), to->AddMessage(dst, f),
                               tensor);
      }
    } else {
      CopyLeavingTensorBytes(from->GetMessage(src, f), to->MutableMessage(dst, f), tensor);
    }
  }
}

size_t ElementSize(natgrad::v1::DType dtype) {
  return dtype == natgrad::v1::FLOAT32 ? 4 : dtype == natgrad::v1::FLOAT64 ? 8 : 0;
}

// What a span must be for its tensor; the tensor's own checks (dtype, shape)
// follow in its block's decode, on the inlined bytes.
absl::Status CheckSpan(const Tensor& t) {
  const SharedMemorySpan& span = t.shared_memory();
  if (!IsSharedMemoryName(span.region())) {
    return absl::InvalidArgumentError(
        absl::StrCat("region ", core::QuotedClientString(span.region()),
                     " is not a natgrad shared-memory name (\"natgrad-\" then up to ",
                     kMaxNameLength, " of A-Z a-z 0-9 . _ -)"));
  }
  if (!t.data().empty()) {
    return absl::InvalidArgumentError("is set together with data (send one of them)");
  }
  if (span.offset() < 0 || span.length() < 0) {
    return absl::InvalidArgumentError(absl::StrCat("has offset ", span.offset(), " and length ",
                                                   span.length(), ", want both >= 0"));
  }
  const size_t es = ElementSize(t.dtype());
  int64_t n = 1;
  for (int64_t d : t.shape()) {
    if (d < 0 || (d != 0 && n > (int64_t{1} << 40) / d)) {
      return absl::InvalidArgumentError("belongs to a tensor with a negative or too large shape");
    }
    n *= d;
  }
  if (es != 0 && span.length() != n * static_cast<int64_t>(es)) {
    return absl::InvalidArgumentError(
        absl::StrCat("has length ", span.length(), ", its tensor's shape and dtype need ",
                     n * static_cast<int64_t>(es), " bytes"));
  }
  return absl::OkStatus();
}

// SIGBUS of a guarded copy jumps back into it; others go to the handler
// that was there before (by default, the end of the process).
// volatile: the compiler knows memcpy reads neither it nor the jump buffer
// and would otherwise drop the store before the copy as dead.
thread_local sigjmp_buf* volatile guarded_copy_jump = nullptr;
struct sigaction previous_sigbus;

void OnSigbus(int signal, siginfo_t* info, void* context) {
  if (sigjmp_buf* jump = guarded_copy_jump; jump != nullptr) {
    guarded_copy_jump = nullptr;
    siglongjmp(*jump, 1);
  }
  if (previous_sigbus.sa_flags & SA_SIGINFO) {
    previous_sigbus.sa_sigaction(signal, info, context);
    return;
  }
  // Not a guarded copy: restore the old disposition; returning re-runs the
  // faulting access, which now gets it.
  sigaction(SIGBUS, &previous_sigbus, nullptr);
}

void InstallSigbusHandler() {
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction action {};
    action.sa_sigaction = OnSigbus;
    action.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&action.sa_mask);
    sigaction(SIGBUS, &action, &previous_sigbus);
  });
}

std::string ErrnoText(int error) { return std::strerror(error); }

}  // namespace

bool IsSharedMemoryName(absl::string_view region) {
  if (!absl::StartsWith(region, kPrefix)) return false;
  const absl::string_view rest = region.substr(kPrefix.size());
  if (rest.empty() || rest.size() > kMaxNameLength) return false;
  for (char c : rest) {
    if (!absl::ascii_isalnum(static_cast<unsigned char>(c)) && c != '.' && c != '_' && c != '-') {
      return false;
    }
  }
  return true;
}

absl::StatusOr<int64_t> SpannedBytes(const Message& message) {
  int64_t total = 0;
  // The walk only reads; it takes a mutable message to share one walker.
  absl::Status s = WalkTensors(const_cast<Message*>(&message),
                               [&](Tensor* t, const std::string&) -> absl::Status {
                                 if (!t->has_shared_memory()) return absl::OkStatus();
                                 if (absl::Status c = CheckSpan(*t); !c.ok()) return c;
                                 total += t->shared_memory().length();
                                 return absl::OkStatus();
                               });
  if (!s.ok()) return s;
  return total;
}

int64_t SpannedReplyBytes(const natgrad::v1::StepResponse& response) {
  int64_t total = 0;
  Walk(const_cast<natgrad::v1::StepResponse*>(&response), "",
       [&](Tensor* t, const std::string&) {
         if (t->has_shared_memory()) total += t->shared_memory().length();
         return absl::OkStatus();
       })
      .IgnoreError();
  return total;
}

bool GuardedCopy(void* dst, const void* src, size_t bytes) {
  InstallSigbusHandler();
  sigjmp_buf jump;
  // savemask: the handler runs with SIGBUS unblocked (SA_NODEFER), and the
  // jump restores this thread's mask as it was.
  if (sigsetjmp(jump, 1) != 0) return false;
  guarded_copy_jump = &jump;
  std::atomic_signal_fence(std::memory_order_seq_cst);
  std::memcpy(dst, src, bytes);
  std::atomic_signal_fence(std::memory_order_seq_cst);
  guarded_copy_jump = nullptr;
  return true;
}

bool GuardedAppend(std::string* out, const char* src, size_t bytes) {
  InstallSigbusHandler();
  out->reserve(out->size() + bytes);  // may throw: outside the guarded part
  const size_t size = out->size();
  sigjmp_buf jump;
  if (sigsetjmp(jump, 1) != 0) {
    // The append had the room it needed, so its only work was the copy that
    // faulted; its length was not yet updated, but be sure.
    out->resize(size);
    return false;
  }
  guarded_copy_jump = &jump;
  std::atomic_signal_fence(std::memory_order_seq_cst);
  out->append(src, bytes);
  std::atomic_signal_fence(std::memory_order_seq_cst);
  guarded_copy_jump = nullptr;
  return true;
}

SharedMemoryRegions::~SharedMemoryRegions() {
  for (auto& [name, m] : regions_) {
    if (m.data != nullptr) munmap(m.data, m.size);
  }
}

void SharedMemoryRegions::Unmap(absl::string_view region) {
  auto it = regions_.find(region);
  if (it == regions_.end()) return;
  if (it->second.data != nullptr) munmap(it->second.data, it->second.size);
  regions_.erase(it);
}

absl::StatusOr<SharedMemoryRegions::Mapping*> SharedMemoryRegions::Map(absl::string_view region,
                                                                        bool write) {
  const std::string name(region);
  // glibc's shm_open opens /dev/shm/<name> with O_NOFOLLOW; the name has
  // no '/', so it is that directory's entry and never a link out of it.
  int fd = shm_open(name.c_str(), O_RDWR, 0);
  bool writable = fd >= 0;
  if (fd < 0 && errno == EACCES && !write) fd = shm_open(name.c_str(), O_RDONLY, 0);
  if (fd < 0) {
    const int error = errno;
    return absl::InvalidArgumentError(absl::StrCat(
        "names ", core::QuotedClientString(name), ", which the server cannot open",
        write ? " for writing" : "", " (", ErrnoText(error), "; is the client on this host?)"));
  }
  struct stat st {};
  const bool stat_ok = fstat(fd, &st) == 0;
  if (!stat_ok || !S_ISREG(st.st_mode)) {
    close(fd);
    return absl::InvalidArgumentError(
        absl::StrCat("names ", core::QuotedClientString(name), ", not a shared-memory object"));
  }
  auto it = regions_.find(name);
  if (it != regions_.end() && it->second.device == st.st_dev && it->second.inode == st.st_ino &&
      it->second.size == static_cast<size_t>(st.st_size) && (it->second.writable || !write)) {
    close(fd);
    return &it->second;
  }
  if (it != regions_.end()) Unmap(name);
  if (regions_.size() >= kMaxRegions) {
    for (auto& [n, m] : regions_) {
      if (m.data != nullptr) munmap(m.data, m.size);
    }
    regions_.clear();
  }
  Mapping m;
  m.size = static_cast<size_t>(st.st_size);
  m.device = st.st_dev;
  m.inode = st.st_ino;
  m.writable = writable;
  if (m.size > 0) {
    void* p = mmap(nullptr, m.size, PROT_READ | (writable ? PROT_WRITE : 0), MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
      const int error = errno;
      close(fd);
      return absl::InvalidArgumentError(absl::StrCat(
          "names ", core::QuotedClientString(name), ", which the server cannot map (",
          ErrnoText(error), ")"));
    }
    m.data = static_cast<char*>(p);
  }
  close(fd);  // the mapping keeps the object
  return &(regions_[name] = m);
}

absl::StatusOr<char*> SharedMemoryRegions::Locate(const SharedMemorySpan& span, bool write) {
  absl::StatusOr<Mapping*> m = Map(span.region(), write);
  if (!m.ok()) return m.status();
  const uint64_t size = (*m)->size;
  if (span.offset() < 0 || span.length() < 0 || static_cast<uint64_t>(span.offset()) > size ||
      static_cast<uint64_t>(span.length()) > size - static_cast<uint64_t>(span.offset())) {
    return absl::InvalidArgumentError(absl::StrCat(
        "has bytes [", span.offset(), ", ", span.offset() + span.length(), ") beyond region ",
        core::QuotedClientString(span.region()), " of ", size, " bytes"));
  }
  if (size == 0) return static_cast<char*>(nullptr);
  return (*m)->data + span.offset();
}

absl::Status SharedMemoryRegions::Inline(Message* message) {
  return WalkTensors(message, [&](Tensor* t, const std::string& path) -> absl::Status {
    if (!t->has_shared_memory()) return absl::OkStatus();
    const SharedMemorySpan& span = t->shared_memory();
    absl::StatusOr<char*> src = Locate(span, /*write=*/false);
    if (!src.ok()) return src.status();
    std::string bytes;
    if (span.length() > 0 && !GuardedAppend(&bytes, *src, static_cast<size_t>(span.length()))) {
      Unmap(span.region());  // the object shrank: map it again next time
      return absl::InvalidArgumentError(absl::StrCat(
          "could not be read: region ", core::QuotedClientString(span.region()),
          " was truncated while the server read it"));
    }
    t->clear_shared_memory();
    t->set_data(std::move(bytes));
    return absl::OkStatus();
  });
}

absl::Status SharedMemoryRegions::CheckReplyBuffer(const SharedMemorySpan& buffer) {
  if (!IsSharedMemoryName(buffer.region())) {
    return absl::InvalidArgumentError(
        absl::StrCat("reply_buffer: region ", core::QuotedClientString(buffer.region()),
                     " is not a natgrad shared-memory name (\"natgrad-\" then up to ",
                     kMaxNameLength, " of A-Z a-z 0-9 . _ -)"));
  }
  absl::StatusOr<char*> base = Locate(buffer, /*write=*/true);
  if (!base.ok()) {
    return absl::Status(base.status().code(),
                        absl::StrCat("reply_buffer ", base.status().message()));
  }
  return absl::OkStatus();
}

absl::StatusOr<natgrad::v1::StepResponse> SharedMemoryRegions::WriteReply(
    const natgrad::v1::StepResponse& response, const SharedMemorySpan& buffer) {
  if (absl::Status s = CheckReplyBuffer(buffer); !s.ok()) return s;
  auto it = regions_.find(buffer.region());
  if (it == regions_.end() || !it->second.writable || it->second.data == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(
        "reply_buffer: region ", core::QuotedClientString(buffer.region()), " is not writable"));
  }
  int64_t cursor = buffer.offset();
  const int64_t end = buffer.offset() + buffer.length();
  bool truncated = false;
  natgrad::v1::StepResponse out;
  CopyLeavingTensorBytes(response, &out, [&](const Tensor& from, Tensor* to) {
    if (from.has_shared_memory()) *to->mutable_shared_memory() = from.shared_memory();
    const int64_t at = (cursor + kReplyAlignment - 1) / kReplyAlignment * kReplyAlignment;
    const int64_t n = static_cast<int64_t>(from.data().size());
    // Empty, after a failed copy, or not fitting what is left: inline.
    if (n == 0 || truncated || at > end || n > end - at) {
      to->set_data(from.data());
      return;
    }
    if (!GuardedCopy(it->second.data + at, from.data().data(), static_cast<size_t>(n))) {
      truncated = true;
      return;
    }
    SharedMemorySpan* span = to->mutable_shared_memory();
    span->set_region(buffer.region());
    span->set_offset(at);
    span->set_length(n);
    cursor = at + n;
  });
  if (truncated) {
    Unmap(buffer.region());
    return absl::InvalidArgumentError(
        absl::StrCat("reply_buffer: region ", core::QuotedClientString(buffer.region()),
                     " was truncated while the server wrote the reply"));
  }
  return out;
}

}  // namespace natgrad::wire
