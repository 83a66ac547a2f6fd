// A real Prometheus (Debian's `prometheus`) scrapes natgrad-server, and the
// natgrad_ series are read back through Prometheus's HTTP API (issue 7).
#include <spawn.h>

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

TEST(Prometheus, ScrapesNatgradSeries) {
  const char* prom = "/usr/bin/prometheus";
  ASSERT_EQ(access(prom, X_OK), 0) << "Debian package `prometheus` (scripts/setup installs it)";
  const std::string mfile = MakeTempDir("ngpromport") + "/mport";
  ServerProcess server({"--metrics_address=127.0.0.1:0", "--metrics_port_file=" + mfile});
  ASSERT_TRUE(server.running());
  const int mport = ReadPort(mfile);
  // Some traffic so that step counters exist.
  client::ClientOptions co;
  co.target = server.target();
  client::Client client(co);
  natgrad::v1::SessionConfig c;
  auto* b = c.add_blocks();
  b->set_name("w");
  b->add_shape(3);
  b->mutable_adam();
  auto session = client.CreateSession(c);
  auto stream = *client.OpenStream(session->name());
  std::vector<float> g = {1, 2, 3};
  natgrad::v1::BlockStep step;
  step.set_name("w");
  *step.mutable_gradient() = client::MakeTensor(g, {3});
  for (int t = 0; t < 3; ++t) ASSERT_TRUE(stream->Step({step}).ok());

  const std::string dir = MakeTempDir("ngprom");
  std::ofstream(dir + "/prometheus.yml")
      << "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
      << "scrape_configs:\n  - job_name: natgrad\n    static_configs:\n"
      << "      - targets: ['127.0.0.1:" << mport << "']\n";
  const int pport = FreePort();
  std::vector<std::string> args = {prom,
                                   "--config.file=" + dir + "/prometheus.yml",
                                   "--storage.tsdb.path=" + dir + "/data",
                                   "--web.listen-address=127.0.0.1:" + std::to_string(pport),
                                   "--log.level=error"};
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  pid_t pid;
  ASSERT_EQ(posix_spawn(&pid, prom, nullptr, nullptr, argv.data(), environ), 0);

  // Bounded wait for the first scrape to land (scrape interval 1 s).
  std::string found;
  for (int i = 0; i < 600 && found.empty(); ++i) {
    auto body = HttpGet(pport, "/api/v1/query?query=natgrad_steps_total");
    if (body.has_value() && body->find("\"outcome\":\"ok\"") != std::string::npos) {
      found = *body;
    } else {
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
  }
  auto up = HttpGet(pport, "/api/v1/query?query=up%7Bjob%3D%22natgrad%22%7D");
  kill(pid, SIGTERM);
  waitpid(pid, nullptr, 0);
  ASSERT_FALSE(found.empty()) << "Prometheus never returned natgrad_steps_total";
  EXPECT_THAT(found, ::testing::HasSubstr("\"job\":\"natgrad\""));
  EXPECT_THAT(found, ::testing::HasSubstr("\"3\""));  // three ok steps
  ASSERT_TRUE(up.has_value());
  EXPECT_THAT(*up, ::testing::HasSubstr("\"1\""));
}

}  // namespace
}  // namespace natgrad::testing
