// A real natgrad server in-process on port 0 plus a C++ client (Envoy style:
// hermetic, no sleeps, real servers).
#ifndef NATGRAD_TESTS_SERVICE_SERVER_FIXTURE_H_
#define NATGRAD_TESTS_SERVICE_SERVER_FIXTURE_H_

#include <memory>
#include <random>
#include <string>
#include <vector>

#include "client/cpp/natgrad_client.h"
#include "client/cpp/tensor.h"
#include "gtest/gtest.h"
#include "server/service/natgrad_server.h"

namespace natgrad::testing {

inline std::unique_ptr<service::NatgradServer> StartServer(
    service::ServerOptions options = {}) {
  options.address = "127.0.0.1:0";
  options.engine.backend = "cpu";
  auto server = service::NatgradServer::Start(std::move(options));
  EXPECT_TRUE(server.ok()) << server.status();
  return server.ok() ? *std::move(server) : nullptr;
}

inline client::ClientOptions ClientFor(const service::NatgradServer& server) {
  client::ClientOptions o;
  o.target = "127.0.0.1:" + std::to_string(server.port());
  o.initial_backoff = absl::Milliseconds(5);
  return o;
}

inline std::vector<double> RandomVector(std::mt19937& rng, size_t n, double scale = 1.0) {
  std::normal_distribution<double> normal(0.0, scale);
  std::vector<double> v(n);
  for (auto& x : v) x = normal(rng);
  return v;
}

inline natgrad::v1::Schedule Constant(double v) {
  natgrad::v1::Schedule s;
  s.mutable_constant()->set_value(v);
  return s;
}

}  // namespace natgrad::testing

#endif  // NATGRAD_TESTS_SERVICE_SERVER_FIXTURE_H_
