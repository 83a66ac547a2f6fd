// Many sessions at once against one real in-process server (issue 13: "32
// sessions at once vs 1 session"): N sessions of a 256-256-10 MLP (two
// kfac_dense blocks, 256x256 and 10x256 with bias, float32, inverse_period 1
// so every step decomposes, raw statistics of a batch of 128), each stepping
// from its own thread over its own C++ client stream. For every N and
// repetition: aggregate steps/s, per-step p50 latency at the client, and the
// server's worker time (natgrad_worker_running_seconds_total,
// natgrad_worker_handoff_seconds_total and
// natgrad_worker_engine_wait_seconds_total, read from its metrics registry).
// The summary gives the medians over repetitions and the aggregate ratio of
// the largest N to N = 1 per mode.
//
//   concurrent_sessions_bench [--sessions=1,32] [--reps=5] [--total_steps=640]
//                             [--modes=yield,block] [--worker_threads=0]
//
// --modes: yield (the server's default: a step blocked on the engine gives
// its worker slot to a queued step) and block (ServerOptions::
// yield_engine_waits = false: it keeps the slot, as before issue 13).
// The machine's load average is printed before and after: on a shared
// machine the figures are only comparable within one run.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>

#include <map>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/barrier.h"
#include "absl/synchronization/mutex.h"
#include "bench/common/loopback_server.h"
#include "server/linalg/openblas_environment.h"
#include "client/cpp/natgrad_client.h"
#include "client/cpp/tensor.h"
#include "server/service/natgrad_server.h"

ABSL_FLAG(std::string, sessions, "1,32", "comma-separated session counts");
ABSL_FLAG(int, reps, 5, "repetitions per session count and mode (each on a fresh server)");
ABSL_FLAG(int, total_steps, 640,
          "timed steps per repetition, split evenly over the sessions (after 2 warm-up "
          "steps each)");
ABSL_FLAG(std::string, modes, "yield,block",
          "comma-separated: yield (default server), block (yield_engine_waits=false)");
ABSL_FLAG(int, worker_threads, 0, "the server's --worker_threads (0: one per core)");

namespace {

using natgrad::v1::BlockStep;
using Clock = std::chrono::steady_clock;

constexpr int64_t kBatch = 128;
const std::vector<int64_t> kWidths = {256, 256, 10};
constexpr int kVariants = 8;  // distinct pre-built steps, cycled

natgrad::v1::SessionConfig MlpConfig() {
  natgrad::v1::SessionConfig c;
  c.set_state_dtype(natgrad::v1::FLOAT32);
  for (size_t l = 0; l + 1 < kWidths.size(); ++l) {
    auto* b = c.add_blocks();
    b->set_name("fc" + std::to_string(l));
    auto* k = b->mutable_kfac_dense();
    k->set_d_in(kWidths[l]);
    k->set_d_out(kWidths[l + 1]);
    k->set_has_bias(true);
    k->set_inverse_period(1);
    k->mutable_learning_rate()->mutable_constant()->set_value(1e-3);
    k->mutable_damping()->mutable_constant()->set_value(1e-2);
  }
  return c;
}

std::vector<float> Random(std::mt19937& rng, int64_t n) {
  std::normal_distribution<float> d;
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

// Built before timing, so the clients only serialize and send.
std::vector<std::vector<BlockStep>> MakeSteps() {
  std::mt19937 rng(7);
  std::vector<std::vector<BlockStep>> out;
  for (int v = 0; v < kVariants; ++v) {
    std::vector<BlockStep> step;
    for (size_t l = 0; l + 1 < kWidths.size(); ++l) {
      const int64_t din = kWidths[l], dout = kWidths[l + 1];
      BlockStep s;
      s.set_name("fc" + std::to_string(l));
      *s.mutable_gradient() =
          natgrad::client::MakeTensor(Random(rng, dout * (din + 1)), {dout, din + 1});
      auto* raw = s.mutable_kfac()->mutable_raw();
      *raw->mutable_activations() =
          natgrad::client::MakeTensor(Random(rng, kBatch * din), {kBatch, din});
      *raw->mutable_output_gradients() =
          natgrad::client::MakeTensor(Random(rng, kBatch * dout), {kBatch, dout});
      step.push_back(std::move(s));
    }
    out.push_back(std::move(step));
  }
  return out;
}

std::string LoadAverage() {
  std::ifstream in("/proc/loadavg");
  std::string a, b, c;
  in >> a >> b >> c;
  return a + " " + b + " " + c;
}

// A counter of the server's registry by name, summed over the series that
// have label `label` (all when empty); -1 when the server has no such family.
double CounterValue(natgrad::service::NatgradServer& server, const std::string& name,
                    const std::string& label = "", const std::string& value = "") {
  for (const auto& family : server.metrics().registry().Collect()) {
    if (family.name != name) continue;
    double sum = 0;
    for (const auto& m : family.metric) {
      bool match = label.empty();
      for (const auto& l : m.label) match |= l.name == label && l.value == value;
      if (match) sum += m.counter.value;
    }
    return sum;
  }
  return -1;
}

using natgrad::bench::Median;
using natgrad::bench::ProcessCpuSeconds;

// Worker-time counters of the server at one moment.
struct WorkerCounters {
  double running = -1, handoff = -1, idle = -1, idle_queued = -1;
};

WorkerCounters ReadWorkerCounters(natgrad::service::NatgradServer& server) {
  WorkerCounters c;
  c.running = CounterValue(server, "natgrad_worker_running_seconds_total");
  c.handoff = CounterValue(server, "natgrad_worker_handoff_seconds_total");
  c.idle = CounterValue(server, "natgrad_worker_engine_wait_seconds_total");
  c.idle_queued =
      CounterValue(server, "natgrad_worker_engine_wait_seconds_total", "queue", "nonempty");
  return c;
}

struct Run {
  double steps_per_s = 0;
  double p50_ms = 0;
  double running_s = -1;      // worker seconds running steps (timed part)
  double handoff_s = -1;      // slot seconds handed over, thread not yet awake
  double engine_wait_s = -1;  // worker-slot seconds idle on the engine
  double engine_wait_queued_s = -1;  // ... of them with steps queued
  double cpu = 0;             // process CPU seconds per wall second (of 2 cores: 2)
  double wall_s = 0;
  double mean_batch = 0;      // engine jobs per batch over the timed part
  double engine_busy = 0;     // engine seconds inside backend calls per wall second
  double job_ms = 0;          // mean engine job latency, submit to result
};

Run RunOnce(int sessions, int steps_per_session, bool yield,
            const std::vector<std::vector<BlockStep>>& steps) {
  natgrad::service::ServerOptions so;
  so.worker_threads = absl::GetFlag(FLAGS_worker_threads);
  so.yield_engine_waits = yield;
  auto server = natgrad::bench::StartLoopbackServer(so);
  natgrad::client::ClientOptions co = natgrad::bench::LoopbackClientOptions(*server);
  const natgrad::v1::SessionConfig config = MlpConfig();

  std::vector<std::vector<double>> latencies(sessions);
  // Everyone warmed up -> the main thread reads the counters -> all go.
  absl::Barrier* warmed = new absl::Barrier(sessions + 1);
  absl::Mutex mu;
  bool go = false;
  std::vector<std::thread> threads;
  for (int i = 0; i < sessions; ++i) {
    threads.emplace_back([&, i] {
      natgrad::client::Client client(co);
      auto session = client.CreateSession(config);
      if (!session.ok()) {
        std::fprintf(stderr, "create: %s\n", session.status().ToString().c_str());
        std::exit(1);
      }
      auto stream = client.OpenStream(session->name());
      if (!stream.ok()) std::exit(1);
      int t = i;  // sessions start at different variants
      auto step = [&] {
        const auto start = Clock::now();
        auto r = (*stream)->Step(steps[t++ % steps.size()]);
        if (!r.ok()) {
          std::fprintf(stderr, "step: %s\n", r.status().ToString().c_str());
          std::exit(1);
        }
        return std::chrono::duration<double, std::milli>(Clock::now() - start).count();
      };
      for (int w = 0; w < 2; ++w) step();
      if (warmed->Block()) delete warmed;
      {
        absl::MutexLock lock(&mu);
        mu.Await(absl::Condition(&go));
      }
      latencies[i].reserve(steps_per_session);
      for (int s = 0; s < steps_per_session; ++s) latencies[i].push_back(step());
      (*stream)->Close().IgnoreError();
    });
  }
  if (warmed->Block()) delete warmed;
  const WorkerCounters c0 = ReadWorkerCounters(*server);
  const auto engine0 = server->engine().stats();
  const double cpu0 = ProcessCpuSeconds();
  const auto start = Clock::now();
  {
    absl::MutexLock lock(&mu);
    go = true;
  }
  for (auto& t : threads) t.join();
  Run r;
  r.wall_s = std::chrono::duration<double>(Clock::now() - start).count();
  r.cpu = (ProcessCpuSeconds() - cpu0) / r.wall_s;
  const WorkerCounters c1 = ReadWorkerCounters(*server);
  const auto engine1 = server->engine().stats();
  if (c0.running >= 0) r.running_s = c1.running - c0.running;
  if (c0.handoff >= 0) r.handoff_s = c1.handoff - c0.handoff;
  if (c0.idle >= 0) r.engine_wait_s = c1.idle - c0.idle;
  if (c0.idle_queued >= 0) r.engine_wait_queued_s = c1.idle_queued - c0.idle_queued;
  const int64_t batches = engine1.batches - engine0.batches;
  if (batches > 0) r.mean_batch = double(engine1.batched_jobs - engine0.batched_jobs) / batches;
  r.engine_busy = (engine1.busy_seconds - engine0.busy_seconds) / r.wall_s;
  const int64_t jobs = engine1.jobs_succeeded - engine0.jobs_succeeded;
  if (jobs > 0) {
    r.job_ms = 1e3 * (engine1.total_latency_seconds - engine0.total_latency_seconds) / jobs;
  }
  std::vector<double> all;
  for (auto& l : latencies) all.insert(all.end(), l.begin(), l.end());
  std::sort(all.begin(), all.end());
  r.p50_ms = all[all.size() / 2];
  r.steps_per_s = double(all.size()) / r.wall_s;
  server->Shutdown(absl::Seconds(1));
  return r;
}


}  // namespace

int main(int argc, char** argv) {
  // The server in this process runs as natgrad-server does: idle OpenBLAS
  // workers asleep (server/linalg/openblas_environment.h).
  natgrad::linalg::ReexecWithQuietOpenBlasThreads(argv);
  absl::ParseCommandLine(argc, argv);
  std::vector<int> counts;
  for (absl::string_view s : absl::StrSplit(absl::GetFlag(FLAGS_sessions), ',')) {
    int n = 0;
    if (!absl::SimpleAtoi(s, &n) || n < 1) {
      std::fprintf(stderr, "--sessions: bad count %s\n", std::string(s).c_str());
      return 2;
    }
    counts.push_back(n);
  }
  std::vector<std::string> modes;
  for (absl::string_view m : absl::StrSplit(absl::GetFlag(FLAGS_modes), ',')) {
    if (m != "yield" && m != "block") {
      std::fprintf(stderr, "--modes: unknown mode %s\n", std::string(m).c_str());
      return 2;
    }
    modes.emplace_back(m);
  }
  const int reps = absl::GetFlag(FLAGS_reps);
  const std::vector<std::vector<BlockStep>> steps = MakeSteps();
  std::printf("load average before: %s; %u hardware threads\n", LoadAverage().c_str(),
              std::thread::hardware_concurrency());
  std::printf(
      "columns: run s = worker seconds running steps; handoff s = worker-slot seconds "
      "between a slot's handoff to a thread and that thread running (scheduler wake-up); "
      "eng-idle s = worker-slot seconds idle "
      "while its step was blocked on the engine (of it, queued = while other steps were "
      "queued); cpu = process CPU seconds per second; batch = engine jobs per batch; "
      "eng busy = engine seconds in backend calls per second; job ms = mean engine job "
      "latency\n");
  std::printf("%-6s %8s %4s %10s %9s %8s %9s %10s %8s %6s %6s %8s %7s\n", "mode",
              "sessions", "rep", "steps/s", "p50 ms", "run s", "handoff s", "eng-idle s",
              "queued", "cpu", "batch", "eng busy", "job ms");
  // mode -> sessions -> per-rep figures.
  std::map<std::string, std::map<int, std::vector<Run>>> runs;
  // Interleaved (rep outermost), so slow drifts in the machine's load hit
  // every configuration alike.
  for (int rep = 0; rep < reps; ++rep) {
    for (const std::string& mode : modes) {
      for (int n : counts) {
        const int per_session = std::max(1, absl::GetFlag(FLAGS_total_steps) / n);
        Run r = RunOnce(n, per_session, mode == "yield", steps);
        runs[mode][n].push_back(r);
        std::printf("%-6s %8d %4d %10.1f %9.2f %8.3f %9.3f %10.3f %8.3f %6.2f %6.2f %8.2f %7.2f\n",
                    mode.c_str(), n, rep, r.steps_per_s, r.p50_ms, r.running_s,
                    r.handoff_s, r.engine_wait_s, r.engine_wait_queued_s, r.cpu, r.mean_batch,
                    r.engine_busy, r.job_ms);
        std::fflush(stdout);
      }
    }
  }
  std::printf("\nmedians over %d reps (load average after: %s)\n", reps, LoadAverage().c_str());
  std::printf("%-6s %8s %10s %9s %8s %9s %10s %8s %6s %6s %14s\n", "mode", "sessions",
              "steps/s", "p50 ms", "run s", "handoff s", "eng-idle s", "queued", "cpu", "batch",
              "vs 1 session");
  for (const std::string& mode : modes) {
    double base = 0;
    for (int n : counts) {
      std::vector<double> sps, p50, run, handoff, idle, queued, cpu, batch;
      for (const Run& r : runs[mode][n]) {
        sps.push_back(r.steps_per_s);
        p50.push_back(r.p50_ms);
        run.push_back(r.running_s);
        handoff.push_back(r.handoff_s);
        idle.push_back(r.engine_wait_s);
        queued.push_back(r.engine_wait_queued_s);
        cpu.push_back(r.cpu);
        batch.push_back(r.mean_batch);
      }
      const double m = Median(sps);
      if (n == 1) base = m;
      std::printf("%-6s %8d %10.1f %9.2f %8.3f %9.3f %10.3f %8.3f %6.2f %6.2f %14s\n",
                  mode.c_str(), n, m, Median(p50), Median(run), Median(handoff), Median(idle), Median(queued), Median(cpu),
                  Median(batch),
                  base > 0 ? (std::to_string(m / base).substr(0, 5) + "x").c_str() : "-");
    }
  }
  return 0;
}
