// SOAP sessions of many same-size blocks through a real server over
// loopback: 1 and N sessions at once, the engine batching (max_batch 64) and
// one-at-a-time (max_batch 1). Every step refreshes every block's two bases
// (precondition_frequency 1): with --refresh=eigh each refresh is two eigh
// jobs through the engine; with power_qr it is one power-iteration step and
// a QR per side inside the block (no engine jobs after the first step).
// Reports refreshed bases per second and step latency p50/p99.
//
//   soap_session_bench [--dim=64] [--blocks=16] [--steps=20] [--sessions=1,8]
//                      [--max_batch=64,1] [--refresh=eigh,power_qr]
#include <algorithm>
#include <cstdio>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_split.h"
#include "bench/common/concurrent_sessions.h"
#include "client/cpp/natgrad_client.h"
#include "client/cpp/tensor.h"

ABSL_FLAG(int64_t, dim, 64, "each block is dim x dim");
ABSL_FLAG(int64_t, blocks, 16, "soap blocks per session");
ABSL_FLAG(std::string, refresh, "eigh,power_qr", "comma-separated refresh methods");
ABSL_FLAG(int, steps, 20, "timed steps per session (after 2 warm-up steps)");
ABSL_FLAG(std::string, sessions, "1,8", "comma-separated concurrent session counts");
ABSL_FLAG(std::string, max_batch, "64,1", "comma-separated engine max_batch values");

namespace {

natgrad::v1::SessionConfig Config(int64_t dim, int64_t blocks, bool eigh) {
  natgrad::v1::SessionConfig c;
  for (int64_t i = 0; i < blocks; ++i) {
    auto* b = c.add_blocks();
    b->set_name("w" + std::to_string(i));
    b->add_shape(dim);
    b->add_shape(dim);
    auto* s = b->mutable_soap();
    s->mutable_weight_decay()->mutable_constant()->set_value(0);
    s->set_precondition_frequency(1);
    s->set_refresh(eigh ? natgrad::v1::SOAP_REFRESH_EIGH : natgrad::v1::SOAP_REFRESH_POWER_QR);
  }
  return c;
}

natgrad::bench::SessionBenchResult Run(int max_batch, int sessions, int64_t dim, int64_t blocks,
                                       bool eigh, int steps) {
  return natgrad::bench::RunConcurrentSessions(
      max_batch, sessions, steps, Config(dim, blocks, eigh),
      [&](const std::function<float()>& normal) {
        std::vector<natgrad::v1::BlockStep> msgs;
        for (int64_t b = 0; b < blocks; ++b) {
          std::vector<float> g(dim * dim);
          for (auto& x : g) x = normal();
          natgrad::v1::BlockStep s;
          s.set_name("w" + std::to_string(b));
          *s.mutable_gradient() = natgrad::client::MakeTensor(g, {dim, dim});
          msgs.push_back(std::move(s));
        }
        return msgs;
      });
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  const int64_t dim = absl::GetFlag(FLAGS_dim), blocks = absl::GetFlag(FLAGS_blocks);
  const int steps = absl::GetFlag(FLAGS_steps);
  std::printf(
      "soap: %lld blocks of %lld x %lld per session, every step refreshes both bases "
      "of every block; %u hardware threads\n",
      (long long)blocks, (long long)dim, (long long)dim, std::thread::hardware_concurrency());
  std::printf("%-9s %-10s %-9s %12s %10s %10s %10s\n", "refresh", "max_batch", "sessions",
              "matrices/s", "steps/s", "p50 ms", "p99 ms");
  for (absl::string_view method : absl::StrSplit(absl::GetFlag(FLAGS_refresh), ',')) {
    const bool eigh = method == "eigh";
    const std::vector<std::string> batches = absl::StrSplit(absl::GetFlag(FLAGS_max_batch), ',');
    for (const std::string& mb : batches) {
      // The power_qr refresh does not use the engine after the first step.
      if (!eigh && mb != batches.front()) continue;
      for (absl::string_view sn : absl::StrSplit(absl::GetFlag(FLAGS_sessions), ',')) {
        const int max_batch = std::stoi(mb), sessions = std::stoi(std::string(sn));
        const natgrad::bench::SessionBenchResult r =
            Run(max_batch, sessions, dim, blocks, eigh, steps);
        const double total_steps = double(sessions) * steps;
        std::printf("%-9s %-10d %-9d %12.0f %10.1f %10.2f %10.2f\n", std::string(method).c_str(),
                    max_batch, sessions, total_steps * 2 * blocks / r.wall_s,
                    total_steps / r.wall_s, r.Percentile(0.5), r.Percentile(0.99));
        std::fflush(stdout);
      }
    }
  }
  return 0;
}
