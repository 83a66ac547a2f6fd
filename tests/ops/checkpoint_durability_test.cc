// "Acknowledge only what is durable" and "deletes are durable" on the real
// binary (issue 11).
//
// Disk full is RLIMIT_FSIZE set on the running server with prlimit(2): as
// root, permissions do not stop writes, but a file-size limit does, and the
// server ignores SIGXFSZ so the write fails with EFBIG ("File too large")
// instead of killing it. Raising the limit again is the disk recovering.
#include <sys/resource.h>

#include <atomic>
#include <cmath>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "client/cpp/natgrad_client.h"
#include "client/cpp/tensor.h"
#include "gmock/gmock.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "tests/ops/http_get.h"
#include "tests/ops/ops_util.h"
#include "tests/ops/server_process.h"

namespace natgrad::testing {
namespace {

using ::grpc::health::v1::Health;
using ::grpc::health::v1::HealthCheckRequest;
using ::grpc::health::v1::HealthCheckResponse;
using ::testing::AllOf;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

natgrad::v1::SessionConfig Config(int64_t size = 4) {
  natgrad::v1::SessionConfig c;
  c.set_state_dtype(natgrad::v1::FLOAT64);
  auto* b = c.add_blocks();
  b->set_name("w");
  b->add_shape(size);
  b->mutable_adam()->mutable_learning_rate()->mutable_constant()->set_value(0.05);
  return c;
}

std::vector<natgrad::v1::BlockStep> Inputs(int t, int64_t size = 4) {
  std::vector<double> g(size);
  for (int i = 0; i < size; ++i) g[i] = 0.1 * t + 0.37 * (i % 7) - 0.5 * (t % 3);
  natgrad::v1::BlockStep s;
  s.set_name("w");
  *s.mutable_gradient() = client::MakeTensor(g, {size});
  return {s};
}

client::Client ClientOf(const ServerProcess& s, int max_retries = 8) {
  client::ClientOptions o;
  o.target = s.target();
  o.initial_backoff = absl::Milliseconds(5);
  o.max_retries = max_retries;
  return client::Client(o);
}

// Every file in `dir` (checkpoints, previous copies, temporary files).
std::vector<std::string> Files(const std::string& dir) {
  std::vector<std::string> out;
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    out.push_back(e.path().filename().string());
  }
  return out;
}

// Sets the server's file-size soft limit; the hard limit stays.
void SetFileSizeLimit(pid_t pid, rlim_t soft) {
  rlimit old{};
  ASSERT_EQ(prlimit(pid, RLIMIT_FSIZE, nullptr, &old), 0) << std::strerror(errno);
  rlimit limit{soft, old.rlim_max};
  ASSERT_EQ(prlimit(pid, RLIMIT_FSIZE, &limit, nullptr), 0) << std::strerror(errno);
}
constexpr rlim_t kDiskFull = 16;  // smaller than any checkpoint's header

HealthCheckResponse::ServingStatus HealthOf(const ServerProcess& s, const std::string& service) {
  auto stub = Health::NewStub(grpc::CreateChannel(s.target(), grpc::InsecureChannelCredentials()));
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  HealthCheckRequest request;
  request.set_service(service);
  HealthCheckResponse response;
  grpc::Status st = stub->Check(&context, request, &response);
  EXPECT_TRUE(st.ok()) << "\"" << service << "\": " << st.error_message();
  return response.status();
}

double Metric(const std::string& mport_file, const std::string& series) {
  auto body = HttpGet(ReadPort(mport_file), "/metrics");
  EXPECT_TRUE(body.has_value());
  return body.has_value() ? MetricSample(*body, series) : -1;
}

// A K-FAC layer: its step (factor products, a decomposition every other
// step) and its snapshot (factors and inverses) are slow next to its
// messages, so a step spends most of its time between the session's deleted
// check and its checkpoint write: the window in which a delete used to be
// undone.
constexpr int64_t kWide = 160, kBatch = 8;
natgrad::v1::SessionConfig KfacConfig() {
  natgrad::v1::SessionConfig c;
  c.set_state_dtype(natgrad::v1::FLOAT64);
  auto* b = c.add_blocks();
  b->set_name("fc");
  auto* k = b->mutable_kfac_dense();
  k->set_d_in(kWide);
  k->set_d_out(kWide);
  k->set_inverse_period(2);
  return c;
}

std::vector<natgrad::v1::BlockStep> KfacInputs(int t) {
  auto values = [t](int64_t n, double scale) {
    std::vector<double> v(n);
    for (int64_t i = 0; i < n; ++i) v[i] = scale * std::sin(0.7 * i + 1.3 * t);
    return v;
  };
  natgrad::v1::BlockStep s;
  s.set_name("fc");
  *s.mutable_gradient() = client::MakeTensor(values(kWide * kWide, 0.01), {kWide, kWide});
  *s.mutable_kfac()->mutable_raw()->mutable_activations() =
      client::MakeTensor(values(kBatch * kWide, 1.0), {kBatch, kWide});
  *s.mutable_kfac()->mutable_raw()->mutable_output_gradients() =
      client::MakeTensor(values(kBatch * kWide, 0.1), {kBatch, kWide});
  return {s};
}

// The updates of an uninterrupted run without checkpoints.
std::vector<std::string> Reference(int steps) {
  ServerProcess server({});
  EXPECT_TRUE(server.running());
  client::Client client = ClientOf(server);
  auto session = client.CreateSession(Config());
  EXPECT_TRUE(session.ok()) << session.status();
  auto stream = *client.OpenStream(session->name());
  std::vector<std::string> out;
  for (int t = 1; t <= steps; ++t) {
    auto r = stream->Step(Inputs(t));
    EXPECT_TRUE(r.ok()) << r.status();
    out.push_back(r->updates(0).delta().SerializeAsString());
  }
  return out;
}

TEST(DiskFull, StepIsNotAcknowledgedUntilItsRetryIsDurable) {
  const std::vector<std::string> reference = Reference(6);
  const std::string dir = MakeTempDir("ngfull");
  const std::string ckpt = dir + "/ckpt", mfile = dir + "/mport";
  const std::vector<std::string> flags = {"--checkpoint_dir=" + ckpt,
                                          "--checkpoint_every_steps=1"};
  std::string name;
  {
    std::vector<std::string> with_metrics = flags;
    with_metrics.push_back("--metrics_address=127.0.0.1:0");
    with_metrics.push_back("--metrics_port_file=" + mfile);
    ServerProcess server(with_metrics);
    ASSERT_TRUE(server.running());
    client::Client strict = ClientOf(server, /*max_retries=*/0);
    auto session = strict.CreateSession(Config());
    ASSERT_TRUE(session.ok()) << session.status();
    name = session->name();
    auto stream = *strict.OpenStream(name);
    for (int t = 1; t <= 3; ++t) ASSERT_TRUE(stream->Step(Inputs(t)).ok());
    EXPECT_EQ(Metric(mfile, "natgrad_checkpoint_healthy"), 1);
    EXPECT_EQ(HealthOf(server, "natgrad.checkpoints"), HealthCheckResponse::SERVING);

    SetFileSizeLimit(server.pid(), kDiskFull);
    auto refused = stream->StepNumbered(4, Inputs(4));
    ASSERT_FALSE(refused.ok());
    EXPECT_EQ(refused.status().code(), absl::StatusCode::kUnavailable) << refused.status();
    EXPECT_THAT(refused.status().message(),
                AllOf(HasSubstr("checkpoint of " + name + " at step 4 failed"),
                      HasSubstr("File too large"), HasSubstr("not acknowledged")));
    // Still alive (SIGXFSZ ignored): the step is applied in memory, not acknowledged.
    auto held = strict.GetSession(name);
    ASSERT_TRUE(held.ok()) << held.status();
    EXPECT_EQ(held->last_step(), 4);
    EXPECT_EQ(Metric(mfile, "natgrad_checkpoint_healthy"), 0);
    EXPECT_GE(Metric(mfile, "natgrad_checkpoint_writes_total{outcome=\"error\"}"), 1);
    EXPECT_EQ(HealthOf(server, "natgrad.checkpoints"), HealthCheckResponse::NOT_SERVING);
    // Traffic keeps coming: the retry below needs this server.
    EXPECT_EQ(HealthOf(server, ""), HealthCheckResponse::SERVING);
    EXPECT_EQ(HealthOf(server, "natgrad.v1.OptimizerService"), HealthCheckResponse::SERVING);

    // A retry while the disk is still full is a replay, and still refused:
    // the replay tries the write again rather than acknowledging.
    auto again = stream->StepNumbered(4, Inputs(4));
    ASSERT_FALSE(again.ok());
    EXPECT_EQ(again.status().code(), absl::StatusCode::kUnavailable) << again.status();

    SetFileSizeLimit(server.pid(), RLIM_INFINITY);
    auto retried = stream->StepNumbered(4, Inputs(4));
    ASSERT_TRUE(retried.ok()) << retried.status();
    EXPECT_TRUE(retried->replayed());
    EXPECT_EQ(retried->updates(0).delta().SerializeAsString(), reference[3]);
    EXPECT_EQ(Metric(mfile, "natgrad_checkpoint_healthy"), 1);
    EXPECT_EQ(HealthOf(server, "natgrad.checkpoints"), HealthCheckResponse::SERVING);
    server.Kill();  // SIGKILL: only what was written survives
  }
  ServerProcess restarted(flags);
  ASSERT_TRUE(restarted.running());
  client::Client client = ClientOf(restarted);
  auto got = client.GetSession(name);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->last_step(), 4);
  auto stream = *client.OpenStream(name);
  auto replay = stream->StepNumbered(4, Inputs(4));
  ASSERT_TRUE(replay.ok()) << replay.status();
  EXPECT_EQ(replay->updates(0).delta().SerializeAsString(), reference[3]);
  for (int t = 5; t <= 6; ++t) {
    auto r = stream->StepNumbered(t, Inputs(t));
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->updates(0).delta().SerializeAsString(), reference[t - 1]) << "step " << t;
  }
}

TEST(DiskFull, CreateAndImportAreRefusedAndLeaveNothingBehind) {
  const std::string dir = MakeTempDir("ngfullc");
  const std::vector<std::string> flags = {"--checkpoint_dir=" + dir};
  std::string kept;
  {
    ServerProcess server(flags);
    ASSERT_TRUE(server.running());
    client::Client client = ClientOf(server, /*max_retries=*/0);
    auto first = client.CreateSession(Config(), "kept");
    ASSERT_TRUE(first.ok()) << first.status();
    kept = first->name();
    auto snapshot = client.ExportSession(kept);
    ASSERT_TRUE(snapshot.ok()) << snapshot.status();
    const std::vector<std::string> files_before = Files(dir);

    SetFileSizeLimit(server.pid(), kDiskFull);
    auto created = client.CreateSession(Config(), "refused");
    ASSERT_FALSE(created.ok());
    EXPECT_EQ(created.status().code(), absl::StatusCode::kUnavailable) << created.status();
    EXPECT_THAT(created.status().message(),
                AllOf(HasSubstr("checkpoint of sessions/refused failed"),
                      HasSubstr("File too large"), HasSubstr("not created")));
    auto imported = client.ImportSession(*snapshot, "refused-import");
    ASSERT_FALSE(imported.ok());
    EXPECT_EQ(imported.status().code(), absl::StatusCode::kUnavailable) << imported.status();
    EXPECT_THAT(imported.status().message(), HasSubstr("not created"));

    auto listed = client.ListSessions();
    ASSERT_TRUE(listed.ok()) << listed.status();
    ASSERT_EQ(listed->size(), 1u);
    EXPECT_EQ((*listed)[0].name(), kept);
    EXPECT_EQ(client.GetSession("sessions/refused").status().code(),
              absl::StatusCode::kNotFound);
    EXPECT_EQ(Files(dir), files_before);  // no file, not even a temporary one

    // Once the disk recovers the id is free and the session is durable.
    SetFileSizeLimit(server.pid(), RLIM_INFINITY);
    ASSERT_TRUE(client.CreateSession(Config(), "refused").ok());
    server.Kill();
  }
  ServerProcess restarted(flags);
  ASSERT_TRUE(restarted.running());
  auto listed = ClientOf(restarted).ListSessions();
  ASSERT_TRUE(listed.ok()) << listed.status();
  std::vector<std::string> names;
  for (const auto& s : *listed) names.push_back(s.name());
  EXPECT_THAT(names, ::testing::UnorderedElementsAre(kept, "sessions/refused"));
}

// 20 sessions step with a checkpoint before every response and the periodic
// writer running; each is deleted while its steps are in flight (twice over,
// 40 sessions in all). Before the fix some came back at every restart: a step
// already past the deleted check, or the periodic writer, rewrote the file
// after DeleteSession had removed it.
TEST(DeletedSessions, NeverComeBackAfterARestart) {
  constexpr int kSessions = 20, kRounds = 2, kMaxSteps = 5000;
  const std::string dir = MakeTempDir("ngdel");
  // As many workers as sessions: every session's step is in the server at
  // once, so a delete is likely to land inside one.
  const std::vector<std::string> flags = {"--checkpoint_dir=" + dir,
                                          "--checkpoint_every_steps=1",
                                          "--checkpoint_interval_s=1", "--worker_threads=20"};
  {
    ServerProcess server(flags);
    ASSERT_TRUE(server.running());
    client::Client admin = ClientOf(server);
    for (int round = 0; round < kRounds; ++round) {
      std::vector<std::string> names;
      for (int i = 0; i < kSessions; ++i) {
        auto s = admin.CreateSession(KfacConfig());
        ASSERT_TRUE(s.ok()) << s.status();
        names.push_back(s->name());
      }
      std::vector<std::atomic<int>> done(kSessions);
      std::vector<absl::Status> ended(kSessions);
      std::vector<std::thread> steppers;
      for (int i = 0; i < kSessions; ++i) {
        steppers.emplace_back([&, i] {
          client::Client client = ClientOf(server);
          auto stream = client.OpenStream(names[i]);
          if (!stream.ok()) {
            ended[i] = stream.status();
            return;
          }
          // Until the delete stops it (bounded, in case it never does).
          for (int t = 1; t <= kMaxSteps; ++t) {
            auto r = (*stream)->Step(KfacInputs(t));
            if (!r.ok()) {
              ended[i] = r.status();
              return;
            }
            done[i].fetch_add(1);
          }
          ended[i] = absl::DeadlineExceededError("never deleted");
        });
      }
      for (int i = 0; i < kSessions; ++i) {
        // Its stream is stepping, so the delete lands among in-flight steps.
        EXPECT_TRUE(PollUntil([&] { return done[i].load() >= 2; }, std::chrono::seconds(60)))
            << names[i] << " did not step";
        absl::Status deleted = admin.DeleteSession(names[i]);
        EXPECT_TRUE(deleted.ok()) << names[i] << ": " << deleted;
      }
      for (auto& t : steppers) t.join();
      for (int i = 0; i < kSessions; ++i) {
        EXPECT_EQ(ended[i].code(), absl::StatusCode::kNotFound) << names[i] << ": " << ended[i];
      }
      // No write may come after a removal, not even the periodic writer's.
      EXPECT_THAT(Files(dir), IsEmpty()) << "round " << round;
    }
    server.Kill();
  }
  ServerProcess restarted(flags);
  ASSERT_TRUE(restarted.running());
  auto listed = ClientOf(restarted).ListSessions();
  ASSERT_TRUE(listed.ok()) << listed.status();
  std::vector<std::string> back;
  for (const auto& s : *listed) back.push_back(s.name());
  EXPECT_THAT(back, IsEmpty());
}

}  // namespace
}  // namespace natgrad::testing
