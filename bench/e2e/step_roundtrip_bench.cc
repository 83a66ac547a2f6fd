// End-to-end step benchmark: the same steps through a real server over
// loopback (C++ client, Step stream) and in-process (Session::Step + reply
// encoding on already-decoded inputs, i.e. everything but gRPC and decode),
// reported as p50/p99 latency, throughput and their ratio, plus the
// server-side decode time per step (StepAssembler::Add) on its own.
//
// Each of --reps runs makes fresh sessions and times --steps steps (after 3
// warm-up steps) of every path, interleaved step by step in a rotating order
// (so drift on a shared machine falls on all paths alike); the columns are the
// medians over the runs of each run's figures (the ratio is each run's rpc
// p50 / in-process p50).
//
// What is timed. RPC: wrapping the caller's arrays into the step's tensors
// (MakeTensor), the client's encoding, transport, the server's decode, step
// and encode, and the client's parse of the reply — what a training loop
// waits for. Not timed: producing the random arrays (a real client has its
// gradients already). In-process: Session::Step and EncodeStepReply only; the
// inputs were decoded by StepAssembler before the timed loop (that decode is
// the "decode p50" column).
//
// Rows "+shm": the same RPC steps through shared memory (docs/shared_memory.md):
// the client copies the arrays into a /dev/shm region (SharedMemoryArena,
// timed) and sends their spans; the server copies them out on arrival and
// writes the deltas into the region, where the client reads them. Compared
// with the same in-process figures as the plain row.
//
// CPU columns: the process's CPU time per step (p50), client and server
// together for RPC: on a machine shared with other builds, wall time
// stretches with the load and CPU time much less.
//
// TCP floor (unless --tcp_floor=false): the plain step's request bytes up
// and its updates' bytes down through a bare loopback socket pair in this
// process (bench/common/loopback_tcp_floor.h), interleaved with the other
// paths; "floor rat." is (in-process p50 + that round trip's p50) /
// in-process p50, the ratio a transport that only paid the kernel's copies
// would reach without overlapping them with the step.
//
// A run's steps cycle through --pool distinct random inputs (kfac_ae's raw
// statistics are ~46 MB a step; decoding 50 of them ahead would not fit
// beside the other engineers' builds).
//
//   step_roundtrip_bench [--steps=N] [--reps=5] [--pool=8] [--tcp_floor=true]
//       [--models=adam_1k,adam_100k,adam_1m,kfac_mlp,kfac_ae]

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <functional>
#include <map>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_split.h"
#include "bench/common/loopback_server.h"
#include "bench/common/loopback_tcp_floor.h"
#include "server/linalg/openblas_environment.h"
#include "client/cpp/natgrad_client.h"
#include "client/cpp/shared_memory.h"
#include "client/cpp/tensor.h"
#include "server/service/natgrad_server.h"
#include "server/service/step_assembler.h"
#include "server/service/step_reply.h"

ABSL_FLAG(int, steps, 50, "timed steps per model and run (after 3 warm-up steps)");
ABSL_FLAG(int, reps, 5, "runs per model; figures are medians over the runs");
ABSL_FLAG(int, pool, 8, "distinct random steps a run cycles through");
ABSL_FLAG(bool, shared_memory, true, "also time the RPC steps through shared memory (+shm rows)");
ABSL_FLAG(bool, tcp_floor, true,
          "also time the step's bytes through a bare loopback socket pair (tcp p50, floor rat.)");
ABSL_FLAG(std::string, models, "adam_1k,adam_100k,adam_1m,kfac_mlp,kfac_ae",
          "comma-separated: adam_1k, adam_100k, adam_1m, kfac_mlp, kfac_ae");

namespace {

using natgrad::v1::BlockStep;
using natgrad::v1::SessionConfig;
using Clock = std::chrono::steady_clock;

// One step's inputs as the training loop holds them: plain arrays.
struct RawTensor {
  std::vector<float> values;
  std::vector<int64_t> shape;
};
struct RawBlock {
  std::string name;
  RawTensor gradient;
  bool kfac = false;
  RawTensor activations, output_gradients;
};
using RawStep = std::vector<RawBlock>;

struct Model {
  SessionConfig config;
  std::function<RawStep(std::mt19937&)> step;
};

// The same into a shared-memory arena: one copy of each array.
std::vector<BlockStep> WrapShared(const RawStep& raw, natgrad::client::SharedMemoryArena& arena) {
  arena.Reset();
  std::vector<BlockStep> out;
  out.reserve(raw.size());
  auto place = [&](const RawTensor& t) {
    return arena.Place(t.values.data(), t.shape).value();  // sized for the step
  };
  for (const RawBlock& r : raw) {
    BlockStep& s = out.emplace_back();
    s.set_name(r.name);
    *s.mutable_gradient() = place(r.gradient);
    if (r.kfac) {
      auto* stats = s.mutable_kfac()->mutable_raw();
      *stats->mutable_activations() = place(r.activations);
      *stats->mutable_output_gradients() = place(r.output_gradients);
    }
  }
  return out;
}

// What the plain step's reply carries: one delta of the gradient's size per block.
int64_t UpdateBytes(const RawStep& raw) {
  int64_t n = 0;
  for (const RawBlock& r : raw) n += static_cast<int64_t>(r.gradient.values.size());
  return n * static_cast<int64_t>(sizeof(float));
}

int64_t StepBytes(const RawStep& raw) {
  int64_t n = 0;
  for (const RawBlock& r : raw) {
    n += static_cast<int64_t>(r.gradient.values.size() + r.activations.values.size() +
                              r.output_gradients.values.size());
  }
  return n * static_cast<int64_t>(sizeof(float));
}

// The client's side of a step: the arrays into the step's tensors.
std::vector<BlockStep> Wrap(const RawStep& raw) {
  std::vector<BlockStep> out;
  out.reserve(raw.size());
  for (const RawBlock& r : raw) {
    BlockStep& s = out.emplace_back();
    s.set_name(r.name);
    *s.mutable_gradient() = natgrad::client::MakeTensor(r.gradient.values, r.gradient.shape);
    if (r.kfac) {
      auto* stats = s.mutable_kfac()->mutable_raw();
      *stats->mutable_activations() =
          natgrad::client::MakeTensor(r.activations.values, r.activations.shape);
      *stats->mutable_output_gradients() =
          natgrad::client::MakeTensor(r.output_gradients.values, r.output_gradients.shape);
    }
  }
  return out;
}

RawTensor Random(std::mt19937& rng, std::vector<int64_t> shape) {
  std::normal_distribution<float> d;
  int64_t n = 1;
  for (int64_t x : shape) n *= x;
  RawTensor t{std::vector<float>(n), std::move(shape)};
  for (auto& x : t.values) x = d(rng);
  return t;
}

Model AdamModel(int64_t n) {
  Model m;
  auto* b = m.config.add_blocks();
  b->set_name("w");
  b->add_shape(n);
  b->mutable_adam();
  m.step = [n](std::mt19937& rng) {
    RawBlock r;
    r.name = "w";
    r.gradient = Random(rng, {n});
    return RawStep{std::move(r)};
  };
  return m;
}

// K-FAC dense layers with raw statistics for a batch of `batch` examples.
Model KfacModel(const std::vector<int64_t>& widths, int64_t batch, int64_t inverse_period) {
  Model m;
  for (size_t l = 0; l + 1 < widths.size(); ++l) {
    auto* b = m.config.add_blocks();
    b->set_name("layer" + std::to_string(l));
    auto* k = b->mutable_kfac_dense();
    k->set_d_in(widths[l]);
    k->set_d_out(widths[l + 1]);
    k->set_has_bias(true);
    k->set_inverse_period(inverse_period);
    k->mutable_learning_rate()->mutable_constant()->set_value(1e-3);
    k->mutable_damping()->mutable_constant()->set_value(1e-2);
  }
  m.step = [widths, batch](std::mt19937& rng) {
    RawStep steps;
    for (size_t l = 0; l + 1 < widths.size(); ++l) {
      const int64_t din = widths[l], dout = widths[l + 1];
      RawBlock r;
      r.name = "layer" + std::to_string(l);
      r.gradient = Random(rng, {dout, din + 1});
      r.kfac = true;
      r.activations = Random(rng, {batch, din});
      r.output_gradients = Random(rng, {batch, dout});
      steps.push_back(std::move(r));
    }
    return steps;
  };
  return m;
}

using natgrad::bench::LoadAverage;
using natgrad::bench::Median;

// CPU time of the whole process (client, server and gRPC threads).
double CpuMs() { return 1e3 * natgrad::bench::ProcessCpuSeconds(); }

struct Figures {
  double p50_ms, p99_ms, steps_per_s;
};

Figures Summarise(std::vector<double> ms) {
  std::sort(ms.begin(), ms.end());
  double total = 0;
  for (double x : ms) total += x;
  auto pct = [&](double p) { return ms[std::min(ms.size() - 1, size_t(p * ms.size()))]; };
  return {pct(0.5), pct(0.99), 1000.0 * ms.size() / total};
}

}  // namespace

int main(int argc, char** argv) {
  // The server in this process runs as natgrad-server does: idle OpenBLAS
  // workers asleep (server/linalg/openblas_environment.h).
  natgrad::linalg::ReexecWithQuietOpenBlasThreads(argv);
  absl::ParseCommandLine(argc, argv);
  std::map<std::string, Model> models = {
      {"adam_1k", AdamModel(1000)},
      {"adam_100k", AdamModel(100000)},
      {"adam_1m", AdamModel(1000000)},
      {"kfac_mlp", KfacModel({256, 256, 10}, 256, 10)},
      // Issue 3's MNIST autoencoder: 784-1000-500-250-30 and mirrored decoder.
      {"kfac_ae", KfacModel({784, 1000, 500, 250, 30, 250, 500, 1000, 784}, 1000, 10)},
  };
  natgrad::service::ServerOptions options;
  options.shared_memory = true;
  auto server = natgrad::bench::StartLoopbackServer(options);
  natgrad::client::Client client(natgrad::bench::LoopbackClientOptions(*server));
  const int steps = absl::GetFlag(FLAGS_steps);
  const int reps = absl::GetFlag(FLAGS_reps);
  const int pool = std::min(absl::GetFlag(FLAGS_pool), steps + 3);
  if (steps <= 0 || reps <= 0 || pool <= 0) {
    std::fprintf(stderr, "--steps, --reps and --pool must be positive\n");
    return 2;
  }
  constexpr int kWarmup = 3;

  std::printf("%d runs of %d steps (+%d warm-up), %d distinct inputs; medians over the runs; "
              "times in ms\n",
              reps, steps, kWarmup, pool);
  std::printf(
      "%-10s %10s %10s %10s | %10s %10s %10s | %10s %15s | %10s | %8s %8s %8s | %8s %10s | "
      "%6s\n",
      "model", "rpc p50", "rpc p99", "rpc st/s", "inproc p50", "inproc p99", "inproc st/s",
      "rpc/inproc", "(min-max)", "decode p50", "rpc cpu", "inp cpu", "cpu rat.", "tcp p50",
      "floor rat.", "load");
  for (absl::string_view name : absl::StrSplit(absl::GetFlag(FLAGS_models), ',')) {
    auto it = models.find(std::string(name));
    if (it == models.end()) {
      std::fprintf(stderr, "unknown model %s\n", std::string(name).c_str());
      return 2;
    }
    const Model& model = it->second;
    std::mt19937 rng(1);
    std::vector<RawStep> inputs;
    for (int t = 0; t < pool; ++t) inputs.push_back(model.step(rng));

    // One rep: the three paths' sessions side by side, their steps
    // interleaved (the order rotating each step), so that the machine's drift
    // (other processes, clock, memory) falls on all three alike and the
    // ratio of one rep compares steps taken at the same moments.
    auto run_rep = [&](std::vector<double>& rpc_ms, std::vector<double>& rpc_cpu_ms,
                       std::vector<double>& shm_ms, std::vector<double>& shm_cpu_ms,
                       std::vector<double>& local_ms, std::vector<double>& local_cpu_ms,
                       std::vector<double>& decode_ms, std::vector<double>& tcp_ms) -> bool {
      const bool with_shm = absl::GetFlag(FLAGS_shared_memory);
      auto fail = [&](const absl::Status& s) {
        std::fprintf(stderr, "%s: %s\n", it->first.c_str(), s.ToString().c_str());
        return false;
      };
      auto plain_session = client.CreateSession(model.config);
      if (!plain_session.ok()) return fail(plain_session.status());
      auto plain_stream = client.OpenStream(plain_session->name());
      if (!plain_stream.ok()) return fail(plain_stream.status());
      absl::StatusOr<natgrad::v1::Session> shm_session;
      std::unique_ptr<natgrad::client::SessionStream> shm_stream;
      std::shared_ptr<natgrad::client::SharedMemoryRegion> region;
      std::optional<natgrad::client::SharedMemoryArena> arena;
      if (with_shm) {
        shm_session = client.CreateSession(model.config);
        if (!shm_session.ok()) return fail(shm_session.status());
        auto opened = client.OpenStream(shm_session->name());
        if (!opened.ok()) return fail(opened.status());
        shm_stream = *std::move(opened);
        // Inputs, then the deltas (at most the gradients' bytes) and alignment.
        region = natgrad::client::SharedMemoryRegion::Create(2 * StepBytes(inputs[0]) + (1 << 20))
                     .value();
        arena.emplace(region);
      }
      // In-process: decode every distinct input first (timed on its own),
      // then time only the session step and the reply's encoding.
      auto local = server->registry().Create(model.config, "bench", "");
      if (!local.ok()) return fail(local.status());
      const std::string local_name = (*local)->name();
      std::vector<natgrad::service::AssembledStep> decoded;
      for (int p = 0; p < pool; ++p) {
        natgrad::v1::StepRequest req;
        req.set_session(local_name);
        req.set_step(p + 1);
        req.set_last(true);
        for (auto& b : Wrap(inputs[p])) *req.add_blocks() = std::move(b);
        const auto start = Clock::now();
        natgrad::service::StepAssembler assembler((*local)->config(), int64_t{1} << 40);
        if (absl::Status s = assembler.Add(req); !s.ok()) return fail(s);
        decoded.push_back(assembler.Take());
        decode_ms.push_back(
            std::chrono::duration<double, std::milli>(Clock::now() - start).count());
      }

      auto plain_step = [&](int t) -> absl::Status {
        return (*plain_stream)->Step(Wrap(inputs[t % pool])).status();
      };
      auto shm_step = [&](int t) -> absl::Status {
        std::vector<BlockStep> blocks = WrapShared(inputs[t % pool], *arena);
        shm_stream->UseSharedMemory(region, arena->Rest());
        return shm_stream->Step(std::move(blocks)).status();
      };
      auto local_step = [&](int t) -> absl::Status {
        natgrad::service::AssembledStep& step = decoded[t % pool];
        step.data.step = t + 1;
        return (*local)
            ->Step(step.data,
                   [&](natgrad::session::StepResult& result)
                       -> std::shared_ptr<const natgrad::session::CachedReply> {
                     return natgrad::service::EncodeStepReply(result, step, (*local)->config(),
                                                               local_name, /*durable_step=*/-1);
                   })
            .status();
      };
      struct Path {
        std::function<absl::Status(int)> step;
        std::vector<double>* ms;
        std::vector<double>* cpu_ms;
      };
      std::vector<Path> paths = {{plain_step, &rpc_ms, &rpc_cpu_ms},
                                 {local_step, &local_ms, &local_cpu_ms}};
      if (with_shm) paths.push_back({shm_step, &shm_ms, &shm_cpu_ms});
      std::optional<natgrad::bench::LoopbackTcpFloor> tcp_floor;
      std::vector<double> tcp_cpu_ms;
      if (absl::GetFlag(FLAGS_tcp_floor)) {
        natgrad::v1::StepRequest sized;
        for (auto& b : Wrap(inputs[0])) *sized.add_blocks() = std::move(b);
        tcp_floor.emplace(static_cast<int64_t>(sized.ByteSizeLong()), UpdateBytes(inputs[0]));
        paths.push_back({[&](int) {
                           tcp_floor->RoundTripMs();
                           return absl::OkStatus();
                         },
                         &tcp_ms, &tcp_cpu_ms});
      }
      for (int t = 0; t < steps + kWarmup; ++t) {
        for (size_t k = 0; k < paths.size(); ++k) {
          Path& path = paths[(t + k) % paths.size()];
          const double cpu_start = CpuMs();
          const auto start = Clock::now();
          const absl::Status s = path.step(t);
          const double ms = std::chrono::duration<double, std::milli>(Clock::now() - start).count();
          if (!s.ok()) return fail(s);
          if (t >= kWarmup) {
            path.ms->push_back(ms);
            path.cpu_ms->push_back(CpuMs() - cpu_start);
          }
        }
      }
      (*plain_stream)->Close().IgnoreError();
      client.DeleteSession(plain_session->name()).IgnoreError();
      if (with_shm) {
        shm_stream->Close().IgnoreError();
        client.DeleteSession(shm_session->name()).IgnoreError();
      }
      decoded.clear();
      server->registry().Delete(local_name, "bench").IgnoreError();
      return true;
    };

    struct Columns {
      std::vector<double> p50, p99, rate, ratio, cpu, cpu_ratio;
    };
    Columns plain, shm;
    std::vector<double> local_p50, local_p99, local_rate, decode_p50, local_cpu, tcp_p50,
        floor_ratio;
    for (int rep = 0; rep < reps; ++rep) {
      std::vector<double> rpc_ms, rpc_cpu_ms, shm_ms, shm_cpu_ms, local_ms, local_cpu_ms,
          decode_ms, tcp_ms;
      if (!run_rep(rpc_ms, rpc_cpu_ms, shm_ms, shm_cpu_ms, local_ms, local_cpu_ms, decode_ms,
                   tcp_ms)) {
        return 1;
      }

      const Figures b = Summarise(local_ms);
      local_p50.push_back(b.p50_ms);
      local_p99.push_back(b.p99_ms);
      local_rate.push_back(b.steps_per_s);
      decode_p50.push_back(Median(decode_ms));
      local_cpu.push_back(Median(local_cpu_ms));
      if (!tcp_ms.empty()) {
        tcp_p50.push_back(Median(tcp_ms));
        floor_ratio.push_back((b.p50_ms + tcp_p50.back()) / b.p50_ms);
      }
      auto add = [&](Columns& c, std::vector<double>& ms, std::vector<double>& cpu_ms) {
        if (ms.empty()) return;
        const Figures a = Summarise(ms);
        c.p50.push_back(a.p50_ms);
        c.p99.push_back(a.p99_ms);
        c.rate.push_back(a.steps_per_s);
        c.ratio.push_back(a.p50_ms / b.p50_ms);
        c.cpu.push_back(Median(cpu_ms));
        c.cpu_ratio.push_back(c.cpu.back() / std::max(1e-3, local_cpu.back()));
      };
      add(plain, rpc_ms, rpc_cpu_ms);
      add(shm, shm_ms, shm_cpu_ms);
    }
    // The floor belongs to the plain row (the shared-memory path sends no
    // tensor bytes through the socket).
    auto print = [&](const std::string& row, const Columns& c, bool with_floor) {
      if (c.ratio.empty()) return;
      const auto [lo, hi] = std::minmax_element(c.ratio.begin(), c.ratio.end());
      char range[64];
      std::snprintf(range, sizeof(range), "(%.2f-%.2f)", *lo, *hi);
      char tcp_text[16] = "-", floor_text[16] = "-";
      if (with_floor && !tcp_p50.empty()) {
        std::snprintf(tcp_text, sizeof(tcp_text), "%.2f", Median(tcp_p50));
        std::snprintf(floor_text, sizeof(floor_text), "%.3f", Median(floor_ratio));
      }
      std::printf(
          "%-10s %10.3f %10.3f %10.1f | %10.3f %10.3f %10.1f | %10.2f %15s | %10.3f | %8.2f "
          "%8.2f %8.2f | %8s %10s | %6.2f\n",
          row.c_str(), Median(c.p50), Median(c.p99), Median(c.rate), Median(local_p50),
          Median(local_p99), Median(local_rate), Median(c.ratio), range, Median(decode_p50),
          Median(c.cpu), Median(local_cpu), Median(c.cpu_ratio), tcp_text, floor_text, LoadAverage());
    };
    print(it->first, plain, true);
    print(it->first + "+shm", shm, false);
    std::fflush(stdout);
  }
  server->Shutdown(absl::Seconds(1));
  return 0;
}
