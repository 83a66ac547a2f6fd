// Shampoo sessions whose blocks split into many same-size factors, through a
// real server over loopback: 1 and N sessions at once, with the engine
// batching (max_batch 64) and one-at-a-time (max_batch 1). Every step
// refreshes (precondition_frequency 1), so each step submits 2 * tiles eigh
// jobs. Reports decompositions per second and step latency p50/p99.
//
//   shampoo_session_bench [--dim=256] [--block=32] [--steps=20] [--sessions=1,8]
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

ABSL_FLAG(int64_t, dim, 256, "the parameter is dim x dim");
ABSL_FLAG(int64_t, block, 32, "max_preconditioner_dim (tiles of block x block)");
ABSL_FLAG(int, steps, 20, "timed steps per session (after 2 warm-up steps)");
ABSL_FLAG(std::string, sessions, "1,8", "comma-separated concurrent session counts");
ABSL_FLAG(std::string, max_batch, "64,1", "comma-separated engine max_batch values");

namespace {

natgrad::v1::SessionConfig Config(int64_t dim, int64_t block) {
  natgrad::v1::SessionConfig c;
  auto* b = c.add_blocks();
  b->set_name("w");
  b->add_shape(dim);
  b->add_shape(dim);
  auto* s = b->mutable_shampoo();
  s->mutable_learning_rate()->mutable_constant()->set_value(1e-3);
  s->set_max_preconditioner_dim(block);
  s->set_precondition_frequency(1);
  s->set_epsilon(1e-6);
  return c;
}

natgrad::bench::SessionBenchResult Run(int max_batch, int sessions, int64_t dim, int64_t block,
                                       int steps) {
  return natgrad::bench::RunConcurrentSessions(
      max_batch, sessions, steps, Config(dim, block), [&](const std::function<float()>& normal) {
        std::vector<float> g(dim * dim);
        for (auto& x : g) x = normal();
        natgrad::v1::BlockStep s;
        s.set_name("w");
        *s.mutable_gradient() = natgrad::client::MakeTensor(g, {dim, dim});
        return std::vector<natgrad::v1::BlockStep>{std::move(s)};
      });
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  const int64_t dim = absl::GetFlag(FLAGS_dim), block = absl::GetFlag(FLAGS_block);
  const int steps = absl::GetFlag(FLAGS_steps);
  const int64_t tiles = ((dim + block - 1) / block) * ((dim + block - 1) / block);
  std::printf("shampoo %lld x %lld, max_preconditioner_dim %lld: %lld tiles, %lld eigh of "
              "%lld x %lld per step and session; %u hardware threads\n",
              (long long)dim, (long long)dim, (long long)block, (long long)tiles,
              (long long)(2 * tiles), (long long)block, (long long)block,
              std::thread::hardware_concurrency());
  std::printf("%-10s %-9s %12s %10s %10s %10s\n", "max_batch", "sessions", "matrices/s",
              "steps/s", "p50 ms", "p99 ms");
  for (absl::string_view mb : absl::StrSplit(absl::GetFlag(FLAGS_max_batch), ',')) {
    for (absl::string_view sn : absl::StrSplit(absl::GetFlag(FLAGS_sessions), ',')) {
      const int max_batch = std::stoi(std::string(mb)), sessions = std::stoi(std::string(sn));
      const natgrad::bench::SessionBenchResult r = Run(max_batch, sessions, dim, block, steps);
      const double total_steps = double(sessions) * steps;
      std::printf("%-10d %-9d %12.0f %10.1f %10.2f %10.2f\n", max_batch, sessions,
                  total_steps * 2 * tiles / r.wall_s, total_steps / r.wall_s, r.Percentile(0.5),
                  r.Percentile(0.99));
      std::fflush(stdout);
    }
  }
  return 0;
}
