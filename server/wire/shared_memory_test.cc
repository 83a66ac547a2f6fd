#include "server/wire/shared_memory.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstring>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "google/protobuf/util/message_differencer.h"
#include "gtest/gtest.h"

namespace natgrad::wire {
namespace {

using natgrad::v1::StepRequest;
using natgrad::v1::StepResponse;
using natgrad::v1::Tensor;
using ::testing::HasSubstr;

// A /dev/shm object of the test's own, removed at the end.
class Object {
 public:
  explicit Object(const std::string& tag, size_t bytes)
      : name_(absl::StrCat("natgrad-test-", getpid(), "-", tag)) {
    shm_unlink(name_.c_str());
    Resize(bytes);
  }
  ~Object() { shm_unlink(name_.c_str()); }
  const std::string& name() const { return name_; }
  void Resize(size_t bytes) {
    int fd = shm_open(name_.c_str(), O_RDWR | O_CREAT, 0600);
    EXPECT_GE(fd, 0);
    EXPECT_EQ(ftruncate(fd, static_cast<off_t>(bytes)), 0);
    close(fd);
  }
  void Write(size_t offset, const void* data, size_t n) {
    int fd = shm_open(name_.c_str(), O_RDWR, 0);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(pwrite(fd, data, n, static_cast<off_t>(offset)), static_cast<ssize_t>(n));
    close(fd);
  }
  std::string Read(size_t offset, size_t n) {
    std::string out(n, '\0');
    int fd = shm_open(name_.c_str(), O_RDONLY, 0);
    EXPECT_GE(fd, 0);
    EXPECT_EQ(pread(fd, out.data(), n, static_cast<off_t>(offset)), static_cast<ssize_t>(n));
    close(fd);
    return out;
  }
  // Unlinks and makes a new object under the same name (a client that
  // recreated its region).
  void Recreate(size_t bytes) {
    shm_unlink(name_.c_str());
    Resize(bytes);
  }

 private:
  std::string name_;
};

std::string Floats(const std::vector<float>& v) {
  return std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(float));
}

Tensor Spanned(const std::string& region, int64_t offset, std::vector<int64_t> shape,
               int64_t length = -1) {
  Tensor t;
  t.set_dtype(natgrad::v1::FLOAT32);
  int64_t n = 1;
  for (int64_t d : shape) {
    t.add_shape(d);
    n *= d;
  }
  t.mutable_shared_memory()->set_region(region);
  t.mutable_shared_memory()->set_offset(offset);
  t.mutable_shared_memory()->set_length(length >= 0 ? length : n * 4);
  return t;
}

StepRequest OneBlock(Tensor gradient) {
  StepRequest r;
  r.set_step(1);
  auto* b = r.add_blocks();
  b->set_name("fc1");
  *b->mutable_gradient() = std::move(gradient);
  return r;
}

TEST(SharedMemoryName, OnlyNatgradNamesWithoutPaths) {
  EXPECT_TRUE(IsSharedMemoryName("natgrad-a"));
  EXPECT_TRUE(IsSharedMemoryName("natgrad-123_job.step-0"));
  EXPECT_FALSE(IsSharedMemoryName("natgrad-"));
  EXPECT_FALSE(IsSharedMemoryName("other-region"));
  EXPECT_FALSE(IsSharedMemoryName("/natgrad-a"));
  EXPECT_FALSE(IsSharedMemoryName("natgrad-../../etc/passwd"));
  EXPECT_FALSE(IsSharedMemoryName("natgrad-a/b"));
  EXPECT_FALSE(IsSharedMemoryName(std::string("natgrad-a\0b", 11)));
  EXPECT_FALSE(IsSharedMemoryName("natgrad-" + std::string(201, 'x')));
  EXPECT_TRUE(IsSharedMemoryName("natgrad-" + std::string(200, 'x')));
}

TEST(SharedMemory, InlineCopiesTheSpanIntoTheTensor) {
  Object region("inline", 4096);
  const std::vector<float> values = {1.5f, -2.0f, 3.25f, 0.0f, 7.0f, 8.0f};
  region.Write(100, values.data(), values.size() * 4);  // unaligned on purpose
  StepRequest r = OneBlock(Spanned(region.name(), 100, {2, 3}));
  absl::StatusOr<int64_t> bytes = SpannedBytes(r);
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  EXPECT_EQ(*bytes, 24);
  SharedMemoryRegions regions;
  ASSERT_TRUE(regions.Inline(&r).ok());
  EXPECT_FALSE(r.blocks(0).gradient().has_shared_memory());
  EXPECT_EQ(r.blocks(0).gradient().data(), Floats(values));
  EXPECT_EQ(SpannedBytes(r).value(), 0);
  // The copy is the server's: the client writing the span again changes
  // nothing already read.
  const float other = 42.0f;
  region.Write(100, &other, 4);
  EXPECT_EQ(r.blocks(0).gradient().data(), Floats(values));
}

TEST(SharedMemory, TensorsWithoutSpansAreLeftAlone) {
  Tensor t;
  t.set_dtype(natgrad::v1::FLOAT32);
  t.add_shape(1);
  t.set_data(Floats({2.0f}));
  StepRequest r = OneBlock(t);
  EXPECT_EQ(SpannedBytes(r).value(), 0);
  SharedMemoryRegions regions;
  ASSERT_TRUE(regions.Inline(&r).ok());
  EXPECT_EQ(r.blocks(0).gradient().data(), Floats({2.0f}));
  EXPECT_EQ(regions.mapped(), 0u);
}

TEST(SharedMemory, BadSpansAreRefusedNamingBlockAndField) {
  Object region("bad", 64);
  struct Case {
    Tensor tensor;
    std::string want;
  };
  Tensor both = Spanned(region.name(), 0, {2});
  both.set_data(Floats({1, 2}));
  std::vector<Case> cases = {
      {Spanned("someone-else", 0, {2}), "region \"someone-else\" is not a natgrad shared-memory name"},
      {Spanned(region.name(), -4, {2}), "has offset -4 and length 8, want both >= 0"},
      {Spanned(region.name(), 0, {3}, 8), "has length 8, its tensor's shape and dtype need 12"},
      {both, "is set together with data"},
  };
  for (const Case& c : cases) {
    absl::StatusOr<int64_t> bytes = SpannedBytes(OneBlock(c.tensor));
    ASSERT_FALSE(bytes.ok()) << c.want;
    EXPECT_EQ(bytes.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(bytes.status().message(),
                HasSubstr(absl::StrCat("block \"fc1\": gradient.shared_memory ", c.want)));
  }
  // Checked at the copy: the object as it is now.
  SharedMemoryRegions regions;
  StepRequest beyond = OneBlock(Spanned(region.name(), 40, {8}));
  ASSERT_TRUE(SpannedBytes(beyond).ok());
  absl::Status s = regions.Inline(&beyond);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("block \"fc1\": gradient.shared_memory has bytes [40, 72) "
                                     "beyond region"));
  StepRequest missing = OneBlock(Spanned("natgrad-test-no-such-object", 0, {1}));
  s = regions.Inline(&missing);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("which the server cannot open"));
}

TEST(SharedMemory, AnObjectResizedOrReplacedIsMappedAgain) {
  Object region("remap", 16);
  region.Write(0, Floats({1, 2, 3, 4}).data(), 16);
  SharedMemoryRegions regions;
  StepRequest first = OneBlock(Spanned(region.name(), 0, {4}));
  ASSERT_TRUE(regions.Inline(&first).ok());
  // Shrunk under the mapping: a bounds error, not a fault.
  region.Resize(8);
  StepRequest shrunk = OneBlock(Spanned(region.name(), 0, {4}));
  EXPECT_THAT(regions.Inline(&shrunk).message(), HasSubstr("beyond region"));
  // Replaced by a new object of the same name: its bytes, not the old ones.
  region.Recreate(16);
  region.Write(0, Floats({5, 6, 7, 8}).data(), 16);
  StepRequest replaced = OneBlock(Spanned(region.name(), 0, {4}));
  ASSERT_TRUE(regions.Inline(&replaced).ok());
  EXPECT_EQ(replaced.blocks(0).gradient().data(), Floats({5, 6, 7, 8}));
  EXPECT_EQ(regions.mapped(), 1u);
}

TEST(SharedMemory, GuardedCopyCatchesTheFaultOfATruncatedMapping) {
  Object region("sigbus", 2 * 4096);
  int fd = shm_open(region.name().c_str(), O_RDWR, 0);
  ASSERT_GE(fd, 0);
  void* p = mmap(nullptr, 2 * 4096, PROT_READ, MAP_SHARED, fd, 0);
  ASSERT_NE(p, MAP_FAILED);
  std::vector<char> out(2 * 4096);
  EXPECT_TRUE(GuardedCopy(out.data(), p, out.size()));
  // A client truncating its object while the server copies from it: the
  // pages past the end raise SIGBUS on access.
  ASSERT_EQ(ftruncate(fd, 0), 0);
  EXPECT_FALSE(GuardedCopy(out.data(), p, out.size()));
  // And the thread goes on working (the handler left it in a sane state).
  EXPECT_FALSE(GuardedCopy(out.data(), p, out.size()));
  std::string appended = "kept";
  EXPECT_FALSE(GuardedAppend(&appended, static_cast<const char*>(p), out.size()));
  EXPECT_EQ(appended, "kept");
  char local[8] = "abcdefg";
  char copy[8] = {};
  EXPECT_TRUE(GuardedCopy(copy, local, sizeof(local)));
  EXPECT_STREQ(copy, "abcdefg");
  EXPECT_TRUE(GuardedAppend(&appended, local, 3));
  EXPECT_EQ(appended, "keptabc");
  munmap(p, 2 * 4096);
  close(fd);
}

StepResponse TwoUpdates() {
  StepResponse r;
  r.set_step(3);
  auto* a = r.add_updates();
  a->set_name("a");
  a->mutable_delta()->set_dtype(natgrad::v1::FLOAT32);
  a->mutable_delta()->add_shape(3);
  a->mutable_delta()->set_data(Floats({1, 2, 3}));
  (*a->mutable_hyperparameters())["learning_rate"] = 0.1;
  auto* b = r.add_updates();
  b->set_name("b");
  b->mutable_delta()->set_dtype(natgrad::v1::FLOAT32);
  b->mutable_delta()->add_shape(2);
  b->mutable_delta()->set_data(Floats({4, 5}));
  return r;
}

natgrad::v1::SharedMemorySpan Buffer(const std::string& region, int64_t offset, int64_t length) {
  natgrad::v1::SharedMemorySpan s;
  s.set_region(region);
  s.set_offset(offset);
  s.set_length(length);
  return s;
}

TEST(SharedMemory, ReplyTensorsGoIntoTheBufferAligned) {
  Object region("reply", 1024);
  SharedMemoryRegions regions;
  const StepResponse response = TwoUpdates();
  absl::StatusOr<StepResponse> out = regions.WriteReply(response, Buffer(region.name(), 10, 500));
  ASSERT_TRUE(out.ok()) << out.status();
  const Tensor& a = out->updates(0).delta();
  const Tensor& b = out->updates(1).delta();
  EXPECT_TRUE(a.data().empty());
  EXPECT_EQ(a.shared_memory().region(), region.name());
  EXPECT_EQ(a.shared_memory().offset(), 64);  // 10 rounded up to 64
  EXPECT_EQ(a.shared_memory().length(), 12);
  EXPECT_EQ(b.shared_memory().offset(), 128);
  EXPECT_EQ(b.shared_memory().length(), 8);
  EXPECT_EQ(region.Read(64, 12), Floats({1, 2, 3}));
  EXPECT_EQ(region.Read(128, 8), Floats({4, 5}));
  // Everything else as it was; the cached reply keeps its bytes.
  EXPECT_EQ(out->step(), 3);
  EXPECT_EQ(out->updates(0).hyperparameters().at("learning_rate"), 0.1);
  EXPECT_EQ(response.updates(0).delta().data(), Floats({1, 2, 3}));
  EXPECT_EQ(SpannedReplyBytes(*out), 20);
}

// The reply is the response with each tensor's bytes moved into the
// buffer and nothing else changed: put back from the region, every field of
// every kind (Gaussian updates, maps, timing, an empty tensor) is equal.
TEST(SharedMemory, AReplyPutBackFromTheBufferIsTheResponse) {
  Object region("whole", 4096);
  SharedMemoryRegions regions;
  StepResponse response = TwoUpdates();
  response.set_session("sessions/s");
  response.set_kl_clip_scale(0.5);
  response.set_damping(1e-3);
  response.set_replayed(true);
  response.set_durable_step(2);
  response.mutable_timing()->set_server_micros(77);
  natgrad::v1::BlockUpdate* g = response.add_updates();
  g->set_name("q");
  g->mutable_gaussian()->mutable_param1()->set_dtype(natgrad::v1::FLOAT64);
  g->mutable_gaussian()->mutable_param1()->add_shape(0);  // empty: stays inline
  g->mutable_gaussian()->mutable_delta2()->set_dtype(natgrad::v1::FLOAT32);
  g->mutable_gaussian()->mutable_delta2()->add_shape(2);
  g->mutable_gaussian()->mutable_delta2()->set_data(Floats({7, 8}));
  g->mutable_gaussian()->set_gamma_used(0.25);
  g->mutable_gaussian()->set_halvings(3);
  (*g->mutable_hyperparameters())["gamma"] = 0.25;
  absl::StatusOr<StepResponse> out = regions.WriteReply(response, Buffer(region.name(), 0, 4096));
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(SpannedReplyBytes(*out), 12 + 8 + 8);
  StepResponse back = *out;
  auto put_back = [&](Tensor* t) {
    if (!t->has_shared_memory()) return;
    t->set_data(region.Read(t->shared_memory().offset(), t->shared_memory().length()));
    t->clear_shared_memory();
  };
  for (natgrad::v1::BlockUpdate& u : *back.mutable_updates()) {
    if (u.has_delta()) put_back(u.mutable_delta());
    if (u.has_gaussian()) {
      put_back(u.mutable_gaussian()->mutable_delta2());
      put_back(u.mutable_gaussian()->mutable_param1());
    }
  }
  std::string diff;
  google::protobuf::util::MessageDifferencer d;
  d.ReportDifferencesToString(&diff);
  EXPECT_TRUE(d.Compare(back, response)) << diff;
}

TEST(SharedMemory, ReplyTensorsThatDoNotFitStayInline) {
  Object region("small", 1024);
  SharedMemoryRegions regions;
  // Room for the first delta (64..76) but not for the second at 128.
  absl::StatusOr<StepResponse> out =
      regions.WriteReply(TwoUpdates(), Buffer(region.name(), 64, 70));
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_TRUE(out->updates(0).delta().has_shared_memory());
  EXPECT_FALSE(out->updates(1).delta().has_shared_memory());
  EXPECT_EQ(out->updates(1).delta().data(), Floats({4, 5}));
}

TEST(SharedMemory, ABadReplyBufferIsRefused) {
  Object region("badreply", 128);
  SharedMemoryRegions regions;
  EXPECT_THAT(regions.CheckReplyBuffer(Buffer("elsewhere", 0, 8)).message(),
              HasSubstr("reply_buffer: region \"elsewhere\" is not a natgrad"));
  EXPECT_THAT(regions.CheckReplyBuffer(Buffer(region.name(), 100, 64)).message(),
              HasSubstr("reply_buffer has bytes [100, 164) beyond region"));
  EXPECT_TRUE(regions.CheckReplyBuffer(Buffer(region.name(), 0, 128)).ok());
  EXPECT_FALSE(regions.WriteReply(TwoUpdates(), Buffer(region.name(), 100, 64)).ok());
}

}  // namespace
}  // namespace natgrad::wire
