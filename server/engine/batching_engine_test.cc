#include "server/engine/batching_engine.h"

#include <atomic>
#include <condition_variable>
#include <future>
#include <limits>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "server/engine/cpu_backend.h"
#include "server/engine/engine_factory.h"
#include "server/engine/engine_test_util.h"

namespace natgrad::engine {
namespace {

using ::natgrad::engine::testing::ExpectEighMatches;
using ::natgrad::engine::testing::ExpectInverseMatches;
using ::natgrad::engine::testing::RandomSpd;
using ::natgrad::engine::testing::SingularPsd;

constexpr int64_t kForever = int64_t{3600} * 1000 * 1000;  // 1 h window

std::unique_ptr<BatchingInversionEngine> CpuEngine(EngineOptions options) {
  return std::make_unique<BatchingInversionEngine>(
      std::make_unique<CpuBackend>(CpuBackendOptions{options.cpu_threads, options.threaded_blas_min_n}),
      std::move(options));
}

class CountingObserver : public EngineObserver {
 public:
  void OnBatch(const BatchEvent& e) override {
    std::lock_guard<std::mutex> lock(mu);
    batches.push_back(e.batch_size);
    EXPECT_EQ(e.backend, "cpu");
  }
  void OnJob(const JobEvent& e) override {
    std::lock_guard<std::mutex> lock(mu);
    ++jobs;
    codes.push_back(e.code);
    EXPECT_GE(e.total_seconds, e.queue_seconds);
  }
  std::mutex mu;
  std::vector<int> batches;
  std::vector<absl::StatusCode> codes;
  int jobs = 0;
};

TEST(BatchingEngineTest, MixedSizesDtypesAndKindsFromManyThreads) {
  EngineOptions options;
  options.batch_window_us = 300;
  options.max_batch = 8;
  auto engine = CpuEngine(options);
  EXPECT_EQ(engine->backend_name(), "cpu");
  constexpr int kThreads = 8;
  constexpr int kPerThread = 6;
  const int sizes[] = {1, 5, 32, 90};
  std::vector<std::thread> threads;
  std::atomic<int> checked{0};
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      struct F32 { Eigen::MatrixXf a; DecompositionKind k; DecompositionFuture<float> f; };
      struct F64 { Eigen::MatrixXd a; DecompositionKind k; DecompositionFuture<double> f; };
      std::vector<F32> f32;
      std::vector<F64> f64;
      // Submit everything first so jobs from all threads overlap in the queue.
      for (int j = 0; j < kPerThread; ++j) {
        const int n = sizes[(t + j) % 4];
        const uint32_t seed = 1000 * t + j;
        const auto kind = (j % 3 == 0) ? DecompositionKind::kCholeskyInverse
                                        : DecompositionKind::kEigh;
        if ((t + j) % 2 == 0) {
          Eigen::MatrixXf a = RandomSpd<float>(n, seed);
          f32.push_back({a, kind, engine->Submit(a, kind)});
        } else {
          Eigen::MatrixXd a = RandomSpd<double>(n, seed);
          f64.push_back({a, kind, engine->Submit(a, kind)});
        }
      }
      auto check = [&](auto& job) {
        auto r = job.f.get();
        ASSERT_TRUE(r.ok()) << r.status();
        if (job.k == DecompositionKind::kEigh) {
          ExpectEighMatches(job.a, *r);
        } else {
          ExpectInverseMatches(job.a, *r);
        }
        ++checked;
      };
      for (auto& j : f32) check(j);
      for (auto& j : f64) check(j);
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(checked.load(), kThreads * kPerThread);
  const EngineStats s = engine->stats();
  EXPECT_EQ(s.jobs_submitted, kThreads * kPerThread);
  EXPECT_EQ(s.jobs_succeeded, kThreads * kPerThread);
  EXPECT_EQ(s.batched_jobs, kThreads * kPerThread);
  EXPECT_LE(s.max_batch_size, 8);
  EXPECT_EQ(s.pending, 0);
}

// Deterministic batching: the engine is paused while 8 threads queue 64 jobs
// of one group, so on Resume it must form exactly 64 / max_batch full batches.
TEST(BatchingEngineTest, ConcurrentSubmissionsArePausedAndBatched) {
  auto observer = std::make_shared<CountingObserver>();
  EngineOptions options;
  options.batch_window_us = 0;
  options.max_batch = 16;
  options.observer = observer;
  auto engine = CpuEngine(options);
  engine->Pause();
  std::vector<std::vector<DecompositionFuture<float>>> futures(8);
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      for (int j = 0; j < 8; ++j) {
        futures[t].push_back(
            engine->Submit(RandomSpd<float>(24, 10 * t + j), DecompositionKind::kEigh));
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(engine->stats().pending, 64);
  engine->Resume();
  for (auto& per_thread : futures) {
    for (auto& f : per_thread) EXPECT_TRUE(f.get().ok());
  }
  const EngineStats s = engine->stats();
  EXPECT_EQ(s.batches, 4);
  EXPECT_EQ(s.max_batch_size, 16);
  engine->Shutdown();  // observer calls are done once the dispatcher is joined
  EXPECT_EQ(observer->batches, (std::vector<int>{16, 16, 16, 16}));
  EXPECT_EQ(observer->jobs, 64);
}

// Deterministic without a pause: with a one-hour window a group can only be
// dispatched by reaching max_batch, so 8 concurrent jobs make one batch.
TEST(BatchingEngineTest, FullGroupIsDispatchedBeforeTheWindow) {
  EngineOptions options;
  options.batch_window_us = kForever;
  options.max_batch = 8;
  auto engine = CpuEngine(options);
  std::vector<DecompositionFuture<double>> futures(8);
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      futures[t] = engine->Submit(RandomSpd<double>(16, t), DecompositionKind::kCholeskyInverse);
    });
  }
  for (auto& t : threads) t.join();
  for (auto& f : futures) EXPECT_TRUE(f.get().ok());
  EXPECT_EQ(engine->stats().batches, 1);
  EXPECT_EQ(engine->stats().max_batch_size, 8);
}

TEST(BatchingEngineTest, GroupsAreKeyedBySizeDtypeAndKind) {
  EngineOptions options;
  options.batch_window_us = kForever;
  options.max_batch = 100;
  auto engine = CpuEngine(options);
  engine->Pause();
  auto a = engine->Submit(RandomSpd<float>(8, 1), DecompositionKind::kEigh);
  auto b = engine->Submit(RandomSpd<float>(8, 2), DecompositionKind::kEigh);
  auto c = engine->Submit(RandomSpd<float>(9, 3), DecompositionKind::kEigh);
  auto d = engine->Submit(RandomSpd<double>(8, 4), DecompositionKind::kEigh);
  auto e = engine->Submit(RandomSpd<float>(8, 5), DecompositionKind::kCholeskyInverse);
  // Shutdown flushes (drain) regardless of window and pause.
  engine->Shutdown();
  for (auto* f : {&a, &b, &c, &e}) EXPECT_TRUE(f->get().ok());
  EXPECT_TRUE(d.get().ok());
  EXPECT_EQ(engine->stats().batches, 4);
  EXPECT_EQ(engine->stats().max_batch_size, 2);
}

TEST(BatchingEngineTest, NanJobFailsAloneWhileBatchMatesSucceed) {
  EngineOptions options;
  options.max_batch = 64;
  auto engine = CpuEngine(options);
  engine->Pause();
  std::vector<Eigen::MatrixXf> inputs;
  std::vector<DecompositionFuture<float>> futures;
  for (int i = 0; i < 6; ++i) {
    Eigen::MatrixXf a = RandomSpd<float>(20, 50 + i);
    if (i == 3) a(4, 7) = std::numeric_limits<float>::quiet_NaN();
    inputs.push_back(a);
    futures.push_back(engine->Submit(a, DecompositionKind::kEigh));
  }
  engine->Resume();
  for (int i = 0; i < 6; ++i) {
    auto r = futures[i].get();
    if (i == 3) {
      EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
    } else {
      ASSERT_TRUE(r.ok()) << r.status();
      ExpectEighMatches(inputs[i], *r);
    }
  }
  const EngineStats s = engine->stats();
  EXPECT_EQ(s.batches, 1);
  EXPECT_EQ(s.jobs_failed, 1);
  EXPECT_EQ(s.jobs_succeeded, 5);
}

TEST(BatchingEngineTest, SingularCholeskyJobIsRetriedAndSucceeds) {
  auto engine = CpuEngine({});
  engine->Pause();
  auto good = engine->Submit(RandomSpd<double>(30, 1), DecompositionKind::kCholeskyInverse);
  auto singular =
      engine->Submit(SingularPsd<double>(30, 10, 2), DecompositionKind::kCholeskyInverse);
  auto singular_f =
      engine->Submit(SingularPsd<float>(30, 10, 3), DecompositionKind::kCholeskyInverse);
  engine->Resume();
  auto g = good.get();
  ASSERT_TRUE(g.ok());
  EXPECT_EQ(g->retries, 0);
  auto s = singular.get();
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_GE(s->retries, 1);
  EXPECT_TRUE(s->matrix.allFinite());
  auto sf = singular_f.get();
  ASSERT_TRUE(sf.ok()) << sf.status();
  EXPECT_GE(sf->retries, 1);
  EXPECT_GE(engine->stats().retries, 2);
}

TEST(BatchingEngineTest, ShutdownDrainsQueuedJobs) {
  EngineOptions options;
  options.batch_window_us = kForever;
  auto engine = CpuEngine(options);
  engine->Pause();
  std::vector<DecompositionFuture<float>> futures;
  for (int i = 0; i < 20; ++i) {
    futures.push_back(engine->Submit(RandomSpd<float>(10 + i % 3, i), DecompositionKind::kEigh));
  }
  engine->Shutdown();
  for (auto& f : futures) EXPECT_TRUE(f.get().ok());
  auto late = engine->Submit(RandomSpd<float>(4, 1), DecompositionKind::kEigh);
  EXPECT_EQ(late.get().status().code(), absl::StatusCode::kCancelled);
}

TEST(BatchingEngineTest, ShutdownWithoutDrainCancelsQueuedJobs) {
  EngineOptions options;
  options.drain_on_shutdown = false;
  auto engine = CpuEngine(options);
  engine->Pause();
  std::vector<DecompositionFuture<double>> futures;
  for (int i = 0; i < 20; ++i) {
    futures.push_back(engine->Submit(RandomSpd<double>(12, i), DecompositionKind::kEigh));
  }
  engine.reset();  // destructor: Shutdown + join
  for (auto& f : futures) {
    EXPECT_EQ(f.get().status().code(), absl::StatusCode::kCancelled);
  }
}

// Blocks inside Run until released, so a test can hold a batch in flight.
class GateBackend : public InversionBackend {
 public:
  absl::string_view name() const override { return "gate"; }
  void Run(DecompositionKind kind, absl::Span<BatchJob<float>> jobs) override {
    Wait();
    for (auto& j : jobs) j.result = DecomposeLapack<float>(std::move(j.matrix), kind);
  }
  void Run(DecompositionKind kind, absl::Span<BatchJob<double>> jobs) override {
    Wait();
    for (auto& j : jobs) j.result = DecomposeLapack<double>(std::move(j.matrix), kind);
  }
  void AwaitEntered() {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return entered_; });
  }
  void Release() {
    std::lock_guard<std::mutex> lock(mu_);
    released_ = true;
    cv_.notify_all();
  }

 private:
  void Wait() {
    std::unique_lock<std::mutex> lock(mu_);
    entered_ = true;
    cv_.notify_all();
    cv_.wait(lock, [&] { return released_; });
  }
  std::mutex mu_;
  std::condition_variable cv_;
  bool entered_ = false;
  bool released_ = false;
};

TEST(BatchingEngineTest, ShutdownCompletesTheBatchInFlightAndCancelsTheRest) {
  auto backend = std::make_unique<GateBackend>();
  GateBackend* gate = backend.get();
  EngineOptions options;
  options.batch_window_us = 0;
  options.drain_on_shutdown = false;
  auto engine = std::make_unique<BatchingInversionEngine>(std::move(backend), options);
  auto in_flight = engine->Submit(RandomSpd<float>(6, 1), DecompositionKind::kEigh);
  gate->AwaitEntered();  // the dispatcher is now inside Run with that job
  engine->Pause();       // so the queued jobs cannot start a batch of their own
  std::vector<DecompositionFuture<float>> queued;
  for (int i = 0; i < 5; ++i) {
    queued.push_back(engine->Submit(RandomSpd<float>(6, 2 + i), DecompositionKind::kEigh));
  }
  std::thread stopper([&] { engine->Shutdown(); });
  // Shutdown cannot finish before the batch does; release it from here.
  gate->Release();
  stopper.join();
  EXPECT_TRUE(in_flight.get().ok());
  for (auto& f : queued) EXPECT_EQ(f.get().status().code(), absl::StatusCode::kCancelled);
  const EngineStats s = engine->stats();
  EXPECT_EQ(s.jobs_succeeded, 1);
  EXPECT_EQ(s.jobs_cancelled, 5);
}

class ThrowingBackend : public InversionBackend {
 public:
  absl::string_view name() const override { return "throwing"; }
  void Run(DecompositionKind, absl::Span<BatchJob<float>>) override {
    throw std::runtime_error("boom");
  }
  void Run(DecompositionKind, absl::Span<BatchJob<double>>) override {
    throw std::runtime_error("boom");
  }
};

TEST(BatchingEngineTest, ThrowingBackendFailsJobsInsteadOfHanging) {
  BatchingInversionEngine engine(std::make_unique<ThrowingBackend>(), {});
  auto f = engine.Submit(RandomSpd<float>(3, 1), DecompositionKind::kEigh);
  auto r = f.get();
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInternal);
  EXPECT_NE(r.status().message().find("boom"), absl::string_view::npos);
}

TEST(EngineFactoryTest, CpuOnRequest) {
  EngineOptions options;
  options.backend = "cpu";
  auto created = CreateInversionEngine(options);
  ASSERT_TRUE(created.ok()) << created.status();
  EXPECT_EQ(created->backend, "cpu");
  EXPECT_EQ(created->engine->backend_name(), "cpu");
  auto r = created->engine->Submit(RandomSpd<float>(5, 1), DecompositionKind::kEigh).get();
  EXPECT_TRUE(r.ok());
}

TEST(EngineFactoryTest, AutoSaysWhichBackendAndWhy) {
  auto created = CreateInversionEngine(EngineOptions{});
  ASSERT_TRUE(created.ok()) << created.status();
  EXPECT_FALSE(created->reason.empty());
  EXPECT_EQ(created->engine->backend_name(), created->backend);
  if (created->backend == "cpu") {
    // Either built without CUDA or no device: the reason must say so.
    EXPECT_NE(created->reason.find("CUDA"), std::string::npos) << created->reason;
  }
  std::cout << "auto backend: " << created->backend << " (" << created->reason << ")\n";
}

TEST(EngineFactoryTest, ExplicitCudaWithoutDeviceIsAClearError) {
  auto probe = CreateInversionEngine(EngineOptions{});
  ASSERT_TRUE(probe.ok());
  if (probe->backend == "cuda") GTEST_SKIP() << "a CUDA device is present";
  EngineOptions options;
  options.backend = "cuda";
  auto created = CreateInversionEngine(options);
  ASSERT_FALSE(created.ok());
  EXPECT_EQ(created.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(created.status().message().find("cuda"), absl::string_view::npos)
      << created.status();
}

TEST(EngineFactoryTest, BadOptionsAreRejected) {
  EngineOptions options;
  options.backend = "tpu";
  EXPECT_EQ(CreateInversionEngine(options).status().code(),
            absl::StatusCode::kInvalidArgument);
  options.backend = "cpu";
  options.max_batch = 0;
  EXPECT_EQ(CreateInversionEngine(options).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace natgrad::engine
