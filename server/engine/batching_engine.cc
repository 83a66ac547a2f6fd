#include "server/engine/batching_engine.h"

#include <algorithm>
#include <exception>
#include <new>
#include <type_traits>
#include <utility>

#include "absl/strings/str_cat.h"

namespace natgrad::engine {
namespace {

template <typename Scalar>
constexpr DType DTypeOf() {
  return std::is_same_v<Scalar, float> ? DType::kFloat32 : DType::kFloat64;
}

double Seconds(std::chrono::steady_clock::duration d) {
  return std::chrono::duration<double>(d).count();
}

}  // namespace

absl::string_view DTypeName(DType dtype) {
  return dtype == DType::kFloat32 ? "float32" : "float64";
}

absl::string_view KindName(DecompositionKind kind) {
  return kind == DecompositionKind::kEigh ? "eigh" : "cholesky_inverse";
}

BatchingInversionEngine::BatchingInversionEngine(
    std::unique_ptr<InversionBackend> backend, EngineOptions options)
    : backend_(std::move(backend)),
      options_(std::move(options)),
      window_(std::chrono::microseconds(std::max<int64_t>(0, options_.batch_window_us))) {
  dispatcher_ = std::thread([this] { DispatcherLoop(); });
}

BatchingInversionEngine::~BatchingInversionEngine() { Shutdown(); }

void BatchingInversionEngine::Shutdown() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  std::lock_guard<std::mutex> join_lock(shutdown_mu_);
  if (dispatcher_.joinable()) dispatcher_.join();
}

void BatchingInversionEngine::Pause() {
  std::lock_guard<std::mutex> lock(mu_);
  paused_ = true;
}

void BatchingInversionEngine::Resume() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    paused_ = false;
  }
  cv_.notify_all();
}

EngineStats BatchingInversionEngine::stats() const {
  EngineStats s;
  {
    std::lock_guard<std::mutex> lock(stats_mu_);
    s = stats_;
  }
  std::lock_guard<std::mutex> lock(mu_);
  s.pending = pending_;
  return s;
}

DecompositionFuture<float> BatchingInversionEngine::Submit(Eigen::MatrixXf matrix,
                                                           DecompositionKind kind) {
  return SubmitImpl<float>(std::move(matrix), kind);
}

DecompositionFuture<double> BatchingInversionEngine::Submit(Eigen::MatrixXd matrix,
                                                            DecompositionKind kind) {
  return SubmitImpl<double>(std::move(matrix), kind);
}

template <typename Scalar>
DecompositionFuture<Scalar> BatchingInversionEngine::SubmitImpl(
    MatrixX<Scalar> matrix, DecompositionKind kind) {
  TypedJob<Scalar> typed{std::move(matrix), {}};
  DecompositionFuture<Scalar> future = typed.promise.get_future();
  const GroupKey key{typed.matrix.rows(), DTypeOf<Scalar>(), kind};
  {
    std::lock_guard<std::mutex> lock(stats_mu_);
    ++stats_.jobs_submitted;
  }
  std::unique_lock<std::mutex> lock(mu_);
  if (stopping_) {
    lock.unlock();
    {
      std::lock_guard<std::mutex> stats_lock(stats_mu_);
      ++stats_.jobs_cancelled;
    }
    typed.promise.set_value(absl::CancelledError("inversion engine is shut down"));
    return future;
  }
  groups_[key].push_back(Job{std::move(typed), Clock::now()});
  ++pending_;
  lock.unlock();
  cv_.notify_one();
  return future;
}

void BatchingInversionEngine::DispatcherLoop() {
  std::unique_lock<std::mutex> lock(mu_);
  while (true) {
    const bool flush = stopping_;
    if (flush && (!options_.drain_on_shutdown || pending_ == 0)) break;
    const Clock::time_point now = Clock::now();
    auto best = groups_.end();
    Clock::time_point next_deadline = Clock::time_point::max();
    if (!paused_ || flush) {
      for (auto it = groups_.begin(); it != groups_.end(); ++it) {
        const Clock::time_point head = it->second.front().enqueued;
        const bool ready = flush ||
                           static_cast<int64_t>(it->second.size()) >= options_.max_batch ||
                           now - head >= window_;
        if (ready) {
          // Oldest first, so a busy size cannot starve the others.
          if (best == groups_.end() || head < best->second.front().enqueued) best = it;
        } else {
          next_deadline = std::min(next_deadline, head + window_);
        }
      }
    }
    if (best == groups_.end()) {
      if (next_deadline == Clock::time_point::max()) {
        cv_.wait(lock);
      } else {
        cv_.wait_until(lock, next_deadline);
      }
      continue;
    }
    const GroupKey key = best->first;
    std::deque<Job>& queue = best->second;
    const size_t take = std::min<size_t>(queue.size(), std::max(1, options_.max_batch));
    std::vector<Job> batch;
    batch.reserve(take);
    for (size_t i = 0; i < take; ++i) {
      batch.push_back(std::move(queue.front()));
      queue.pop_front();
    }
    if (queue.empty()) groups_.erase(best);
    pending_ -= static_cast<int64_t>(take);
    lock.unlock();
    if (std::get<1>(key) == DType::kFloat32) {
      RunGroup<float>(key, batch);
    } else {
      RunGroup<double>(key, batch);
    }
    lock.lock();
  }
  // Shutdown without drain: everything still queued is cancelled.
  std::map<GroupKey, std::deque<Job>> left;
  left.swap(groups_);
  pending_ = 0;
  lock.unlock();
  const Clock::time_point now = Clock::now();
  for (auto& [key, queue] : left) {
    for (Job& job : queue) CancelJob(key, job, now);
  }
}

void BatchingInversionEngine::CancelJob(const GroupKey& key, Job& job,
                                        Clock::time_point now) {
  const double waited = Seconds(now - job.enqueued);
  RecordJob(JobEvent{backend_->name(), std::get<2>(key), std::get<1>(key),
                     std::get<0>(key), absl::StatusCode::kCancelled, 0, waited,
                     waited});
  std::visit(
      [](auto& typed) {
        typed.promise.set_value(
            absl::CancelledError("inversion engine shut down before the job ran"));
      },
      job.typed);
}

void BatchingInversionEngine::RecordJob(const JobEvent& event) {
  {
    std::lock_guard<std::mutex> lock(stats_mu_);
    if (event.code == absl::StatusCode::kOk) {
      ++stats_.jobs_succeeded;
    } else if (event.code == absl::StatusCode::kCancelled) {
      ++stats_.jobs_cancelled;
    } else {
      ++stats_.jobs_failed;
    }
    stats_.retries += event.retries;
    stats_.total_latency_seconds += event.total_seconds;
    stats_.max_latency_seconds = std::max(stats_.max_latency_seconds, event.total_seconds);
  }
  if (options_.observer) options_.observer->OnJob(event);
}

template <typename Scalar>
void BatchingInversionEngine::RunGroup(const GroupKey& key, std::vector<Job>& jobs) {
  const auto [n, dtype, kind] = key;
  std::vector<BatchJob<Scalar>> work(jobs.size());
  for (size_t i = 0; i < jobs.size(); ++i) {
    work[i].matrix = std::move(std::get<TypedJob<Scalar>>(jobs[i].typed).matrix);
  }
  const Clock::time_point start = Clock::now();
  try {
    backend_->Run(kind, absl::MakeSpan(work));
  } catch (const std::bad_alloc&) {
    for (auto& w : work) w.result = absl::ResourceExhaustedError("out of memory running a batch");
  } catch (const std::exception& e) {
    for (auto& w : work) {
      w.result = absl::InternalError(absl::StrCat("backend threw: ", e.what()));
    }
  } catch (...) {
    for (auto& w : work) w.result = absl::InternalError("backend threw");
  }
  const Clock::time_point end = Clock::now();

  int failed = 0;
  int retries = 0;
  std::vector<JobEvent> events;
  events.reserve(jobs.size());
  for (size_t i = 0; i < jobs.size(); ++i) {
    const absl::StatusCode code = work[i].result.status().code();
    const int r = work[i].result.ok() ? work[i].result->retries : 0;
    failed += code != absl::StatusCode::kOk;
    retries += r;
    events.push_back(JobEvent{backend_->name(), kind, dtype, n, code, r,
                              Seconds(start - jobs[i].enqueued),
                              Seconds(end - jobs[i].enqueued)});
  }
  // Stats and observer first, futures last: whoever wakes on a future sees
  // its job already counted.
  {
    std::lock_guard<std::mutex> lock(stats_mu_);
    ++stats_.batches;
    stats_.batched_jobs += static_cast<int64_t>(jobs.size());
    stats_.max_batch_size = std::max<int64_t>(stats_.max_batch_size, jobs.size());
    stats_.busy_seconds += Seconds(end - start);
  }
  for (const JobEvent& e : events) RecordJob(e);
  if (options_.observer) {
    options_.observer->OnBatch(BatchEvent{backend_->name(), kind, dtype, n,
                                          static_cast<int>(jobs.size()), failed,
                                          retries, Seconds(end - start)});
  }
  for (size_t i = 0; i < jobs.size(); ++i) {
    std::get<TypedJob<Scalar>>(jobs[i].typed).promise.set_value(std::move(work[i].result));
  }
}

}  // namespace natgrad::engine
