// Issue 7's crash test with the real binary: a client runs K-FAC and Adam
// steps, the server is SIGKILLed mid-run and restarted on the same checkpoint
// directory, the client reconnects and continues; with a checkpoint every
// step, every update equals that of an uninterrupted run (float64, 1e-12).
// Plus SIGTERM: drain, checkpoint, exit within the grace period.
#include <chrono>
#include <filesystem>
#include <fstream>
#include <random>

#include "client/cpp/natgrad_client.h"
#include "client/cpp/tensor.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/ops/http_get.h"
#include "tests/ops/ops_util.h"
#include "tests/ops/server_process.h"

namespace natgrad::testing {
namespace {

constexpr int64_t kIn = 5, kOut = 3, kBatch = 8;

natgrad::v1::SessionConfig Config() {
  natgrad::v1::SessionConfig c;
  c.set_state_dtype(natgrad::v1::FLOAT64);
  c.mutable_kl_clip()->set_enabled(true);
  auto* k = c.add_blocks();
  k->set_name("fc");
  auto* kd = k->mutable_kfac_dense();
  kd->set_d_in(kIn);
  kd->set_d_out(kOut);
  kd->set_has_bias(true);
  kd->set_inverse_period(3);
  kd->mutable_momentum()->mutable_constant()->set_value(0.9);
  auto* a = c.add_blocks();
  a->set_name("scale");
  a->add_shape(4);
  a->mutable_adam()->mutable_learning_rate()->mutable_cosine_decay()->set_init(0.1);
  a->mutable_adam()->mutable_learning_rate()->mutable_cosine_decay()->set_steps(30);
  return c;
}

std::vector<natgrad::v1::BlockStep> StepInputs(int t) {
  std::mt19937 rng(1000 + t);  // a function of t: both runs send the same
  std::normal_distribution<double> n;
  auto vec = [&](size_t k) {
    std::vector<double> v(k);
    for (auto& x : v) x = n(rng);
    return v;
  };
  natgrad::v1::BlockStep fc, scale;
  fc.set_name("fc");
  *fc.mutable_gradient() = client::MakeTensor(vec(kOut * (kIn + 1)), {kOut, kIn + 1});
  *fc.mutable_kfac()->mutable_raw()->mutable_activations() = client::MakeTensor(vec(kBatch * kIn), {kBatch, kIn});
  *fc.mutable_kfac()->mutable_raw()->mutable_output_gradients() =
      client::MakeTensor(vec(kBatch * kOut), {kBatch, kOut});
  scale.set_name("scale");
  *scale.mutable_gradient() = client::MakeTensor(vec(4), {4});
  return {fc, scale};
}

client::ClientOptions Options(const ServerProcess& s) {
  client::ClientOptions o;
  o.target = s.target();
  o.initial_backoff = absl::Milliseconds(5);
  return o;
}

void ExpectClose(const natgrad::v1::StepResponse& got, const natgrad::v1::StepResponse& want,
                 int t) {
  ASSERT_EQ(got.updates_size(), want.updates_size());
  for (int b = 0; b < got.updates_size(); ++b) {
    auto g = client::TensorValues(got.updates(b).delta());
    auto w = client::TensorValues(want.updates(b).delta());
    ASSERT_EQ(g.size(), w.size());
    for (size_t i = 0; i < g.size(); ++i) {
      EXPECT_NEAR(g[i], w[i], 1e-12 * std::max(1.0, std::abs(w[i])))
          << "step " << t << " block " << got.updates(b).name();
    }
  }
}

constexpr int kSteps = 20, kKillAfter = 8;

TEST(CrashRecovery, SigkillMidRunThenRestartContinuesExactly) {
  // The uninterrupted run.
  std::vector<natgrad::v1::StepResponse> reference;
  {
    ServerProcess server({});
    ASSERT_TRUE(server.running());
    client::Client client(Options(server));
    auto session = client.CreateSession(Config());
    ASSERT_TRUE(session.ok()) << session.status();
    auto stream = *client.OpenStream(session->name());
    for (int t = 1; t <= kSteps; ++t) reference.push_back(*stream->Step(StepInputs(t)));
  }

  const std::string dir = MakeTempDir("ngckpt");
  std::string name;
  natgrad::v1::StepResponse last_before_crash;
  {
    ServerProcess server({"--checkpoint_dir=" + dir, "--checkpoint_every_steps=1"});
    ASSERT_TRUE(server.running());
    client::Client client(Options(server));
    auto session = client.CreateSession(Config());
    ASSERT_TRUE(session.ok());
    name = session->name();
    auto stream = *client.OpenStream(name);
    for (int t = 1; t <= kKillAfter; ++t) {
      auto r = stream->Step(StepInputs(t));
      ASSERT_TRUE(r.ok()) << r.status();
      ExpectClose(*r, reference[t - 1], t);
      last_before_crash = *r;
    }
    server.Kill();  // SIGKILL: no chance to checkpoint on the way out
  }

  ServerProcess restarted({"--checkpoint_dir=" + dir, "--checkpoint_every_steps=1"});
  ASSERT_TRUE(restarted.running());
  client::Client client(Options(restarted));
  auto stream = client.OpenStream(name);
  ASSERT_TRUE(stream.ok()) << stream.status();
  EXPECT_EQ((*stream)->next_step(), kKillAfter + 1);
  // A client that never saw the last response retries it: replayed, equal.
  auto replay = (*stream)->StepNumbered(kKillAfter, StepInputs(kKillAfter));
  ASSERT_TRUE(replay.ok()) << replay.status();
  EXPECT_TRUE(replay->replayed());
  ExpectClose(*replay, last_before_crash, kKillAfter);
  for (int t = kKillAfter + 1; t <= kSteps; ++t) {
    auto r = (*stream)->Step(StepInputs(t));
    ASSERT_TRUE(r.ok()) << r.status();
    ExpectClose(*r, reference[t - 1], t);
  }
}

TEST(CrashRecovery, SigtermDrainsCheckpointsAndExitsWithinGrace) {
  const std::string dir = MakeTempDir("ngterm");
  std::string name;
  {
    // No per-step checkpoints: only the SIGTERM path writes them.
    ServerProcess server({"--checkpoint_dir=" + dir, "--shutdown_grace_s=2"});
    ASSERT_TRUE(server.running());
    client::Client client(Options(server));
    auto session = client.CreateSession(Config());
    name = session->name();
    auto stream = *client.OpenStream(name);
    for (int t = 1; t <= 5; ++t) ASSERT_TRUE(stream->Step(StepInputs(t)).ok());
    // The stream stays open: the server must not wait for it forever.
    const auto start = std::chrono::steady_clock::now();
    server.Signal(SIGTERM);
    auto code = server.WaitExit(std::chrono::seconds(15));
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    ASSERT_TRUE(code.has_value()) << "server did not exit";
    EXPECT_EQ(*code, 0);
    EXPECT_LT(seconds, 2.0 + 3.0) << "grace period 2 s";
  }
  ServerProcess restarted({"--checkpoint_dir=" + dir});
  ASSERT_TRUE(restarted.running());
  client::Client client(Options(restarted));
  auto got = client.GetSession(name);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->last_step(), 5);
}

double Sample(const std::string& text, const std::string& series) {
  // "name{labels} value" lines.
  const size_t at = text.find("\n" + series + " ");
  if (at == std::string::npos) return -1;
  return std::stod(text.substr(at + series.size() + 2));
}

TEST(Metrics, CountersMoveDuringARunAndCorruptCheckpointsAreCounted) {
  const std::string dir = MakeTempDir("ngmet");
  std::ofstream(dir + "/deadbeefdeadbeef.ckpt") << "\x01\x02 definitely not a snapshot";
  // Port 0 and a port file: no race for a port picked in advance.
  ServerProcess server({"--checkpoint_dir=" + dir, "--checkpoint_every_steps=2",
                        "--metrics_address=127.0.0.1:0", "--metrics_port_file=" + dir + "/mport"});
  ASSERT_TRUE(server.running());
  const int mport = ReadPort(dir + "/mport");
  auto before = HttpGet(mport, "/metrics");
  ASSERT_TRUE(before.has_value());
  EXPECT_EQ(Sample(*before, "natgrad_checkpoints_skipped_total"), 1);
  EXPECT_THAT(*before, ::testing::HasSubstr("natgrad_inversion_backend_info{backend=\"cpu\"} 1"));

  client::Client client(Options(server));
  auto session = client.CreateSession(Config());
  auto stream = *client.OpenStream(session->name());
  for (int t = 1; t <= 4; ++t) ASSERT_TRUE(stream->Step(StepInputs(t)).ok());
  auto mid = HttpGet(mport, "/metrics");
  ASSERT_TRUE(mid.has_value());
  EXPECT_EQ(Sample(*mid, "natgrad_steps_total{outcome=\"ok\"}"), 4);
  EXPECT_EQ(Sample(*mid, "natgrad_block_steps_total{kind=\"kfac_dense\"}"), 4);
  EXPECT_EQ(Sample(*mid, "natgrad_sessions"), 1);
  EXPECT_EQ(Sample(*mid, "natgrad_streams_open"), 1);
  EXPECT_GE(Sample(*mid, "natgrad_checkpoint_writes_total{outcome=\"ok\"}"), 2);
  EXPECT_GT(Sample(*mid, "natgrad_stream_bytes_total{direction=\"received\"}"), 0);
  EXPECT_GE(Sample(*mid, "natgrad_inversion_batches_total{backend=\"cpu\"}"), 1);
  EXPECT_EQ(Sample(*mid, "natgrad_step_latency_seconds_count"), 4);
  // A bad step counts as an error by code.
  auto bad = stream->StepNumbered(9, StepInputs(9));
  EXPECT_FALSE(bad.ok());
  auto after = HttpGet(mport, "/metrics");
  EXPECT_EQ(Sample(*after, "natgrad_steps_total{outcome=\"FAILED_PRECONDITION\"}"), 1);
  EXPECT_EQ(Sample(*after, "natgrad_rpc_errors_total{code=\"FAILED_PRECONDITION\"}"), 1);
  // No session id ever becomes a label.
  EXPECT_THAT(*after, ::testing::Not(::testing::HasSubstr(session->name().substr(9))));
}

}  // namespace
}  // namespace natgrad::testing
