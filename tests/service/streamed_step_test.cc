// A step streamed one block per message (as a client sends each layer when
// backward produces it) through the real server: the server proposes the
// early blocks while the later messages arrive, and the updates are the
// same bytes as the same step sent in one message. A stream that ends
// between messages leaves the session exactly as it was.
#include <algorithm>
#include <chrono>
#include <random>
#include <set>
#include <thread>

#include "gmock/gmock.h"
#include "google/protobuf/util/message_differencer.h"
#include "grpcpp/grpcpp.h"
#include "tests/service/server_fixture.h"

namespace natgrad::testing {
namespace {

using ::testing::HasSubstr;

// Config order: fc0, scale (adam), fc1, fc2: K-FAC layers with an adam
// block between them, KL clipping and Levenberg-Marquardt damping on.
natgrad::v1::SessionConfig Config(natgrad::v1::DType dtype) {
  natgrad::v1::SessionConfig c;
  c.set_state_dtype(dtype);
  c.mutable_kl_clip()->set_enabled(true);
  c.mutable_kl_clip()->set_kappa(1e-3);
  c.mutable_adaptive_damping()->set_enabled(true);
  c.mutable_adaptive_damping()->set_interval(2);
  auto kfac = [&](const std::string& name, int64_t din, int64_t dout) {
    auto* b = c.add_blocks();
    b->set_name(name);
    auto* k = b->mutable_kfac_dense();
    k->set_d_in(din);
    k->set_d_out(dout);
    k->set_has_bias(true);
    *k->mutable_learning_rate() = Constant(0.05);
    *k->mutable_damping() = Constant(1e-2);
    *k->mutable_momentum() = Constant(0.9);
    k->set_inverse_period(3);
  };
  kfac("fc0", 8, 6);
  auto* a = c.add_blocks();
  a->set_name("scale");
  a->add_shape(5);
  *a->mutable_adam()->mutable_learning_rate() = Constant(1e-2);
  kfac("fc1", 6, 4);
  kfac("fc2", 4, 3);
  return c;
}

constexpr int64_t kBatch = 12;

natgrad::v1::Tensor Random(std::mt19937& rng, std::vector<int64_t> shape, bool float32,
                           int64_t extra_cols = 0) {
  shape.back() += extra_cols;
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  auto v = RandomVector(rng, n);
  if (float32) return client::MakeTensor(std::vector<float>(v.begin(), v.end()), shape);
  return client::MakeTensor(v, shape);
}

// Step t's blocks in config order; `malformed` gets a gradient with one
// column too many (a shape the session refuses when it proposes).
std::vector<natgrad::v1::BlockStep> Blocks(int t, bool float32, const std::string& malformed = "") {
  std::mt19937 rng(static_cast<uint32_t>(77 + t));
  std::vector<natgrad::v1::BlockStep> out;
  auto kfac = [&](const std::string& name, int64_t din, int64_t dout) {
    natgrad::v1::BlockStep s;
    s.set_name(name);
    *s.mutable_gradient() = Random(rng, {dout, din + 1}, float32, name == malformed ? 1 : 0);
    *s.mutable_kfac()->mutable_raw()->mutable_activations() = Random(rng, {kBatch, din}, float32);
    *s.mutable_kfac()->mutable_raw()->mutable_output_gradients() =
        Random(rng, {kBatch, dout}, float32);
    out.push_back(std::move(s));
  };
  kfac("fc0", 8, 6);
  natgrad::v1::BlockStep a;
  a.set_name("scale");
  *a.mutable_gradient() = Random(rng, {5}, float32, malformed == "scale" ? 1 : 0);
  out.push_back(std::move(a));
  kfac("fc1", 6, 4);
  kfac("fc2", 4, 3);
  return out;
}

// Rises after every measured (even) step, so the damping moves.
double Loss(int t) { return 3.0 - 0.05 * t + (t % 2 == 1 ? 0.5 : 0.0); }

double Counter(service::NatgradServer& server, const std::string& name) {
  for (const auto& family : server.metrics().registry().Collect()) {
    if (family.name != name) continue;
    double sum = 0;
    for (const auto& m : family.metric) sum += m.counter.value;
    return sum;
  }
  return 0;
}

// The update bytes, the KL scale and the damping of two responses.
void ExpectSameResponse(const natgrad::v1::StepResponse& a, const natgrad::v1::StepResponse& b,
                        int t) {
  ASSERT_EQ(a.updates_size(), b.updates_size()) << "step " << t;
  for (int i = 0; i < a.updates_size(); ++i) {
    EXPECT_EQ(a.updates(i).name(), b.updates(i).name());
    EXPECT_TRUE(google::protobuf::util::MessageDifferencer::Equals(a.updates(i), b.updates(i)))
        << "step " << t << " block " << a.updates(i).name();
  }
  EXPECT_EQ(a.kl_clip_scale(), b.kl_clip_scale()) << "step " << t;
  EXPECT_EQ(a.damping(), b.damping()) << "step " << t;
  EXPECT_FALSE(b.replayed());
}

class StreamedStep : public ::testing::TestWithParam<natgrad::v1::DType> {
 protected:
  bool float32() const { return GetParam() == natgrad::v1::FLOAT32; }
};

TEST_P(StreamedStep, OneMessagePerBlockGivesTheUpdatesOfOneMessage) {
  auto server = StartServer();
  client::ClientOptions whole = ClientFor(*server), streamed = ClientFor(*server);
  streamed.max_blocks_per_message = 1;  // every block its own message
  client::Client one(whole), per_block(streamed);
  auto a = one.CreateSession(Config(GetParam()));
  auto b = per_block.CreateSession(Config(GetParam()));
  ASSERT_TRUE(a.ok() && b.ok());
  auto sa = one.OpenStream(a->name());
  auto sb = per_block.OpenStream(b->name());
  ASSERT_TRUE(sa.ok() && sb.ok());
  const double early_before = Counter(*server, "natgrad_blocks_proposed_early_total");
  std::set<double> dampings;
  for (int t = 1; t <= 10; ++t) {
    auto blocks = Blocks(t, float32());
    if (t % 3 == 0) std::reverse(blocks.begin(), blocks.end());  // later layers first
    auto ra = (*sa)->Step(blocks, Loss(t));
    auto rb = (*sb)->Step(blocks, Loss(t));
    ASSERT_TRUE(ra.ok()) << ra.status();
    ASSERT_TRUE(rb.ok()) << rb.status();
    ExpectSameResponse(*ra, *rb, t);
    EXPECT_LT(ra->kl_clip_scale(), 1.0);
    dampings.insert(ra->damping());
  }
  EXPECT_GT(dampings.size(), 2u);  // judged steps: K-FAC proposals waited for the loss
  // 3 of each step's 4 blocks came before the last message; all but the
  // damped ones of judged steps were proposed then.
  const double early = Counter(*server, "natgrad_blocks_proposed_early_total") - early_before;
  EXPECT_GT(early, 10);
  EXPECT_LE(early, 30);
  EXPECT_TRUE(google::protobuf::util::MessageDifferencer::Equals(
      one.ExportSession(a->name())->blocks(0), per_block.ExportSession(b->name())->blocks(0)));
}

TEST_P(StreamedStep, ABadBlockInALaterMessageIsTheOneMessageErrorAndChangesNothing) {
  auto server = StartServer();
  client::ClientOptions whole = ClientFor(*server), streamed = ClientFor(*server);
  streamed.max_blocks_per_message = 1;
  client::Client one(whole), per_block(streamed);
  auto a = one.CreateSession(Config(GetParam()));
  auto b = per_block.CreateSession(Config(GetParam()));
  ASSERT_TRUE(a.ok() && b.ok());
  auto sa = one.OpenStream(a->name());
  auto sb = per_block.OpenStream(b->name());
  ASSERT_TRUE((*sa)->Step(Blocks(1, float32()), Loss(1)).ok());
  ASSERT_TRUE((*sb)->Step(Blocks(1, float32()), Loss(1)).ok());
  const natgrad::v1::SessionSnapshot before = *per_block.ExportSession(b->name());
  // fc0 (message 1) is proposed; fc1 (message 3) and fc2 (4) are refused:
  // the error is fc1's, as when the step comes in one message.
  auto bad = Blocks(2, float32(), "fc1");
  *bad[3].mutable_gradient() = Blocks(2, float32(), "fc2")[3].gradient();
  auto ea = (*sa)->Step(bad, Loss(2));
  auto eb = (*sb)->Step(bad, Loss(2));
  ASSERT_FALSE(ea.ok());
  EXPECT_EQ(eb.status(), ea.status());
  EXPECT_THAT(eb.status().message(), HasSubstr("block \"fc1\""));
  EXPECT_TRUE(google::protobuf::util::MessageDifferencer::Equals(
      *per_block.ExportSession(b->name()), before));
  // The stream ended with the error; a new one takes step 2 alike.
  sa = one.OpenStream(a->name());
  sb = per_block.OpenStream(b->name());
  for (int t = 2; t <= 4; ++t) {
    auto ra = (*sa)->Step(Blocks(t, float32()), Loss(t));
    auto rb = (*sb)->Step(Blocks(t, float32()), Loss(t));
    ASSERT_TRUE(ra.ok() && rb.ok()) << ra.status() << " " << rb.status();
    ExpectSameResponse(*ra, *rb, t);
  }
}

TEST_P(StreamedStep, AStreamCancelledBetweenMessagesLeavesNoTrace) {
  auto server = StartServer();
  client::Client client(ClientFor(*server));
  auto ref = client.CreateSession(Config(GetParam()));
  auto cut = client.CreateSession(Config(GetParam()));
  ASSERT_TRUE(ref.ok() && cut.ok());
  for (const auto* s : {&*ref, &*cut}) {
    auto stream = client.OpenStream(s->name());
    ASSERT_TRUE((*stream)->Step(Blocks(1, float32()), Loss(1)).ok());
    ASSERT_TRUE((*stream)->Close().ok());
  }
  const natgrad::v1::SessionSnapshot before = *client.ExportSession(cut->name());

  // Step 2's first two layers, each its own message; the rest never comes.
  const double early_before = Counter(*server, "natgrad_blocks_proposed_early_total");
  {
    grpc::ClientContext ctx;
    auto stream = client.stub().Step(&ctx);
    const auto blocks = Blocks(2, float32());
    for (int i = 0; i < 2; ++i) {
      natgrad::v1::StepRequest r;
      r.set_session(cut->name());
      r.set_step(2);
      *r.add_blocks() = blocks[i];
      ASSERT_TRUE(stream->Write(r));
    }
    // Cut only once the server has proposed both: the case where proposed
    // updates exist and must be dropped (a wait on the server's own
    // counter, not on time).
    const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    while (Counter(*server, "natgrad_blocks_proposed_early_total") < early_before + 2 &&
           std::chrono::steady_clock::now() < give_up) {
      std::this_thread::yield();
    }
    ASSERT_EQ(Counter(*server, "natgrad_blocks_proposed_early_total"), early_before + 2);
    ctx.TryCancel();
    natgrad::v1::StepResponse resp;
    EXPECT_FALSE(stream->Read(&resp));
    EXPECT_EQ(stream->Finish().error_code(), grpc::StatusCode::CANCELLED);
  }
  // The client's Finish does not wait for the server: wait for the server
  // to have ended the stream (its reactor detached, after any proposal).
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (client.GetSession(cut->name())->stream_open() &&
         std::chrono::steady_clock::now() < give_up) {
    std::this_thread::yield();
  }
  ASSERT_FALSE(client.GetSession(cut->name())->stream_open());
  EXPECT_TRUE(google::protobuf::util::MessageDifferencer::Equals(
      *client.ExportSession(cut->name()), before));

  // A new stream on the cut session steps on exactly like the untouched one.
  auto s_ref = client.OpenStream(ref->name());
  client::ClientOptions streamed = ClientFor(*server);
  streamed.max_blocks_per_message = 1;
  client::Client per_block(streamed);
  auto s2 = per_block.OpenStream(cut->name());
  for (int t = 2; t <= 4; ++t) {
    auto ra = (*s_ref)->Step(Blocks(t, float32()), Loss(t));
    auto rb = (*s2)->Step(Blocks(t, float32()), Loss(t));
    ASSERT_TRUE(ra.ok() && rb.ok()) << ra.status() << " " << rb.status();
    ExpectSameResponse(*ra, *rb, t);
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, StreamedStep,
                         ::testing::Values(natgrad::v1::FLOAT32, natgrad::v1::FLOAT64),
                         [](const auto& info) {
                           return info.param == natgrad::v1::FLOAT32 ? "Float32" : "Float64";
                         });

}  // namespace
}  // namespace natgrad::testing
