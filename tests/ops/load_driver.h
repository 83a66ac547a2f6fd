// A bounded load on a real natgrad-server (issue 11): well-behaved sessions
// stepping from a few client threads, plus one client that never reads its
// responses and one that never finishes a step, while the server's RSS is
// sampled. Shared by tests/ops/bounded_memory_test.cc (short, in CTest) and
// bench/load/memory_load_bench.cc (longer, prints the figures).
#ifndef NATGRAD_TESTS_OPS_LOAD_DRIVER_H_
#define NATGRAD_TESTS_OPS_LOAD_DRIVER_H_

#include <sys/types.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <fstream>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "client/cpp/natgrad_client.h"
#include "client/cpp/tensor.h"

namespace natgrad::testing {

// Resident set size of `pid` in bytes (VmRSS), 0 if unreadable.
inline int64_t RssBytes(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("VmRSS:", 0) == 0) {
      std::istringstream fields(line.substr(6));
      int64_t kb = 0;
      fields >> kb;
      return kb * 1024;
    }
  }
  return 0;
}

struct LoadOptions {
  std::string target;
  pid_t server_pid = 0;
  int sessions = 64;
  int client_threads = 4;
  int dim = 256;  // each session: sgd [dim, dim] with momentum + adam [dim]
  std::chrono::milliseconds duration{10000};
  std::chrono::milliseconds rss_every{100};
};

struct LoadResult {
  int64_t good_steps = 0;
  int64_t good_errors = 0;
  std::string first_error;
  // idle: before any session; start: sessions created, no step yet.
  int64_t rss_idle = 0, rss_start = 0, rss_max = 0, rss_end = 0;
  int64_t never_reading_writes = 0;  // steps the non-reading client got out
  int64_t partial_timeouts = 0;      // DEADLINE_EXCEEDED seen by the stalling client
  std::string stalled_status;        // the last status the stalling client saw
};

inline natgrad::v1::SessionConfig LoadConfig(int dim) {
  natgrad::v1::SessionConfig c;
  auto* w = c.add_blocks();
  w->set_name("w");
  w->add_shape(dim);
  w->add_shape(dim);
  w->mutable_sgd()->mutable_learning_rate()->mutable_constant()->set_value(1e-3);
  w->mutable_sgd()->mutable_momentum()->mutable_constant()->set_value(0.9);
  auto* b = c.add_blocks();
  b->set_name("b");
  b->add_shape(dim);
  b->mutable_adam();
  return c;
}

inline std::vector<natgrad::v1::BlockStep> LoadStep(int dim, int64_t step) {
  std::vector<float> g(static_cast<size_t>(dim) * dim), gb(dim);
  for (size_t i = 0; i < g.size(); ++i) g[i] = static_cast<float>((i + step) % 7) * 0.01f;
  for (int i = 0; i < dim; ++i) gb[i] = static_cast<float>((i + step) % 5) * 0.01f;
  std::vector<natgrad::v1::BlockStep> blocks(2);
  blocks[0].set_name("w");
  *blocks[0].mutable_gradient() = client::MakeTensor(g, {dim, dim});
  blocks[1].set_name("b");
  *blocks[1].mutable_gradient() = client::MakeTensor(gb, {dim});
  return blocks;
}

inline LoadResult RunLoad(const LoadOptions& o) {
  LoadResult result;
  client::ClientOptions co;
  co.target = o.target;
  client::Client admin(co);
  result.rss_idle = RssBytes(o.server_pid);
  std::vector<std::string> names;
  for (int i = 0; i < o.sessions + 1; ++i) {
    auto s = admin.CreateSession(LoadConfig(o.dim));
    if (!s.ok()) {
      result.good_errors++;
      result.first_error = "create: " + s.status().ToString();
      return result;
    }
    names.push_back(s->name());
  }
  const std::string never_reading_session = names.back();
  names.pop_back();
  const std::string stalling_session = [&] {
    auto s = admin.CreateSession(LoadConfig(o.dim));
    return s.ok() ? s->name() : std::string();
  }();
  result.rss_start = RssBytes(o.server_pid);

  std::atomic<bool> stop{false};
  std::mutex mu;
  std::vector<std::thread> threads;
  // Well-behaved: each thread drives its share of the sessions round-robin,
  // one open stream per session.
  for (int t = 0; t < o.client_threads; ++t) {
    threads.emplace_back([&, t] {
      client::Client c(co);
      std::vector<std::unique_ptr<client::SessionStream>> streams;
      for (size_t i = t; i < names.size(); i += o.client_threads) {
        auto s = c.OpenStream(names[i]);
        if (s.ok()) streams.push_back(*std::move(s));
      }
      int64_t steps = 0, errors = 0;
      std::string first;
      while (!stop.load()) {
        for (auto& s : streams) {
          auto r = s->Step(LoadStep(o.dim, s->next_step()));
          if (r.ok()) {
            ++steps;
          } else {
            ++errors;
            if (first.empty()) first = s->name() + ": " + r.status().ToString();
          }
        }
      }
      for (auto& s : streams) {
        absl::Status closed = s->Close();
        if (!closed.ok()) {
          ++errors;
          if (first.empty()) first = "close: " + closed.ToString();
        }
      }
      std::lock_guard<std::mutex> lock(mu);
      result.good_steps += steps;
      result.good_errors += errors;
      if (result.first_error.empty()) result.first_error = first;
    });
  }
  // Never reads a response: writes complete steps until its writes block
  // (the server stopped reading) and the context is cancelled at the end.
  client::Client never_reader(co);
  grpc::ClientContext never_ctx;
  threads.emplace_back([&] {
    auto stream = never_reader.stub().Step(&never_ctx);
    int64_t n = 0;
    while (!stop.load()) {
      natgrad::v1::StepRequest r;
      r.set_session(never_reading_session);
      r.set_step(n + 1);
      r.set_last(true);
      for (auto& b : LoadStep(o.dim, n + 1)) *r.add_blocks() = std::move(b);
      if (!stream->Write(r)) break;
      ++n;
    }
    std::lock_guard<std::mutex> lock(mu);
    result.never_reading_writes = n;
  });
  // Never finishes a step: one message without `last`, then waits for the
  // server to end the stream (--partial_step_timeout), and again.
  threads.emplace_back([&] {
    client::Client c(co);
    int64_t timeouts = 0;
    std::string last;
    while (!stop.load() && !stalling_session.empty()) {
      grpc::ClientContext ctx;
      auto stream = c.stub().Step(&ctx);
      natgrad::v1::StepRequest r;
      r.set_session(stalling_session);
      r.set_step(1);
      auto blocks = LoadStep(o.dim, 1);
      *r.add_blocks() = std::move(blocks[0]);
      stream->Write(r);
      natgrad::v1::StepResponse resp;
      while (stream->Read(&resp)) {
      }
      grpc::Status s = stream->Finish();
      if (s.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED) ++timeouts;
      last = std::to_string(s.error_code()) + " " + s.error_message();
    }
    std::lock_guard<std::mutex> lock(mu);
    result.partial_timeouts = timeouts;
    result.stalled_status = last;
  });

  // RSS sampling at a fixed period; it measures, it does not synchronise.
  const auto end = std::chrono::steady_clock::now() + o.duration;
  while (std::chrono::steady_clock::now() < end) {
    result.rss_max = std::max(result.rss_max, RssBytes(o.server_pid));
    std::this_thread::sleep_for(o.rss_every);
  }
  stop = true;
  never_ctx.TryCancel();
  for (auto& t : threads) t.join();
  result.rss_end = RssBytes(o.server_pid);
  result.rss_max = std::max(result.rss_max, result.rss_end);
  return result;
}

}  // namespace natgrad::testing

#endif  // NATGRAD_TESTS_OPS_LOAD_DRIVER_H_
