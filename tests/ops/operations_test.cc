// What an operator sees of the real natgrad-server binary (issue 12):
// grpc.health.v1 for "" and for the service name, the natgrad_build_info
// metric on /metrics, and one log line per session created/deleted and per
// failed step, filtered by --log_level.
#include <fstream>
#include <optional>
#include <regex>
#include <string>
#include <vector>

#include "client/cpp/natgrad_client.h"
#include "client/cpp/tensor.h"
#include "gmock/gmock.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "tests/ops/http_get.h"
#include "tests/ops/server_process.h"

namespace natgrad::testing {
namespace {

using ::grpc::health::v1::Health;
using ::grpc::health::v1::HealthCheckRequest;
using ::grpc::health::v1::HealthCheckResponse;
using ::testing::AllOf;
using ::testing::Contains;
using ::testing::HasSubstr;
using ::testing::Not;

grpc::Status Check(Health::Stub& stub, const std::string& service, HealthCheckResponse* out) {
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  HealthCheckRequest request;
  request.set_service(service);
  return stub.Check(&context, request, out);
}

TEST(Health, ServingForTheServerAndForTheServiceName) {
  ServerProcess server({});
  ASSERT_TRUE(server.running());
  auto channel = grpc::CreateChannel(server.target(), grpc::InsecureChannelCredentials());
  auto stub = Health::NewStub(channel);
  for (const std::string service : {"", "natgrad.v1.OptimizerService"}) {
    HealthCheckResponse response;
    grpc::Status status = Check(*stub, service, &response);
    ASSERT_TRUE(status.ok()) << "\"" << service << "\": " << status.error_message();
    EXPECT_EQ(response.status(), HealthCheckResponse::SERVING) << "\"" << service << "\"";
  }
  // A name the server does not serve stays unknown (as the protocol says).
  HealthCheckResponse response;
  EXPECT_EQ(Check(*stub, "natgrad.v1.NoSuchService", &response).error_code(),
            grpc::StatusCode::NOT_FOUND);
}

// OpenBLAS reads OPENBLAS_THREAD_TIMEOUT only when it loads, so the server
// executes itself again with it set (server/linalg/openblas_environment.h):
// same pid, same name, and an operator's own value kept.
std::string ProcFile(pid_t pid, const std::string& file) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/" + file, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

std::vector<std::string> EnvironmentOf(pid_t pid) {
  std::vector<std::string> out;
  std::string all = ProcFile(pid, "environ");
  for (size_t at = 0; at < all.size();) {
    const size_t end = all.find('\0', at);
    out.push_back(all.substr(at, end - at));
    if (end == std::string::npos) break;
    at = end + 1;
  }
  return out;
}

// Sets (or, with nullptr, unsets) an environment variable for a scope, for
// the server processes started in it.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    const char* had = std::getenv(name);
    if (had != nullptr) saved_ = had;
    if (value != nullptr) {
      setenv(name, value, 1);
    } else {
      unsetenv(name);
    }
  }
  ~ScopedEnv() {
    if (saved_) {
      setenv(name_, saved_->c_str(), 1);
    } else {
      unsetenv(name_);
    }
  }

 private:
  const char* name_;
  std::optional<std::string> saved_;
};

TEST(OpenBlas, TheServerRunsWithQuietWorkersAndKeepsAnOperatorsSetting) {
  {
    ScopedEnv unset("OPENBLAS_THREAD_TIMEOUT", nullptr);
    ServerProcess server({});
    ASSERT_TRUE(server.running());  // it serves after the exec
    EXPECT_THAT(EnvironmentOf(server.pid()), Contains("OPENBLAS_THREAD_TIMEOUT=4"));
    EXPECT_EQ(ProcFile(server.pid(), "comm"), "natgrad-server\n");
  }
  ScopedEnv operators("OPENBLAS_THREAD_TIMEOUT", "9");
  ServerProcess server({});
  ASSERT_TRUE(server.running());
  EXPECT_THAT(EnvironmentOf(server.pid()), Contains("OPENBLAS_THREAD_TIMEOUT=9"));
  EXPECT_THAT(EnvironmentOf(server.pid()), Not(Contains("OPENBLAS_THREAD_TIMEOUT=4")));
}

// /metrics of a server process started for it (with this process's
// environment); nullopt when it did not serve.
std::optional<std::string> MetricsOfAFreshServer() {
  const int mport = FreePort();
  ServerProcess server({"--metrics_address=127.0.0.1:" + std::to_string(mport)});
  if (!server.running()) return std::nullopt;
  return HttpGet(mport, "/metrics");
}

// natgrad_blas_info names the kernels OpenBLAS runs and why: an operator's
// OPENBLAS_CORETYPE (Prescott: SSE3, in every x86-64 DYNAMIC_ARCH build)
// is what the server then runs and says it was told to.
TEST(Metrics, BlasInfoGaugeNamesTheKernelsAndTheEnvironmentsChoice) {
  ScopedEnv coretype("OPENBLAS_CORETYPE", "Prescott");
  const std::optional<std::string> body = MetricsOfAFreshServer();
  ASSERT_TRUE(body.has_value());
  const std::regex line(
      "(^|\n)natgrad_blas_info\\{config=\"(OpenBLAS[^\"]*)\",core=\"([^\"]*)\","
      "coretype_env=\"([^\"]*)\"\\} 1(\n|$)");
  std::smatch m;
  ASSERT_TRUE(std::regex_search(*body, m, line)) << *body;
  EXPECT_EQ(m[3].str(), "Prescott");
  EXPECT_EQ(m[4].str(), "Prescott");
  EXPECT_THAT(*body, HasSubstr("# TYPE natgrad_blas_info gauge"));
}

TEST(Metrics, BuildInfoGauge) {
  const std::optional<std::string> body = MetricsOfAFreshServer();
  ASSERT_TRUE(body.has_value());
  // One series, value 1; labels in prometheus-cpp's (sorted) order.
  const std::regex line(
      "(^|\n)natgrad_build_info\\{build_type=\"([^\"]*)\",cuda=\"(on|off)\","
      "git_commit=\"([0-9a-f]{7,40}|unknown)\",version=\"([^\"]*)\"\\} 1(\n|$)");
  std::smatch m;
  ASSERT_TRUE(std::regex_search(*body, m, line)) << *body;
  EXPECT_EQ(m[2].str(), NATGRAD_EXPECTED_BUILD_TYPE);
  EXPECT_EQ(m[5].str(), NATGRAD_EXPECTED_VERSION);
  EXPECT_THAT(*body, HasSubstr("# TYPE natgrad_build_info gauge"));
  // Exactly one natgrad_build_info sample.
  const std::string rest = m.suffix().str();
  EXPECT_THAT(rest, Not(HasSubstr("\nnatgrad_build_info{")));
}

void RemoveLog(const std::string& path) {
  unlink(path.c_str());
  rmdir(path.substr(0, path.rfind('/')).c_str());
}

std::vector<std::string> ReadLines(const std::string& path) {
  std::ifstream in(path);
  std::vector<std::string> lines;
  for (std::string l; std::getline(in, l);) lines.push_back(l);
  return lines;
}

// Creates a session, applies one step, sends a step naming an unknown block
// (rejected), then deletes the session. Returns the session's name.
std::string SessionLifecycle(const ServerProcess& server) {
  client::ClientOptions co;
  co.target = server.target();
  co.max_retries = 0;
  client::Client client(co);
  natgrad::v1::SessionConfig c;
  auto* b = c.add_blocks();
  b->set_name("w");
  b->add_shape(2);
  b->mutable_sgd();
  auto session = client.CreateSession(c);
  EXPECT_TRUE(session.ok()) << session.status();
  if (!session.ok()) return "";
  {
    auto stream = client.OpenStream(session->name());
    EXPECT_TRUE(stream.ok());
    natgrad::v1::BlockStep step;
    step.set_name("w");
    *step.mutable_gradient() = client::MakeTensor(std::vector<float>{1, 2}, {2});
    EXPECT_TRUE((*stream)->Step({step}).ok());
    step.set_name("not_a_block");
    auto rejected = (*stream)->Step({step});
    EXPECT_EQ(rejected.status().code(), absl::StatusCode::kInvalidArgument) << rejected.status();
  }
  EXPECT_TRUE(client.DeleteSession(session->name()).ok());
  // A failed unary call (debug level only).
  EXPECT_EQ(client.GetSession(session->name()).status().code(), absl::StatusCode::kNotFound);
  return session->name();
}

const char kLinePrefix[] =
    "[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\\.[0-9]{6}Z "
    "(debug|info|warning|error) natgrad-server: .*";

// Runs the lifecycle against a server at `level`; its log lines, after a
// clean SIGTERM shutdown.
std::vector<std::string> LogAt(const std::string& level, std::string* session) {
  const std::string log = MakeTempDir("nglog") + "/stderr";
  ServerProcess server({"--log_level=" + level}, log);
  EXPECT_TRUE(server.running());
  if (!server.running()) return {};
  *session = SessionLifecycle(server);
  server.Signal(SIGTERM);
  EXPECT_EQ(server.WaitExit(std::chrono::seconds(60)), std::optional<int>(0));
  auto lines = ReadLines(log);
  for (const auto& l : lines) EXPECT_THAT(l, ::testing::MatchesRegex(kLinePrefix));
  RemoveLog(log);
  return lines;
}

auto Created(const std::string& s) {
  return AllOf(HasSubstr(" info natgrad-server: session " + s + " created"), HasSubstr("blocks=1"));
}
auto Deleted(const std::string& s) {
  return AllOf(HasSubstr(" info natgrad-server: session " + s + " deleted"),
               HasSubstr("last_step=1"));
}
auto StepFailed(const std::string& s) {
  return AllOf(HasSubstr(" warning natgrad-server: step failed: code=INVALID_ARGUMENT session=" + s +
                         " step=2"),
               HasSubstr("not_a_block"));
}
auto UnaryFailed() {
  return AllOf(HasSubstr(" debug natgrad-server: rpc /natgrad.v1.OptimizerService/GetSession failed"),
               HasSubstr("code=NOT_FOUND"));
}

TEST(Logging, InfoLogsSessionsAndFailedSteps) {
  std::string s;
  auto lines = LogAt("info", &s);
  ASSERT_FALSE(s.empty());
  EXPECT_THAT(lines, Contains(Created(s)).Times(1));
  EXPECT_THAT(lines, Contains(Deleted(s)).Times(1));
  EXPECT_THAT(lines, Contains(StepFailed(s)).Times(1));
  EXPECT_THAT(lines, Not(Contains(UnaryFailed())));
  EXPECT_THAT(lines, Contains(HasSubstr("info natgrad-server: listening on port ")));
  EXPECT_THAT(lines, Contains(HasSubstr("info natgrad-server: stopped")));
}

TEST(Logging, DebugAddsFailedUnaryCalls) {
  std::string s;
  auto lines = LogAt("debug", &s);
  EXPECT_THAT(lines, Contains(Created(s)).Times(1));
  EXPECT_THAT(lines, Contains(StepFailed(s)).Times(1));
  EXPECT_THAT(lines, Contains(UnaryFailed()).Times(1));
}

TEST(Logging, WarningKeepsOnlyFailedSteps) {
  std::string s;
  auto lines = LogAt("warning", &s);
  ASSERT_FALSE(s.empty());
  EXPECT_THAT(lines, Contains(StepFailed(s)).Times(1));
  EXPECT_THAT(lines, Not(Contains(HasSubstr(" info "))));
  EXPECT_THAT(lines, Not(Contains(HasSubstr(" debug "))));
}

TEST(Logging, ErrorIsSilentForClientErrors) {
  std::string s;
  auto lines = LogAt("error", &s);
  ASSERT_FALSE(s.empty());
  EXPECT_THAT(lines, ::testing::IsEmpty());
}

TEST(Logging, UnknownLevelIsAUsageError) {
  const std::string log = MakeTempDir("nglog") + "/stderr";
  ServerProcess server({"--log_level=verbose"}, log);
  EXPECT_FALSE(server.running());
  auto lines = ReadLines(log);
  RemoveLog(log);
  EXPECT_THAT(lines, Contains(AllOf(HasSubstr("error natgrad-server: --log_level"),
                                    HasSubstr("verbose"))));
}

}  // namespace
}  // namespace natgrad::testing
