// The /metrics endpoint cannot be stalled (issue 11): slow clients that send
// a request head one byte at a time neither delay concurrent scrapes nor keep
// natgrad-server from exiting on SIGTERM. Assertions are on completion and
// ordering (the scrape finishes while the slow client is still sending; the
// process exits before the slow client would have finished), with generous
// bounds, never on measured latencies.
#include <arpa/inet.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <memory>
#include <thread>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/ops/http_get.h"
#include "tests/ops/ops_util.h"
#include "tests/ops/server_process.h"

namespace natgrad::testing {
namespace {

// Sends "GET /metrics" with a long padding header one byte per `interval`,
// on its own thread, until done, stopped, or the server closes the socket.
class SlowClient {
 public:
  SlowClient(int port, std::chrono::milliseconds interval) {
    request_ = "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + std::string(80, 'a') +
               "\r\n\r\n";
    fd_ = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(port);
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    connected_ = connect(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0;
    thread_ = std::thread([this, interval] {
      for (size_t i = 0; i < request_.size() && !stop_; ++i) {
        if (send(fd_, &request_[i], 1, MSG_NOSIGNAL) != 1) {
          closed_by_server_ = true;
          return;
        }
        ++sent_;
        // Waits out the interval, noticing a close by the server at once.
        // (an answer or a close before the request is complete both mean
        // the server ended it).
        pollfd p{fd_, POLLIN, 0};
        if (poll(&p, 1, static_cast<int>(interval.count())) > 0) {
          closed_by_server_ = true;
          return;
        }
      }
      finished_ = !stop_;
    });
  }
  ~SlowClient() {
    stop_ = true;
    thread_.join();
    close(fd_);
  }
  bool connected() const { return connected_; }
  int sent() const { return sent_; }
  bool finished() const { return finished_; }
  bool closed_by_server() const { return closed_by_server_; }

 private:
  std::string request_;
  int fd_ = -1;
  bool connected_ = false;
  std::atomic<bool> stop_{false}, finished_{false}, closed_by_server_{false};
  std::atomic<int> sent_{0};
  std::thread thread_;
};

TEST(MetricsEndpoint, SlowClientsDoNotDelayScrapesAndAreCutAtTheDeadline) {
  const std::string mfile = MakeTempDir("ngmep") + "/mport";
  ServerProcess server({"--metrics_address=127.0.0.1:0", "--metrics_port_file=" + mfile,
                        "--metrics_request_timeout=3s"});
  ASSERT_TRUE(server.running());
  const int port = ReadPort(mfile);
  ASSERT_GT(port, 0);
  // Each needs over a minute for its request at one byte per 0.5 s.
  std::vector<std::unique_ptr<SlowClient>> slow;
  for (int i = 0; i < 3; ++i) {
    slow.push_back(std::make_unique<SlowClient>(port, std::chrono::milliseconds(500)));
    ASSERT_TRUE(slow.back()->connected());
  }
  ASSERT_TRUE(PollUntil([&] { return slow.back()->sent() >= 2; }, std::chrono::seconds(30)));
  for (int i = 0; i < 5; ++i) {
    auto body = HttpGet(port, "/metrics");  // a 10 s receive timeout bounds it
    ASSERT_TRUE(body.has_value()) << "scrape " << i;
    EXPECT_THAT(*body, ::testing::HasSubstr("natgrad_sessions"));
  }
  // The scrapes completed while the slow clients were still sending...
  for (const auto& s : slow) EXPECT_FALSE(s->finished());
  // ...and the whole-request deadline ends them long before they finish.
  for (const auto& s : slow) {
    EXPECT_TRUE(PollUntil([&] { return s->closed_by_server(); }, std::chrono::seconds(40)));
    EXPECT_FALSE(s->finished());
  }
}

TEST(MetricsEndpoint, SigtermExitsWhileASlowClientIsConnected) {
  const std::string mfile = MakeTempDir("ngmep") + "/mport";
  // A deadline far beyond the test: only shutdown can end the slow client.
  ServerProcess server({"--metrics_address=127.0.0.1:0", "--metrics_port_file=" + mfile,
                        "--metrics_request_timeout=600s", "--shutdown_grace_s=1"});
  ASSERT_TRUE(server.running());
  SlowClient slow(ReadPort(mfile), std::chrono::milliseconds(500));
  ASSERT_TRUE(slow.connected());
  ASSERT_TRUE(PollUntil([&] { return slow.sent() >= 2; }, std::chrono::seconds(30)));
  server.Signal(SIGTERM);
  auto code = server.WaitExit(std::chrono::seconds(30));
  ASSERT_TRUE(code.has_value()) << "natgrad-server did not exit after SIGTERM";
  EXPECT_EQ(*code, 0);
  // It exited before the slow client got its request out.
  EXPECT_FALSE(slow.finished());
}

}  // namespace
}  // namespace natgrad::testing
