// ComputePool: every index exactly once, the caller and the workers both
// take part, concurrent and nested callers, and no threads started after
// construction (counted in /proc/self/task).
#include "server/linalg/compute_pool.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <filesystem>
#include <mutex>
#include <set>
#include <thread>
#include <vector>

#include "gtest/gtest.h"

namespace natgrad::linalg {
namespace {

int ThreadsInProcess() {
  int n = 0;
  for (const auto& entry : std::filesystem::directory_iterator("/proc/self/task")) {
    (void)entry;
    ++n;
  }
  return n;
}

TEST(ComputePool, ParallelismCountsTheCaller) {
  EXPECT_EQ(ComputePool(1).parallelism(), 1);
  EXPECT_EQ(ComputePool(3).parallelism(), 3);
  const int hw = std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
  EXPECT_EQ(ComputePool(0).parallelism(), hw);
  EXPECT_EQ(ComputePool(-2).parallelism(), hw);
  EXPECT_EQ(Parallelism(nullptr), 1);
  ComputePool pool(4);
  EXPECT_EQ(Parallelism(&pool), 4);
}

TEST(ComputePool, StartsItsWorkersOnceAtConstruction) {
  const int before = ThreadsInProcess();
  ComputePool pool(4);
  EXPECT_EQ(ThreadsInProcess(), before + 3);
}

TEST(ComputePool, CoversEveryIndexExactlyOnce) {
  for (int parallelism : {1, 2, 5}) {
    ComputePool pool(parallelism);
    for (size_t n : {0u, 1u, 2u, 3u, 7u, 64u, 1000u}) {
      std::vector<std::atomic<int>> hits(n);
      pool.ParallelFor(n, [&](size_t i) { hits[i].fetch_add(1); });
      for (size_t i = 0; i < n; ++i) {
        ASSERT_EQ(hits[i].load(), 1) << "parallelism " << parallelism << " n " << n
                                     << " index " << i;
      }
    }
  }
}

// Two indices that each wait until both have started can only finish when
// two threads run them at once: the caller and a worker.
TEST(ComputePool, CallerAndWorkerRunTogether) {
  ComputePool pool(2);
  std::mutex mu;
  std::condition_variable cv;
  int started = 0;
  std::set<std::thread::id> ids;
  pool.ParallelFor(2, [&](size_t) {
    std::unique_lock<std::mutex> lock(mu);
    ids.insert(std::this_thread::get_id());
    ++started;
    cv.notify_all();
    cv.wait(lock, [&] { return started == 2; });
  });
  EXPECT_EQ(ids.size(), 2u);
  EXPECT_TRUE(ids.count(std::this_thread::get_id()));
}

TEST(ComputePool, ConcurrentCallersEachGetTheirOwnJob) {
  ComputePool pool(3);
  constexpr int kCallers = 6, kRounds = 200;
  constexpr size_t kN = 37;
  std::vector<int> wrong(kCallers, 0);
  std::vector<std::thread> callers;
  for (int c = 0; c < kCallers; ++c) {
    callers.emplace_back([&, c] {
      for (int r = 0; r < kRounds; ++r) {
        std::vector<std::atomic<int>> hits(kN);
        pool.ParallelFor(kN, [&](size_t i) { hits[i].fetch_add(c + 1); });
        for (size_t i = 0; i < kN; ++i) wrong[c] += hits[i].load() != c + 1;
      }
    });
  }
  for (std::thread& t : callers) t.join();
  for (int c = 0; c < kCallers; ++c) EXPECT_EQ(wrong[c], 0) << "caller " << c;
}

TEST(ComputePool, NestedCallsFinish) {
  ComputePool pool(3);
  constexpr size_t kOuter = 8, kInner = 16;
  std::vector<std::atomic<int>> hits(kOuter * kInner);
  pool.ParallelFor(kOuter, [&](size_t i) {
    pool.ParallelFor(kInner, [&](size_t j) { hits[i * kInner + j].fetch_add(1); });
  });
  for (size_t k = 0; k < hits.size(); ++k) ASSERT_EQ(hits[k].load(), 1) << k;
}

TEST(ComputePool, ManyCallsStartNoThreads) {
  ComputePool pool(3);
  const int after_construction = ThreadsInProcess();
  std::atomic<size_t> total{0};
  for (int r = 0; r < 2000; ++r) {
    pool.ParallelFor(5, [&](size_t i) { total.fetch_add(i); });
  }
  EXPECT_EQ(total.load(), 2000u * 10u);
  EXPECT_EQ(ThreadsInProcess(), after_construction);
}

// Indices are handed out in increasing order: once index f has been seen to
// fail, a caller that skips every index above it still runs every index
// below it (what the Gaussian block relies on for a deterministic error).
TEST(ComputePool, SkippingPastAFailureStillRunsEveryEarlierIndex) {
  ComputePool pool(3);
  for (int trial = 0; trial < 50; ++trial) {
    constexpr size_t kN = 200, kFail = 123;
    std::atomic<size_t> first_fail{kN};
    std::vector<std::atomic<int>> ran(kN);
    pool.ParallelFor(kN, [&](size_t i) {
      if (i > first_fail.load()) return;
      ran[i].store(1);
      if (i == kFail || i == kFail + 40) {
        size_t cur = first_fail.load();
        while (i < cur && !first_fail.compare_exchange_weak(cur, i)) {
        }
      }
    });
    ASSERT_EQ(first_fail.load(), kFail);
    for (size_t i = 0; i <= kFail; ++i) ASSERT_EQ(ran[i].load(), 1) << i;
  }
}

}  // namespace
}  // namespace natgrad::linalg
