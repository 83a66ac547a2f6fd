// GET /metrics in Prometheus text format, served by prometheus-cpp's own
// Exposer (Debian's prometheus-cpp-pull, on civetweb). civetweb serves each
// connection on one of a pool of worker threads and bounds the time to read a
// whole request head (request_timeout_ms, counted from the first byte, not
// per read), so a slow client holds one worker for at most that long and
// never delays other scrapes; stopping sets civetweb's stop flag, which its
// socket waits check at least every 2 s, so shutdown never waits on a client.
//
// civetweb's mg_start used to return null inside natgrad-server (not in a
// small program): Debian's civetweb gives its threads a fixed 100 KiB stack,
// too small for the static TLS of the libraries natgrad-server loads, so
// pthread_create failed. metrics_http_server.cc explains the fix.
#ifndef NATGRAD_SERVER_SERVICE_METRICS_HTTP_SERVER_H_
#define NATGRAD_SERVER_SERVICE_METRICS_HTTP_SERVER_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "prometheus/registry.h"

namespace prometheus {
class Exposer;
}

namespace natgrad::service {

struct MetricsHttpOptions {
  // Whole-request deadline: the request head must arrive within this.
  absl::Duration request_timeout = absl::Seconds(5);
  // Concurrent connections served; more wait in civetweb's queue.
  int threads = 8;
};

class MetricsHttpServer {
 public:
  // `address` is host:port (port 0 picks a free one; an empty host means all
  // IPv4 interfaces).
  static absl::StatusOr<std::unique_ptr<MetricsHttpServer>> Start(
      const std::string& address, std::shared_ptr<prometheus::Registry> registry,
      MetricsHttpOptions options = {});
  ~MetricsHttpServer();

  int port() const { return port_; }

 private:
  MetricsHttpServer() = default;
  std::unique_ptr<prometheus::Exposer> exposer_;
  std::shared_ptr<prometheus::Registry> registry_;
  int port_ = 0;
};

}  // namespace natgrad::service

#endif  // NATGRAD_SERVER_SERVICE_METRICS_HTTP_SERVER_H_
