// What the end-to-end benches share: a natgrad-server in this process on
// 127.0.0.1:0 with the CPU inversion engine, the client options that reach
// it, the median of a sample, this process's CPU time and the machine's
// load. Header only: a bench includes it and links natgrad_service and
// natgrad_client. A bench has no one to report to, so failures exit.
#ifndef NATGRAD_BENCH_COMMON_LOOPBACK_SERVER_H_
#define NATGRAD_BENCH_COMMON_LOOPBACK_SERVER_H_

#include <stdlib.h>
#include <sys/resource.h>

#include <algorithm>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "client/cpp/natgrad_client.h"
#include "server/service/natgrad_server.h"

namespace natgrad::bench {

// `options` with its address and engine backend replaced; exits if it does
// not start.
inline std::unique_ptr<service::NatgradServer> StartLoopbackServer(
    service::ServerOptions options = {}) {
  options.address = "127.0.0.1:0";
  options.engine.backend = "cpu";
  auto server = service::NatgradServer::Start(options);
  if (!server.ok()) {
    std::fprintf(stderr, "server: %s\n", server.status().ToString().c_str());
    std::exit(1);
  }
  return *std::move(server);
}

inline client::ClientOptions LoopbackClientOptions(const service::NatgradServer& server) {
  client::ClientOptions o;
  o.target = "127.0.0.1:" + std::to_string(server.port());
  return o;
}

// The median (the mean of the middle two for an even count); v non-empty.
inline double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 == 1 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// CPU seconds of this process: server, client and gRPC threads together.
inline double ProcessCpuSeconds() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return u.ru_utime.tv_sec + u.ru_stime.tv_sec + 1e-6 * (u.ru_utime.tv_usec + u.ru_stime.tv_usec);
}

// The 1-minute load average (-1 when unknown).
inline double LoadAverage() {
  double load[1] = {0};
  return getloadavg(load, 1) == 1 ? load[0] : -1;
}

}  // namespace natgrad::bench

#endif  // NATGRAD_BENCH_COMMON_LOOPBACK_SERVER_H_
