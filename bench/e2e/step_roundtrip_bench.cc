// End-to-end step benchmark: the same steps through a real server over
// loopback (C++ client, Step stream) and in-process (StepAssembler +
// Session::Step + reply encoding, i.e. everything but gRPC), reported as
// p50/p99 latency, throughput and their ratio, measured in one run, plus the
// server-side decode time per step (StepAssembler::Add).
//
//   step_roundtrip_bench [--steps=N] [--models=adam_1k,adam_1m,kfac_ae]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_split.h"
#include "client/cpp/natgrad_client.h"
#include "client/cpp/tensor.h"
#include "server/service/natgrad_server.h"
#include "server/service/step_assembler.h"
#include "server/service/step_reply.h"

ABSL_FLAG(int, steps, 50, "timed steps per model (after 3 warm-up steps)");
ABSL_FLAG(std::string, models, "adam_1k,adam_100k,adam_1m,kfac_mlp",
          "comma-separated: adam_1k, adam_100k, adam_1m, kfac_mlp, kfac_ae");

namespace {

using natgrad::v1::BlockStep;
using natgrad::v1::SessionConfig;
using Clock = std::chrono::steady_clock;

struct Model {
  SessionConfig config;
  // Builds one step's blocks.
  std::function<std::vector<BlockStep>(std::mt19937&)> step;
};

std::vector<float> Random(std::mt19937& rng, size_t n) {
  std::normal_distribution<float> d;
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

Model AdamModel(int64_t n) {
  Model m;
  auto* b = m.config.add_blocks();
  b->set_name("w");
  b->add_shape(n);
  b->mutable_adam();
  m.step = [n](std::mt19937& rng) {
    BlockStep s;
    s.set_name("w");
    *s.mutable_gradient() = natgrad::client::MakeTensor(Random(rng, n), {n});
    return std::vector<BlockStep>{s};
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
    std::vector<BlockStep> steps;
    for (size_t l = 0; l + 1 < widths.size(); ++l) {
      const int64_t din = widths[l], dout = widths[l + 1];
      BlockStep s;
      s.set_name("layer" + std::to_string(l));
      *s.mutable_gradient() =
          natgrad::client::MakeTensor(Random(rng, dout * (din + 1)), {dout, din + 1});
      auto* raw = s.mutable_kfac()->mutable_raw();
      *raw->mutable_activations() = natgrad::client::MakeTensor(Random(rng, batch * din), {batch, din});
      *raw->mutable_output_gradients() =
          natgrad::client::MakeTensor(Random(rng, batch * dout), {batch, dout});
      steps.push_back(std::move(s));
    }
    return steps;
  };
  return m;
}

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
  options.address = "127.0.0.1:0";
  options.engine.backend = "cpu";
  auto server = natgrad::service::NatgradServer::Start(options);
  if (!server.ok()) {
    std::fprintf(stderr, "%s\n", server.status().ToString().c_str());
    return 1;
  }
  natgrad::client::ClientOptions co;
  co.target = "127.0.0.1:" + std::to_string((*server)->port());
  natgrad::client::Client client(co);
  const int steps = absl::GetFlag(FLAGS_steps);

  std::printf("%-10s %12s %12s %12s | %12s %12s %12s | %8s | %9s\n", "model", "rpc p50 ms",
              "rpc p99 ms", "rpc steps/s", "inproc p50", "inproc p99", "inproc st/s",
              "rpc/inproc", "decode p50");
  for (absl::string_view name : absl::StrSplit(absl::GetFlag(FLAGS_models), ',')) {
    auto it = models.find(std::string(name));
    if (it == models.end()) {
      std::fprintf(stderr, "unknown model %s\n", std::string(name).c_str());
      return 2;
    }
    const Model& model = it->second;
    // Pre-build the steps so both paths time only the optimizer service.
    std::mt19937 rng(1);
    std::vector<std::vector<BlockStep>> inputs;
    for (int t = 0; t < steps + 3; ++t) inputs.push_back(model.step(rng));

    // Over loopback.
    auto session = client.CreateSession(model.config);
    if (!session.ok()) {
      std::fprintf(stderr, "%s: %s\n", it->first.c_str(), session.status().ToString().c_str());
      return 1;
    }
    auto stream = *client.OpenStream(session->name());
    std::vector<double> rpc_ms;
    for (int t = 0; t < steps + 3; ++t) {
      const auto start = Clock::now();
      auto r = stream->Step(inputs[t]);
      const double ms = std::chrono::duration<double, std::milli>(Clock::now() - start).count();
      if (!r.ok()) {
        std::fprintf(stderr, "%s\n", r.status().ToString().c_str());
        return 1;
      }
      if (t >= 3) rpc_ms.push_back(ms);
    }
    stream->Close().IgnoreError();

    // In-process: the same decode + session step, no gRPC.
    auto local = (*server)->registry().Create(model.config, "bench", "");
    std::vector<double> local_ms, decode_ms;
    for (int t = 0; t < steps + 3; ++t) {
      natgrad::v1::StepRequest req;
      req.set_session((*local)->name());
      req.set_step(t + 1);
      req.set_last(true);
      for (const auto& b : inputs[t]) *req.add_blocks() = b;
      const auto start = Clock::now();
      natgrad::service::StepAssembler assembler((*local)->config(), int64_t{1} << 40);
      if (!assembler.Add(req).ok()) return 1;
      const auto decoded = Clock::now();
      natgrad::service::AssembledStep step = assembler.Take();
      const std::string name = (*local)->name();
      auto r = (*local)->Step(step.data, [&](natgrad::session::StepResult& result)
                                             -> std::shared_ptr<const natgrad::session::CachedReply> {
        return natgrad::service::EncodeStepReply(result, step, (*local)->config(), name,
                                                  /*durable_step=*/-1);
      });
      const double ms = std::chrono::duration<double, std::milli>(Clock::now() - start).count();
      if (!r.ok()) return 1;
      if (t >= 3) {
        local_ms.push_back(ms);
        decode_ms.push_back(std::chrono::duration<double, std::milli>(decoded - start).count());
      }
    }
    const Figures a = Summarise(rpc_ms), b = Summarise(local_ms), d = Summarise(decode_ms);
    std::printf("%-10s %12.3f %12.3f %12.1f | %12.3f %12.3f %12.1f | %8.2f | %9.3f\n",
                it->first.c_str(), a.p50_ms, a.p99_ms, a.steps_per_s, b.p50_ms, b.p99_ms,
                b.steps_per_s, a.p50_ms / b.p50_ms, d.p50_ms);
  }
  (*server)->Shutdown(absl::Seconds(1));
  return 0;
}
