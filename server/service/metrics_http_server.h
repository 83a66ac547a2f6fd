// A minimal HTTP/1.1 listener serving GET /metrics in Prometheus text format
// from a prometheus-cpp registry. Debian's civetweb-based Exposer fails to
// start inside natgrad-server (mg_start returns null after binding), so the
// server uses this small, dependency-free listener instead.
#ifndef NATGRAD_SERVER_SERVICE_METRICS_HTTP_SERVER_H_
#define NATGRAD_SERVER_SERVICE_METRICS_HTTP_SERVER_H_

#include <atomic>
#include <memory>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "prometheus/registry.h"

namespace natgrad::service {

class MetricsHttpServer {
 public:
  // `address` is host:port (port 0 picks a free one).
  static absl::StatusOr<std::unique_ptr<MetricsHttpServer>> Start(
      const std::string& address, std::shared_ptr<prometheus::Registry> registry);
  ~MetricsHttpServer();

  int port() const { return port_; }

 private:
  MetricsHttpServer() = default;
  void Serve();
  void Handle(int fd);

  std::shared_ptr<prometheus::Registry> registry_;
  int listen_fd_ = -1;
  int port_ = 0;
  std::atomic<bool> stopping_{false};
  std::thread thread_;
};

}  // namespace natgrad::service

#endif  // NATGRAD_SERVER_SERVICE_METRICS_HTTP_SERVER_H_
