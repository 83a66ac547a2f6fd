#include "server/service/metrics_http_server.h"

#include <arpa/inet.h>
#include <dlfcn.h>
#include <netdb.h>
#include <pthread.h>
#include <sys/socket.h>

#include <algorithm>
#include <cstring>
#include <exception>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "prometheus/exposer.h"

namespace natgrad::service {
namespace {

// host:port -> the numeric "ip:port" civetweb's listening_ports wants.
absl::StatusOr<std::string> NumericAddress(const std::string& address) {
  const size_t colon = address.rfind(':');
  int port = 0;
  if (colon == std::string::npos || !absl::SimpleAtoi(address.substr(colon + 1), &port) ||
      port < 0 || port > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("--metrics_address: \"", address, "\" is not host:port"));
  }
  std::string host = address.substr(0, colon);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
    host = host.substr(1, host.size() - 2);
  }
  if (host.empty()) host = "0.0.0.0";
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE;
  addrinfo* found = nullptr;
  if (::getaddrinfo(host.c_str(), nullptr, &hints, &found) != 0 || found == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("--metrics_address: cannot resolve ", host));
  }
  char ip[INET6_ADDRSTRLEN] = {};
  std::string out;
  if (found->ai_family == AF_INET6) {
    ::inet_ntop(AF_INET6, &reinterpret_cast<sockaddr_in6*>(found->ai_addr)->sin6_addr, ip,
                sizeof(ip));
    out = absl::StrCat("[", ip, "]:", port);
  } else {
    ::inet_ntop(AF_INET, &reinterpret_cast<sockaddr_in*>(found->ai_addr)->sin_addr, ip,
                sizeof(ip));
    out = absl::StrCat(ip, ":", port);
  }
  ::freeaddrinfo(found);
  return out;
}

}  // namespace

// Debian's civetweb creates every thread with a fixed 100 KiB stack (its
// compile-time USE_STACK_SIZE). glibc places the static TLS of all initially
// loaded libraries on each thread's stack, and natgrad-server's (OpenBLAS
// 60 KiB, and with the CUDA backend cuBLASLt/cuSOLVER about 150 KiB more)
// does not fit, so pthread_create fails with EINVAL and mg_start returns null
// ("Cannot create threads"). This interposes pthread_attr_setstacksize for
// callers inside libcivetweb only and gives them a normal 1 MiB stack; every
// other caller gets glibc's function unchanged.
extern "C" int pthread_attr_setstacksize(pthread_attr_t* attr, size_t size) {
  using Fn = int (*)(pthread_attr_t*, size_t);
  static const Fn real = reinterpret_cast<Fn>(dlsym(RTLD_NEXT, "pthread_attr_setstacksize"));
  constexpr size_t kCivetwebStack = size_t{1} << 20;
  Dl_info info{};
  if (size < kCivetwebStack && dladdr(__builtin_return_address(0), &info) != 0 &&
      info.dli_fname != nullptr && std::strstr(info.dli_fname, "libcivetweb") != nullptr) {
    size = kCivetwebStack;
  }
  return real(attr, size);
}

absl::StatusOr<std::unique_ptr<MetricsHttpServer>> MetricsHttpServer::Start(
    const std::string& address, std::shared_ptr<prometheus::Registry> registry,
    MetricsHttpOptions options) {
  auto numeric = NumericAddress(address);
  if (!numeric.ok()) return numeric.status();
  auto server = std::unique_ptr<MetricsHttpServer>(new MetricsHttpServer());
  server->registry_ = std::move(registry);
  const std::vector<std::string> civet_options = {
      "listening_ports", *numeric,
      "num_threads", std::to_string(std::max(1, options.threads)),
      "request_timeout_ms",
      std::to_string(std::max<int64_t>(1, absl::ToInt64Milliseconds(options.request_timeout))),
      // One request per connection: an idle keep-alive client holds no worker.
      "enable_keep_alive", "no",
  };
  try {
    server->exposer_ = std::make_unique<prometheus::Exposer>(civet_options);
  } catch (const std::exception& e) {
    return absl::UnavailableError(
        absl::StrCat("--metrics_address ", address, " (", *numeric, "): ", e.what()));
  }
  server->exposer_->RegisterCollectable(server->registry_);
  const std::vector<int> ports = server->exposer_->GetListeningPorts();
  if (ports.empty()) {
    return absl::UnavailableError(absl::StrCat("--metrics_address ", address, ": not listening"));
  }
  server->port_ = ports.front();
  return server;
}

MetricsHttpServer::~MetricsHttpServer() = default;

}  // namespace natgrad::service
