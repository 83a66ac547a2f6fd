// Steps through shared memory (the server with --shared_memory, in-process
// on port 0): the same answers, bit for bit, as the same steps sent inline;
// refusals that change nothing; and a server restart whose replay of kept
// steps still matches although their spans were written over since.
#include "client/cpp/shared_memory.h"

#include <cstring>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "client/cpp/natgrad_client.h"
#include "client/cpp/tensor.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/service/natgrad_server.h"

namespace natgrad::client {
namespace {

using natgrad::v1::BlockStep;
using natgrad::v1::StepResponse;
using ::testing::HasSubstr;

std::vector<float> RandomFloats(std::mt19937& rng, size_t n) {
  std::normal_distribution<float> d;
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

// A K-FAC dense layer (raw statistics) and an SGD vector.
natgrad::v1::SessionConfig Config() {
  natgrad::v1::SessionConfig c;
  auto* k = c.add_blocks();
  k->set_name("fc");
  auto* kd = k->mutable_kfac_dense();
  kd->set_d_in(6);
  kd->set_d_out(4);
  kd->set_has_bias(true);
  kd->set_inverse_period(2);
  kd->mutable_learning_rate()->mutable_constant()->set_value(0.1);
  kd->mutable_damping()->mutable_constant()->set_value(0.01);
  auto* s = c.add_blocks();
  s->set_name("v");
  s->add_shape(1000);
  s->mutable_sgd()->mutable_learning_rate()->mutable_constant()->set_value(0.5);
  return c;
}

struct Inputs {
  std::vector<float> fc_grad, acts, out_grads, v_grad;
};

Inputs RandomInputs(std::mt19937& rng) {
  return {RandomFloats(rng, 4 * 7), RandomFloats(rng, 8 * 6), RandomFloats(rng, 8 * 4),
          RandomFloats(rng, 1000)};
}

std::vector<BlockStep> Inline(const Inputs& in) {
  std::vector<BlockStep> out(2);
  out[0].set_name("fc");
  *out[0].mutable_gradient() = MakeTensor(in.fc_grad, {4, 7});
  *out[0].mutable_kfac()->mutable_raw()->mutable_activations() = MakeTensor(in.acts, {8, 6});
  *out[0].mutable_kfac()->mutable_raw()->mutable_output_gradients() =
      MakeTensor(in.out_grads, {8, 4});
  out[1].set_name("v");
  *out[1].mutable_gradient() = MakeTensor(in.v_grad, {1000});
  return out;
}

std::vector<BlockStep> Spanned(const Inputs& in, SharedMemoryArena& arena) {
  arena.Reset();
  std::vector<BlockStep> out(2);
  out[0].set_name("fc");
  *out[0].mutable_gradient() = arena.Place(in.fc_grad.data(), {4, 7}).value();
  auto* raw = out[0].mutable_kfac()->mutable_raw();
  *raw->mutable_activations() = arena.Place(in.acts.data(), {8, 6}).value();
  *raw->mutable_output_gradients() = arena.Place(in.out_grads.data(), {8, 4}).value();
  out[1].set_name("v");
  // In place: the values written straight into the region.
  float* v = nullptr;
  *out[1].mutable_gradient() = arena.Allocate<float>({1000}, &v).value();
  std::memcpy(v, in.v_grad.data(), in.v_grad.size() * sizeof(float));
  return out;
}

class SharedMemoryStepTest : public ::testing::Test {
 protected:
  void StartServer(bool shared_memory, const std::string& checkpoint_dir = "", int port = 0,
                   int64_t max_session_bytes = 0) {
    service::ServerOptions options;
    if (max_session_bytes > 0) options.limits.max_session_bytes = max_session_bytes;
    options.address = "127.0.0.1:" + std::to_string(port);
    options.engine.backend = "cpu";
    options.shared_memory = shared_memory;
    if (!checkpoint_dir.empty()) {
      options.checkpoint_dir = checkpoint_dir;
      options.checkpoint_every_steps = 4;
    }
    auto server = service::NatgradServer::Start(options);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = *std::move(server);
  }
  void TearDown() override {
    if (server_ != nullptr) server_->Shutdown(absl::Seconds(1));
  }
  ClientOptions Options() const {
    ClientOptions o;
    o.target = "127.0.0.1:" + std::to_string(server_->port());
    o.initial_backoff = absl::Milliseconds(5);
    o.max_retry_time = absl::Seconds(20);
    return o;
  }
  std::unique_ptr<service::NatgradServer> server_;
};

// Each update's values as bytes, wherever the response put them.
std::vector<std::string> Deltas(const StepResponse& r, const SharedMemoryRegion& region) {
  std::vector<std::string> out;
  for (const auto& u : r.updates()) out.emplace_back(TensorBytes(u.delta(), region).value());
  return out;
}

TEST_F(SharedMemoryStepTest, SameAnswersAsInlineStepsWithTheReplyInTheBuffer) {
  StartServer(/*shared_memory=*/true);
  Client client(Options());
  auto plain = client.CreateSession(Config());
  auto shared = client.CreateSession(Config());
  ASSERT_TRUE(plain.ok() && shared.ok());
  auto plain_stream = *client.OpenStream(plain->name());
  auto shared_stream = *client.OpenStream(shared->name());
  auto region = SharedMemoryRegion::Create(1 << 16).value();
  SharedMemoryArena arena(region);
  std::mt19937 rng(3);
  for (int t = 1; t <= 4; ++t) {
    const Inputs in = RandomInputs(rng);
    std::vector<BlockStep> spanned = Spanned(in, arena);
    shared_stream->UseSharedMemory(region, arena.Rest());
    auto a = plain_stream->Step(Inline(in));
    auto b = shared_stream->Step(std::move(spanned));
    ASSERT_TRUE(a.ok()) << a.status();
    ASSERT_TRUE(b.ok()) << b.status();
    for (const auto& u : b->updates()) {
      EXPECT_TRUE(u.delta().has_shared_memory()) << u.name();
      EXPECT_TRUE(u.delta().data().empty()) << u.name();
      EXPECT_EQ(u.delta().shared_memory().region(), region->name());
      EXPECT_GE(u.delta().shared_memory().offset(), arena.Rest().offset());
      EXPECT_EQ(u.delta().shared_memory().offset() % 64, 0);
    }
    EXPECT_EQ(Deltas(*a, *region), Deltas(*b, *region)) << "step " << t;
    EXPECT_EQ(a->updates(0).hyperparameters().at("damping"),
              b->updates(0).hyperparameters().at("damping"));
  }
  // Without a reply buffer the deltas come inline, still equal.
  const Inputs in = RandomInputs(rng);
  shared_stream->UseSharedMemory(region);
  auto a = plain_stream->Step(Inline(in));
  auto b = shared_stream->Step(Spanned(in, arena));
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_FALSE(b->updates(0).delta().has_shared_memory());
  EXPECT_EQ(Deltas(*a, *region), Deltas(*b, *region));
}

TEST_F(SharedMemoryStepTest, AServerWithoutSharedMemoryRefusesAndNothingAdvances) {
  StartServer(/*shared_memory=*/false);
  Client client(Options());
  auto session = client.CreateSession(Config());
  ASSERT_TRUE(session.ok());
  auto stream = *client.OpenStream(session->name());
  auto region = SharedMemoryRegion::Create(1 << 16).value();
  SharedMemoryArena arena(region);
  std::mt19937 rng(4);
  const Inputs in = RandomInputs(rng);
  auto r = stream->Step(Spanned(in, arena));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition) << r.status();
  EXPECT_THAT(r.status().message(), HasSubstr("--shared_memory"));
  EXPECT_EQ(stream->next_step(), 1);
  auto info = client.GetSession(session->name());
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->last_step(), 0);
  auto ok = stream->Step(Inline(in));
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ(ok->step(), 1);
}

TEST_F(SharedMemoryStepTest, BadSpansAndReplyBuffersChangeNothing) {
  StartServer(/*shared_memory=*/true);
  Client client(Options());
  auto session = client.CreateSession(Config());
  ASSERT_TRUE(session.ok());
  auto stream = *client.OpenStream(session->name());
  auto region = SharedMemoryRegion::Create(1 << 16).value();
  SharedMemoryArena arena(region);
  std::mt19937 rng(5);
  const Inputs in = RandomInputs(rng);

  std::vector<BlockStep> beyond = Spanned(in, arena);
  beyond[1].mutable_gradient()->mutable_shared_memory()->set_offset(region->size() - 16);
  auto r = stream->Step(std::move(beyond));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(r.status().message(), HasSubstr("block \"v\": gradient.shared_memory has bytes"));

  // A reply buffer outside the region: refused before the step is applied.
  stream->UseSharedMemory(region, region->Span(region->size() - 8, 64));
  r = stream->Step(Spanned(in, arena));
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.status().message(), HasSubstr("reply_buffer has bytes"));
  EXPECT_EQ(stream->next_step(), 1);
  EXPECT_EQ(client.GetSession(session->name())->last_step(), 0);

  // A reply buffer over the step's own tensors: refused by the client (it
  // keeps a step by reading its spans after the reply has come).
  std::vector<BlockStep> blocks = Spanned(in, arena);
  stream->UseSharedMemory(region, region->Span(0, region->size()));
  r = stream->Step(std::move(blocks));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(r.status().message(), HasSubstr("overlaps"));
  EXPECT_EQ(client.GetSession(session->name())->last_step(), 0);

  blocks = Spanned(in, arena);
  stream->UseSharedMemory(region, arena.Rest());
  auto ok = stream->Step(std::move(blocks));
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ(ok->step(), 1);
}

// A span larger than a session's step may be is refused before the server
// reserves or copies anything.
TEST_F(SharedMemoryStepTest, SpansCountAgainstTheSessionLimit) {
  StartServer(/*shared_memory=*/true, "", 0, /*max_session_bytes=*/64 << 10);
  Client client(Options());
  auto session = client.CreateSession(Config());
  ASSERT_TRUE(session.ok()) << session.status();
  auto stream = *client.OpenStream(session->name());
  auto region = SharedMemoryRegion::Create(1 << 20).value();
  SharedMemoryArena arena(region);
  std::mt19937 rng(8);
  std::vector<BlockStep> blocks = Spanned(RandomInputs(rng), arena);
  // Claims 100k floats in the region for the 1000-value block.
  natgrad::v1::Tensor* g = blocks[1].mutable_gradient();
  g->set_shape(0, 100000);
  g->mutable_shared_memory()->set_length(400000);
  auto r = stream->Step(std::move(blocks));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted) << r.status();
  EXPECT_THAT(r.status().message(), HasSubstr("per-session limit"));
  EXPECT_EQ(client.GetSession(session->name())->last_step(), 0);
}

// Steps 1..3 are acknowledged but not durable (checkpoint every 4 steps);
// the server restarts from its checkpoint at step 0 (a crash), and the
// client sends them again. Each step overwrote the previous one's spans, so only steps
// kept by value can be sent again, and the replayed answers must match.
TEST_F(SharedMemoryStepTest, KeptStepsAreReplayedByValueAfterARestart) {
  const std::string dir =
      (std::filesystem::temp_directory_path() / ("natgrad-shm-test-" + std::to_string(getpid())))
          .string();
  std::filesystem::remove_all(dir);
  StartServer(/*shared_memory=*/true, dir);
  const int port = server_->port();
  Client client(Options());
  auto session = client.CreateSession(Config());
  ASSERT_TRUE(session.ok()) << session.status();
  // What a crash right now would leave: the session durable at step 0.
  std::filesystem::copy(dir, dir + ".at-step-0", std::filesystem::copy_options::recursive);
  auto stream = *client.OpenStream(session->name());
  auto region = SharedMemoryRegion::Create(1 << 16).value();
  SharedMemoryArena arena(region);
  std::mt19937 rng(6);
  std::vector<Inputs> sent;
  for (int t = 1; t <= 3; ++t) {
    sent.push_back(RandomInputs(rng));
    std::vector<BlockStep> blocks = Spanned(sent.back(), arena);
    stream->UseSharedMemory(region, arena.Rest());
    auto r = stream->Step(std::move(blocks));
    ASSERT_TRUE(r.ok()) << r.status();
  }
  EXPECT_EQ(stream->kept_steps(), 3);
  // By value: the kept requests hold the tensors' bytes.
  EXPECT_GT(stream->kept_bytes(), 3 * 1000 * 4);

  // A clean shutdown checkpoints every session; the crash loses steps 1..3.
  server_->Shutdown(absl::Seconds(1));
  server_.reset();
  std::filesystem::remove_all(dir);
  std::filesystem::rename(dir + ".at-step-0", dir);
  StartServer(/*shared_memory=*/true, dir, port);
  ASSERT_EQ(server_->port(), port);

  // The same inputs to a fresh session through plain messages: the oracle.
  auto oracle = client.CreateSession(Config());
  ASSERT_TRUE(oracle.ok());
  auto oracle_stream = *client.OpenStream(oracle->name());
  for (const Inputs& in : sent) ASSERT_TRUE(oracle_stream->Step(Inline(in)).ok());

  const Inputs next = RandomInputs(rng);
  std::vector<BlockStep> blocks = Spanned(next, arena);
  stream->UseSharedMemory(region, arena.Rest());
  auto r = stream->Step(std::move(blocks));
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->step(), 4);
  EXPECT_EQ(stream->replayed_steps(), 3);
  auto want = oracle_stream->Step(Inline(next));
  ASSERT_TRUE(want.ok());
  EXPECT_EQ(Deltas(*want, *region), Deltas(*r, *region));
  server_->Shutdown(absl::Seconds(1));
  server_.reset();
  std::filesystem::remove_all(dir);
}

TEST(SharedMemoryArenaTest, PlacesAlignedAndRefusesWhenFull) {
  auto region = SharedMemoryRegion::Create(256).value();
  EXPECT_EQ(region->name().rfind("natgrad-", 0), 0u);
  SharedMemoryArena arena(region);
  const std::vector<float> a = {1, 2, 3};
  auto t = arena.Place(a.data(), {3});
  ASSERT_TRUE(t.ok());
  EXPECT_EQ(t->shared_memory().offset(), 0);
  EXPECT_EQ(t->shared_memory().length(), 12);
  auto u = arena.Place(a.data(), {3});
  ASSERT_TRUE(u.ok());
  EXPECT_EQ(u->shared_memory().offset(), 64);
  EXPECT_EQ(TensorBytes(*u, *region).value(),
            std::string(reinterpret_cast<const char*>(a.data()), 12));
  EXPECT_EQ(arena.Rest().offset(), 128);
  EXPECT_EQ(arena.Rest().length(), 128);
  const std::vector<double> big(40, 1.0);
  auto full = arena.Place(big.data(), {40});
  EXPECT_EQ(full.status().code(), absl::StatusCode::kResourceExhausted);
  // InlineSpans turns a spanned tensor back into data.
  natgrad::v1::Tensor copy = *u;
  ASSERT_TRUE(InlineSpans(&copy, *region).ok());
  EXPECT_FALSE(copy.has_shared_memory());
  EXPECT_EQ(copy.data(), std::string(reinterpret_cast<const char*>(a.data()), 12));
  const std::string name = region->name();
  region.reset();
  arena = SharedMemoryArena(nullptr);
  EXPECT_FALSE(std::filesystem::exists("/dev/shm/" + name));  // unlinked with the region
}

}  // namespace
}  // namespace natgrad::client
