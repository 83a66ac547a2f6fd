// The C++ client's step encoding: each StepRequest encoded once, its tensor
// payloads referenced rather than copied, byte for byte what protobuf itself
// serializes; and steps with moved blocks, split messages and in-place
// tensors through a real server (in-process, port 0) against plain SGD
// worked out here.
#include <cstring>
#include <memory>
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
using natgrad::v1::StepRequest;

std::vector<float> RandomFloats(std::mt19937& rng, size_t n) {
  std::normal_distribution<float> d;
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

std::string Flatten(const grpc::ByteBuffer& buffer) {
  std::vector<grpc::Slice> slices;
  EXPECT_TRUE(buffer.Dump(&slices).ok());
  std::string out;
  for (const auto& s : slices) out.append(reinterpret_cast<const char*>(s.begin()), s.size());
  return out;
}

// A request with two large tensors, one small one and a loss.
std::shared_ptr<StepRequest> SampleRequest(std::mt19937& rng) {
  auto req = std::make_shared<StepRequest>();
  req->set_session("sessions/abcd");
  req->set_step(7);
  req->set_last(true);
  req->set_loss(0.25);
  BlockStep* a = req->add_blocks();
  a->set_name("a");
  *a->mutable_gradient() = MakeTensor(RandomFloats(rng, 100000), {100, 1000});
  BlockStep* b = req->add_blocks();
  b->set_name("b");
  *b->mutable_gradient() = MakeTensor(RandomFloats(rng, 3), {3});
  *b->mutable_params() = MakeTensor(RandomFloats(rng, 50000), {50000});
  return req;
}

TEST(CppClientEncodeTest, BytesAreProtobufsOwnSerialization) {
  std::mt19937 rng(1);
  auto req = SampleRequest(rng);
  const std::string expected = req->SerializeAsString();
  auto encoded = EncodeStepRequest(req);
  ASSERT_TRUE(encoded.ok()) << encoded.status();
  EXPECT_EQ(encoded->Length(), expected.size());
  EXPECT_EQ(Flatten(*encoded), expected);
  StepRequest parsed;
  ASSERT_TRUE(parsed.ParseFromString(Flatten(*encoded)));
  EXPECT_EQ(parsed.blocks(1).params().data(), req->blocks(1).params().data());
}

TEST(CppClientEncodeTest, LargePayloadsAreReferencedNotCopied) {
  std::mt19937 rng(2);
  auto req = SampleRequest(rng);
  const char* a_data = req->blocks(0).gradient().data().data();
  const char* b_params = req->blocks(1).params().data().data();
  auto encoded = EncodeStepRequest(req);
  ASSERT_TRUE(encoded.ok()) << encoded.status();
  std::vector<grpc::Slice> slices;
  ASSERT_TRUE(encoded->Dump(&slices).ok());
  int aliased = 0;
  for (const auto& s : slices) {
    const char* begin = reinterpret_cast<const char*>(s.begin());
    if (begin == a_data) {
      EXPECT_EQ(s.size(), req->blocks(0).gradient().data().size());
      ++aliased;
    }
    if (begin == b_params) {
      EXPECT_EQ(s.size(), req->blocks(1).params().data().size());
      ++aliased;
    }
  }
  EXPECT_EQ(aliased, 2) << "the two large tensors should be slices of the request's own bytes";
}

TEST(CppClientEncodeTest, BufferKeepsTheRequestAlive) {
  std::mt19937 rng(3);
  auto req = SampleRequest(rng);
  const std::string expected = req->SerializeAsString();
  auto encoded = EncodeStepRequest(std::move(req));
  ASSERT_TRUE(encoded.ok()) << encoded.status();
  // The only owner left is the buffer (and its copies, which share slices).
  grpc::ByteBuffer copy = *encoded;
  *encoded = grpc::ByteBuffer();
  EXPECT_EQ(Flatten(copy), expected);
}

TEST(CppClientTensorTest, InPlaceAndOwnedBytesMatchMakeTensor) {
  std::mt19937 rng(4);
  const std::vector<float> values = RandomFloats(rng, 12);
  const natgrad::v1::Tensor copied = MakeTensor(values, {3, 4});

  natgrad::v1::Tensor in_place;
  float* out = InitTensor<float>(&in_place, {3, 4});
  for (size_t i = 0; i < values.size(); ++i) out[i] = values[i];
  EXPECT_EQ(in_place.SerializeAsString(), copied.SerializeAsString());

  std::string bytes(reinterpret_cast<const char*>(values.data()), values.size() * sizeof(float));
  const char* storage = bytes.data();
  natgrad::v1::Tensor owned = MakeTensor(std::move(bytes), {3, 4}, natgrad::v1::FLOAT32);
  EXPECT_EQ(owned.SerializeAsString(), copied.SerializeAsString());
  EXPECT_EQ(owned.data().data(), storage) << "the string's buffer should be taken, not copied";

  natgrad::v1::Tensor d;
  double* dp = InitTensor<double>(&d, {2});
  dp[0] = 1.5;
  dp[1] = -2.0;
  EXPECT_EQ(d.dtype(), natgrad::v1::FLOAT64);
  EXPECT_THAT(TensorValues(d), ::testing::ElementsAre(1.5, -2.0));
}

class CppClientStepTest : public ::testing::Test {
 protected:
  void SetUp() override {
    service::ServerOptions options;
    options.address = "127.0.0.1:0";
    options.engine.backend = "cpu";
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
    return o;
  }
  // Plain SGD blocks (no momentum) of the given sizes.
  static natgrad::v1::SessionConfig SgdConfig(const std::vector<int64_t>& sizes, double lr) {
    natgrad::v1::SessionConfig c;
    for (size_t i = 0; i < sizes.size(); ++i) {
      auto* b = c.add_blocks();
      b->set_name("b" + std::to_string(i));
      b->add_shape(sizes[i]);
      b->mutable_sgd()->mutable_learning_rate()->mutable_constant()->set_value(lr);
    }
    return c;
  }
  std::unique_ptr<service::NatgradServer> server_;
};

// The update of every block is -lr * gradient, whichever way the step's
// blocks were handed over and however many messages carried them.
TEST_F(CppClientStepTest, MovedBlocksSplitMessagesAndInPlaceTensors) {
  const double lr = 0.5;
  const std::vector<int64_t> sizes = {1000, 7, 300000};
  ClientOptions o = Options();
  o.max_blocks_per_message = 1;  // three messages per step
  Client client(o);
  auto session = client.CreateSession(SgdConfig(sizes, lr));
  ASSERT_TRUE(session.ok()) << session.status();
  auto stream = client.OpenStream(session->name());
  ASSERT_TRUE(stream.ok()) << stream.status();

  std::mt19937 rng(5);
  for (int t = 0; t < 3; ++t) {
    std::vector<std::vector<float>> g;
    std::vector<BlockStep> blocks;
    for (size_t i = 0; i < sizes.size(); ++i) {
      g.push_back(RandomFloats(rng, sizes[i]));
      BlockStep& b = blocks.emplace_back();
      b.set_name("b" + std::to_string(i));
      if (t == 1) {
        // Written in place, no staging copy.
        float* out = InitTensor<float>(b.mutable_gradient(), {sizes[i]});
        std::memcpy(out, g.back().data(), g.back().size() * sizeof(float));
      } else {
        *b.mutable_gradient() = MakeTensor(g.back(), {sizes[i]});
      }
    }
    absl::StatusOr<natgrad::v1::StepResponse> r;
    if (t == 2) {
      r = (*stream)->Step(blocks);  // an lvalue: copied, and still ours after
      ASSERT_EQ(blocks.size(), sizes.size());
      EXPECT_EQ(blocks[2].gradient().data().size(), sizes[2] * sizeof(float));
    } else {
      r = (*stream)->Step(std::move(blocks));
    }
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->step(), t + 1);
    ASSERT_EQ(r->updates_size(), static_cast<int>(sizes.size()));
    for (const auto& u : r->updates()) {
      const size_t i = std::stoul(u.name().substr(1));
      const std::vector<double> delta = TensorValues(u.delta());
      ASSERT_EQ(delta.size(), g[i].size()) << u.name();
      for (size_t k = 0; k < delta.size(); ++k) {
        ASSERT_NEAR(delta[k], -lr * g[i][k], 1e-6 * (1 + std::abs(g[i][k]))) << u.name() << k;
      }
    }
  }
  EXPECT_EQ((*stream)->next_step(), 4);
  EXPECT_TRUE((*stream)->Close().ok());
}

// A step the server refuses leaves the step number where it was, and the
// stream carries on (the encoding is per step, not per stream).
TEST_F(CppClientStepTest, RefusedStepDoesNotAdvance) {
  Client client(Options());
  auto session = client.CreateSession(SgdConfig({4}, 0.1));
  ASSERT_TRUE(session.ok()) << session.status();
  auto stream = client.OpenStream(session->name());
  ASSERT_TRUE(stream.ok()) << stream.status();
  BlockStep bad;
  bad.set_name("b0");
  *bad.mutable_gradient() = MakeTensor(std::vector<float>{1, 2, 3}, {3});
  auto r = (*stream)->Step({bad});
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
  EXPECT_EQ((*stream)->next_step(), 1);
  BlockStep good;
  good.set_name("b0");
  *good.mutable_gradient() = MakeTensor(std::vector<float>{1, 2, 3, 4}, {4});
  auto ok = (*stream)->Step({good});
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ(ok->step(), 1);
}

}  // namespace
}  // namespace natgrad::client
