// The server's memory stays bounded under a hostile mix of clients (issue
// 11): 64 well-behaved sessions stepping from four client threads, one
// client that never reads its responses and one that never finishes a step,
// against the real binary with --memory_budget_bytes. The server's RSS stays
// within the budget of its idle RSS (the budget bounds data, not the fixed
// overhead of the libraries the process maps) and no well-behaved step
// fails. Short here (10 s); the
// figures of a longer run come from bench/load/memory_load_bench.
#include <cstdio>

#include "gtest/gtest.h"
#include "tests/ops/load_driver.h"
#include "tests/ops/server_process.h"

namespace natgrad::testing {
namespace {

// 65 sessions are charged about 56 MiB (state, cached replies, overhead),
// their steps in flight up to 17 MiB more.
constexpr int64_t kBudget = int64_t{96} << 20;

TEST(BoundedMemory, HostileClientsDoNotGrowTheServerOrHurtOthers) {
  ServerProcess server({"--memory_budget_bytes=" + std::to_string(kBudget),
                        "--partial_step_timeout=2s", "--worker_threads=2",
                        "--compute_threads=1", "--log_level=warning"});
  ASSERT_TRUE(server.running());
  LoadOptions o;
  o.target = server.target();
  o.server_pid = server.pid();
  o.duration = std::chrono::seconds(10);
  const LoadResult r = RunLoad(o);
  std::printf("bounded_memory: %lld good steps, RSS idle %.1f MiB start %.1f MiB max %.1f MiB "
              "end %.1f MiB (budget %.0f MiB), non-reading client wrote %lld steps, stalling "
              "client timed out %lld times\n",
              static_cast<long long>(r.good_steps), r.rss_idle / 1048576.0, r.rss_start / 1048576.0,
              r.rss_max / 1048576.0, r.rss_end / 1048576.0, kBudget / 1048576.0,
              static_cast<long long>(r.never_reading_writes),
              static_cast<long long>(r.partial_timeouts));
  EXPECT_EQ(r.good_errors, 0) << r.first_error;
  EXPECT_GT(r.good_steps, 64);
  EXPECT_GT(r.rss_idle, 0);
  EXPECT_LT(r.rss_max - r.rss_idle, kBudget);
  // The stalling client was ended by the server's idle timer, not let hang.
  EXPECT_GE(r.partial_timeouts, 1) << r.stalled_status;
  // Backpressure: the non-reading client could not push an unbounded number
  // of steps into a server that stopped reading it (it would otherwise
  // write one step per round trip for the whole run).
  EXPECT_LT(r.never_reading_writes, 1000);
}

}  // namespace
}  // namespace natgrad::testing
