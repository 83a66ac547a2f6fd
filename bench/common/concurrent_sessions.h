// The driver shared by the session benches (bench/shampoo, bench/soap): a real
// server over loopback with a given engine max_batch, N sessions stepping at
// once from their own threads, each step timed at the client. Header only: a
// bench target includes it and links natgrad_service and natgrad_client.
#ifndef NATGRAD_BENCH_COMMON_CONCURRENT_SESSIONS_H_
#define NATGRAD_BENCH_COMMON_CONCURRENT_SESSIONS_H_

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "client/cpp/natgrad_client.h"
#include "server/service/natgrad_server.h"

namespace natgrad::bench {

struct SessionBenchResult {
  std::vector<double> latencies_ms;  // every timed step of every session, sorted
  double wall_s = 0;                 // from all sessions' first timed step to the last one's end

  // The q-quantile of the step latencies (nearest rank).
  double Percentile(double q) const {
    return latencies_ms[std::min(latencies_ms.size() - 1, size_t(q * double(latencies_ms.size())))];
  }
};

// One step's blocks; normal() draws from the session's own N(0, 1) stream
// (seeded by the session's index, so runs repeat).
using MakeStep =
    std::function<std::vector<natgrad::v1::BlockStep>(const std::function<float()>& normal)>;

// Each session takes 2 warm-up steps, then all start together on `steps`
// timed ones. Exits on any failure: a bench has no one to report to.
inline SessionBenchResult RunConcurrentSessions(int max_batch, int sessions, int steps,
                                                const natgrad::v1::SessionConfig& config,
                                                const MakeStep& make_step) {
  using Clock = std::chrono::steady_clock;
  natgrad::service::ServerOptions so;
  so.address = "127.0.0.1:0";
  so.engine.backend = "cpu";
  so.engine.max_batch = max_batch;
  auto server = natgrad::service::NatgradServer::Start(so);
  if (!server.ok()) {
    std::fprintf(stderr, "server: %s\n", std::string(server.status().message()).c_str());
    std::exit(1);
  }
  natgrad::client::ClientOptions co;
  co.target = "127.0.0.1:" + std::to_string((*server)->port());
  std::vector<std::vector<double>> lat(sessions);
  std::vector<std::thread> threads;
  std::atomic<int> ready{0};
  Clock::time_point start;
  std::atomic<bool> go{false};
  for (int i = 0; i < sessions; ++i) {
    threads.emplace_back([&, i] {
      natgrad::client::Client client(co);
      auto session = client.CreateSession(config);
      auto stream = client.OpenStream(session->name());
      std::mt19937 rng(i);
      std::normal_distribution<float> nd;
      const std::function<float()> normal = [&] { return nd(rng); };
      auto step = [&] {
        std::vector<natgrad::v1::BlockStep> msgs = make_step(normal);
        auto t0 = Clock::now();
        auto r = (*stream)->Step(msgs);
        if (!r.ok()) {
          std::fprintf(stderr, "step: %s\n", std::string(r.status().message()).c_str());
          std::exit(1);
        }
        return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
      };
      for (int w = 0; w < 2; ++w) step();
      ++ready;
      while (!go.load()) std::this_thread::yield();
      for (int t = 0; t < steps; ++t) lat[i].push_back(step());
    });
  }
  while (ready.load() < sessions) std::this_thread::yield();
  start = Clock::now();
  go = true;
  for (auto& t : threads) t.join();
  SessionBenchResult r;
  r.wall_s = std::chrono::duration<double>(Clock::now() - start).count();
  for (auto& l : lat) r.latencies_ms.insert(r.latencies_ms.end(), l.begin(), l.end());
  std::sort(r.latencies_ms.begin(), r.latencies_ms.end());
  return r;
}

}  // namespace natgrad::bench

#endif  // NATGRAD_BENCH_COMMON_CONCURRENT_SESSIONS_H_
