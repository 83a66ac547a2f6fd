// Runs tests/ops/load_driver.h for longer and prints the server's RSS:
//   memory_load_bench --seconds=30 --sessions=64 --threads=4 --budget_mib=256
// The server is the real binary (NATGRAD_SERVER overrides the built one).
#include <cstdio>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "tests/ops/load_driver.h"
#include "tests/ops/server_process.h"

ABSL_FLAG(int, seconds, 30, "Length of the run");
ABSL_FLAG(int, sessions, 64, "Well-behaved sessions");
ABSL_FLAG(int, threads, 4, "Client threads driving them");
ABSL_FLAG(int, dim, 256, "Each session: sgd [dim, dim] + adam [dim]");
ABSL_FLAG(int64_t, budget_mib, 96, "--memory_budget_bytes of the server, in MiB");
ABSL_FLAG(std::string, partial_step_timeout, "2s", "--partial_step_timeout of the server");

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  const int64_t budget = absl::GetFlag(FLAGS_budget_mib) << 20;
  natgrad::testing::ServerProcess server(
      {"--memory_budget_bytes=" + std::to_string(budget),
       "--partial_step_timeout=" + absl::GetFlag(FLAGS_partial_step_timeout),
       "--worker_threads=2", "--compute_threads=1", "--log_level=warning"});
  if (!server.running()) {
    std::fprintf(stderr, "memory_load_bench: the server did not start\n");
    return 1;
  }
  natgrad::testing::LoadOptions o;
  o.target = server.target();
  o.server_pid = server.pid();
  o.sessions = absl::GetFlag(FLAGS_sessions);
  o.client_threads = absl::GetFlag(FLAGS_threads);
  o.dim = absl::GetFlag(FLAGS_dim);
  o.duration = std::chrono::seconds(absl::GetFlag(FLAGS_seconds));
  const natgrad::testing::LoadResult r = natgrad::testing::RunLoad(o);
  std::printf("sessions %d x (sgd [%d,%d] + adam [%d]), %d client threads, %d s\n", o.sessions,
              o.dim, o.dim, o.dim, o.client_threads, absl::GetFlag(FLAGS_seconds));
  std::printf("well-behaved steps %lld (%.1f/s), errors %lld%s%s\n",
              static_cast<long long>(r.good_steps),
              r.good_steps / static_cast<double>(absl::GetFlag(FLAGS_seconds)),
              static_cast<long long>(r.good_errors), r.first_error.empty() ? "" : ": ",
              r.first_error.c_str());
  std::printf("server RSS: idle %.1f MiB, sessions created %.1f MiB, max %.1f MiB, end %.1f MiB; "
              "max above idle %.1f MiB, budget %.0f MiB\n",
              r.rss_idle / 1048576.0, r.rss_start / 1048576.0, r.rss_max / 1048576.0,
              r.rss_end / 1048576.0, (r.rss_max - r.rss_idle) / 1048576.0, budget / 1048576.0);
  std::printf("non-reading client wrote %lld steps before blocking; stalling client ended by "
              "the server %lld times (last: %s)\n",
              static_cast<long long>(r.never_reading_writes),
              static_cast<long long>(r.partial_timeouts), r.stalled_status.c_str());
  return r.good_errors == 0 && r.rss_max - r.rss_idle < budget ? 0 : 2;
}
