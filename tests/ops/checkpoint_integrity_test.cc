// Checkpoint integrity on the real binary (issue 11): checkpoints are
// written every step, the server is SIGKILLed, the newest file is damaged (a
// flipped byte, a truncation on a field boundary), and the restarted server
// restores the older intact copy, which continues bit for bit like the
// original run; with both copies damaged the session is skipped, logged and
// counted, never loaded with different state.
#include <filesystem>
#include <fstream>

#include "client/cpp/natgrad_client.h"
#include "client/cpp/tensor.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/ops/http_get.h"
#include "tests/ops/ops_util.h"
#include "tests/ops/server_process.h"

namespace natgrad::testing {
namespace {

using ::testing::HasSubstr;

natgrad::v1::SessionConfig Config() {
  natgrad::v1::SessionConfig c;
  c.set_state_dtype(natgrad::v1::FLOAT64);
  auto* b = c.add_blocks();
  b->set_name("w");
  b->add_shape(4);
  b->mutable_adam()->mutable_learning_rate()->mutable_constant()->set_value(0.05);
  return c;
}

std::vector<natgrad::v1::BlockStep> Inputs(int t) {
  std::vector<double> g(4);
  for (int i = 0; i < 4; ++i) g[i] = 0.1 * t + 0.37 * i - 0.5 * (t % 3);
  natgrad::v1::BlockStep s;
  s.set_name("w");
  *s.mutable_gradient() = client::MakeTensor(g, {4});
  return {s};
}

client::Client ClientOf(const ServerProcess& s) {
  client::ClientOptions o;
  o.target = s.target();
  o.initial_backoff = absl::Milliseconds(5);
  return client::Client(o);
}

// The session's only current checkpoint file.
std::string CurrentFile(const std::string& dir) {
  std::string found;
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    if (e.path().extension() == ".ngckpt") found = e.path().string();
  }
  return found;
}

class CheckpointIntegrity : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = MakeTempDir("ngint");
    ServerProcess first({"--checkpoint_dir=" + dir_, "--checkpoint_every_steps=1"});
    ASSERT_TRUE(first.running());
    client::Client client = ClientOf(first);
    auto session = client.CreateSession(Config());
    ASSERT_TRUE(session.ok()) << session.status();
    name_ = session->name();
    auto stream = client.OpenStream(name_);
    ASSERT_TRUE(stream.ok());
    for (int t = 1; t <= 3; ++t) {
      auto r = (*stream)->Step(Inputs(t));
      ASSERT_TRUE(r.ok()) << r.status();
      responses_.push_back(r->updates(0).delta().SerializeAsString());
    }
    first.Kill();  // SIGKILL: no shutdown checkpoint
    current_ = CurrentFile(dir_);
    ASSERT_FALSE(current_.empty());
    ASSERT_TRUE(std::filesystem::exists(current_ + ".prev"));
  }

  void Damage(const std::string& path, size_t keep_bytes, bool flip_middle) {
    std::string bytes = ReadText(path);
    if (flip_middle) bytes[bytes.size() / 2] ^= 0x04;
    bytes.resize(std::min(bytes.size(), keep_bytes));
    std::ofstream(path, std::ios::binary | std::ios::trunc) << bytes;
  }

  // Restarts, checks the session is at step 2 and that step 3 gives the
  // original run's update bit for bit.
  void ExpectRestoredFromPreviousCopy() {
    const std::string log = dir_ + "/server.log";
    const std::string mfile = dir_ + "/mport";
    ServerProcess second({"--checkpoint_dir=" + dir_, "--checkpoint_every_steps=1",
                          "--metrics_address=127.0.0.1:0", "--metrics_port_file=" + mfile},
                         log);
    ASSERT_TRUE(second.running());
    client::Client client = ClientOf(second);
    auto got = client.GetSession(name_);
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(got->last_step(), 2);
    auto metrics = HttpGet(ReadPort(mfile), "/metrics");
    ASSERT_TRUE(metrics.has_value());
    EXPECT_EQ(MetricSample(*metrics, "natgrad_checkpoints_skipped_total"), 1);
    EXPECT_THAT(ReadText(log), HasSubstr("(the previous copy"));
    auto stream = client.OpenStream(name_);
    ASSERT_TRUE(stream.ok());
    auto r = (*stream)->StepNumbered(3, Inputs(3));
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->updates(0).delta().SerializeAsString(), responses_[2]);
  }

  std::string dir_, name_, current_;
  std::vector<std::string> responses_;
};

TEST_F(CheckpointIntegrity, FlippedByteRestoresTheOlderIntactCopy) {
  Damage(current_, SIZE_MAX, /*flip_middle=*/true);
  ExpectRestoredFromPreviousCopy();
}

TEST_F(CheckpointIntegrity, TruncationOnAFieldBoundaryRestoresTheOlderIntactCopy) {
  // Cutting off the trailing digest leaves a complete protobuf: the bare
  // format of before accepted exactly such a file.
  Damage(current_, ReadText(current_).size() - 32, false);
  ExpectRestoredFromPreviousCopy();
}

TEST_F(CheckpointIntegrity, MissingCurrentFileRestoresThePreviousCopy) {
  // As a crash between the two renames of a write leaves it.
  std::filesystem::remove(current_);
  ServerProcess second({"--checkpoint_dir=" + dir_});
  ASSERT_TRUE(second.running());
  auto got = ClientOf(second).GetSession(name_);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->last_step(), 2);
}

TEST_F(CheckpointIntegrity, BothCopiesDamagedSkipsTheSessionWithLogAndMetric) {
  Damage(current_, SIZE_MAX, true);
  Damage(current_ + ".prev", 40, false);
  const std::string log = dir_ + "/server.log";
  const std::string mfile = dir_ + "/mport";
  ServerProcess second({"--checkpoint_dir=" + dir_, "--metrics_address=127.0.0.1:0",
                        "--metrics_port_file=" + mfile},
                       log);
  ASSERT_TRUE(second.running());
  auto got = ClientOf(second).GetSession(name_);
  EXPECT_EQ(got.status().code(), absl::StatusCode::kNotFound);
  auto metrics = HttpGet(ReadPort(mfile), "/metrics");
  ASSERT_TRUE(metrics.has_value());
  EXPECT_EQ(MetricSample(*metrics, "natgrad_checkpoints_skipped_total"), 2);
  EXPECT_EQ(MetricSample(*metrics, "natgrad_sessions"), 0);
  const std::string text = ReadText(log);
  EXPECT_THAT(text, HasSubstr("SHA-256 mismatch"));
  EXPECT_THAT(text, HasSubstr("truncated"));
}

}  // namespace
}  // namespace natgrad::testing
