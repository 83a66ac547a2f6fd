// Does streaming a step one layer per message hide the server's work behind
// the client's backward pass? The MNIST autoencoder K-FAC step
// (784-1000-500-250-30-250-500-1000-784, batch 1000, float32, raw
// statistics, inverse every 10 steps) through a real server over loopback,
// sent two ways on two sessions, step by step alternately:
//
//   one message  the client waits out the whole emulated backward (layers x
//                gap), then sends every layer in one message
//   streamed     one message per layer, last layer first (backward's order),
//                with the gap before each next one; the first layer's
//                message is marked last
//
// Reported: the time from the start of the last message's send to the
// response (what the training job waits for once backward is done), and
// the whole step from its first send. A rep is a fresh pair of sessions,
// 2 warm-up steps, then --steps timed steps per session; its figure is the
// mean over its steps, and the table shows the median over --reps reps
// (min and max in brackets). The gap is a sleep: the client's backward is
// emulated as time the server may use, as when backward runs on a GPU or
// another host; --gaps_ms lists the gaps to try (0: no overlap possible).
//
//   streamed_step_bench [--reps=5] [--steps=10] [--gaps_ms=0,10,45]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "bench/common/loopback_server.h"
#include "server/linalg/openblas_environment.h"
#include "client/cpp/natgrad_client.h"
#include "client/cpp/tensor.h"
#include "server/service/natgrad_server.h"

ABSL_FLAG(int, reps, 5, "reps (fresh sessions each); the table shows the median");
ABSL_FLAG(int, steps, 10, "timed steps per session per rep (after 2 warm-up steps)");
ABSL_FLAG(std::string, gaps_ms, "0,10,45",
          "client-side gaps between layers' messages (emulated backward per layer), ms");
ABSL_FLAG(int, batch, 1000, "examples per step");

namespace {

using natgrad::v1::BlockStep;
using natgrad::v1::StepRequest;
using natgrad::v1::StepResponse;
using Clock = std::chrono::steady_clock;

const std::vector<int64_t> kWidths = {784, 1000, 500, 250, 30, 250, 500, 1000, 784};
constexpr int64_t kInversePeriod = 10;

natgrad::v1::SessionConfig AeConfig() {
  natgrad::v1::SessionConfig c;
  c.set_state_dtype(natgrad::v1::FLOAT32);
  for (size_t l = 0; l + 1 < kWidths.size(); ++l) {
    auto* b = c.add_blocks();
    b->set_name("layer" + std::to_string(l));
    auto* k = b->mutable_kfac_dense();
    k->set_d_in(kWidths[l]);
    k->set_d_out(kWidths[l + 1]);
    k->set_has_bias(true);
    k->set_inverse_period(kInversePeriod);
    k->mutable_learning_rate()->mutable_constant()->set_value(1e-3);
    k->mutable_damping()->mutable_constant()->set_value(1e-2);
  }
  return c;
}

std::vector<float> Random(std::mt19937& rng, size_t n) {
  std::normal_distribution<float> d;
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

// One step's layers, in backward's order (the last layer first).
std::vector<BlockStep> AeStep(std::mt19937& rng, int64_t batch) {
  std::vector<BlockStep> steps;
  for (size_t l = kWidths.size() - 1; l-- > 0;) {
    const int64_t din = kWidths[l], dout = kWidths[l + 1];
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
}

struct Timed {
  double after_last_ms = 0;  // last message's send started -> response
  double whole_ms = 0;       // first send (or the emulated backward's start) -> response
};

// One step on an open raw stream: `messages` sent with `gap` before each
// but the first (one message: the whole backward's wait, then the send).
bool RunStep(grpc::ClientReaderWriter<StepRequest, StepResponse>& stream,
             const std::vector<StepRequest>& messages, std::chrono::microseconds gap,
             int layers, Timed* out) {
  const auto begin = Clock::now();
  if (messages.size() == 1) std::this_thread::sleep_for(gap * (layers - 1));
  Clock::time_point last_start;
  for (size_t i = 0; i < messages.size(); ++i) {
    if (i > 0) std::this_thread::sleep_for(gap);
    last_start = Clock::now();
    if (!stream.Write(messages[i])) return false;
  }
  StepResponse response;
  if (!stream.Read(&response)) return false;
  const auto end = Clock::now();
  out->after_last_ms = std::chrono::duration<double, std::milli>(end - last_start).count();
  out->whole_ms = std::chrono::duration<double, std::milli>(end - begin).count();
  return true;
}

std::vector<StepRequest> Messages(const std::string& session, int64_t step,
                                  const std::vector<BlockStep>& blocks, bool streamed) {
  std::vector<StepRequest> out;
  if (!streamed) {
    StepRequest& r = out.emplace_back();
    r.set_session(session);
    r.set_step(step);
    r.set_last(true);
    for (const auto& b : blocks) *r.add_blocks() = b;
    return out;
  }
  for (size_t i = 0; i < blocks.size(); ++i) {
    StepRequest& r = out.emplace_back();
    r.set_session(session);
    r.set_step(step);
    r.set_last(i + 1 == blocks.size());
    *r.add_blocks() = blocks[i];
  }
  return out;
}

struct Stat {
  double median, min, max;
};

Stat Of(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return {v[v.size() / 2], v.front(), v.back()};
}

double Mean(const std::vector<double>& v) {
  double s = 0;
  for (double x : v) s += x;
  return s / static_cast<double>(v.size());
}

}  // namespace

int main(int argc, char** argv) {
  // The server in this process runs as natgrad-server does: idle OpenBLAS
  // workers asleep (server/linalg/openblas_environment.h).
  natgrad::linalg::ReexecWithQuietOpenBlasThreads(argv);
  absl::ParseCommandLine(argc, argv);
  const int reps = absl::GetFlag(FLAGS_reps);
  const int steps = absl::GetFlag(FLAGS_steps);
  const int64_t batch = absl::GetFlag(FLAGS_batch);
  std::vector<double> gaps;
  for (absl::string_view g : absl::StrSplit(absl::GetFlag(FLAGS_gaps_ms), ',')) {
    double v = 0;
    if (!absl::SimpleAtod(g, &v) || v < 0) {
      std::fprintf(stderr, "bad --gaps_ms entry %s\n", std::string(g).c_str());
      return 2;
    }
    gaps.push_back(v);
  }

  auto server = natgrad::bench::StartLoopbackServer();
  natgrad::client::Client client(natgrad::bench::LoopbackClientOptions(*server));
  const int layers = static_cast<int>(kWidths.size()) - 1;

  std::printf("MNIST AE K-FAC step, batch %lld, float32 raw statistics, inverse every %lld; "
              "%d reps x %d steps, median [min, max] of the reps' means\n",
              static_cast<long long>(batch), static_cast<long long>(kInversePeriod), reps, steps);
  std::printf("%7s | %-26s %-26s %7s | %-26s %-26s\n", "gap ms", "after last: one msg ms",
              "after last: streamed ms", "ratio", "whole step: one msg ms",
              "whole step: streamed ms");
  for (double gap_ms : gaps) {
    const auto gap = std::chrono::microseconds(static_cast<int64_t>(gap_ms * 1000));
    std::vector<double> one_last, str_last, one_whole, str_whole;
    for (int rep = 0; rep < reps; ++rep) {
      auto a = client.CreateSession(AeConfig());
      auto b = client.CreateSession(AeConfig());
      if (!a.ok() || !b.ok()) {
        std::fprintf(stderr, "CreateSession failed\n");
        return 1;
      }
      grpc::ClientContext ca, cb;
      auto sa = client.stub().Step(&ca);
      auto sb = client.stub().Step(&cb);
      std::mt19937 rng(static_cast<uint32_t>(rep + 1));
      std::vector<double> ol, sl, ow, sw;
      for (int t = 1; t <= steps + 2; ++t) {
        const std::vector<BlockStep> blocks = AeStep(rng, batch);  // untimed
        const auto ma = Messages(a->name(), t, blocks, false);
        const auto mb = Messages(b->name(), t, blocks, true);
        Timed ta, tb;
        if (!RunStep(*sa, ma, gap, layers, &ta) || !RunStep(*sb, mb, gap, layers, &tb)) {
          std::fprintf(stderr, "step %d failed: %s\n", t,
                       sa->Finish().error_message().c_str());
          return 1;
        }
        if (t > 2) {
          ol.push_back(ta.after_last_ms);
          sl.push_back(tb.after_last_ms);
          ow.push_back(ta.whole_ms);
          sw.push_back(tb.whole_ms);
        }
      }
      sa->WritesDone();
      sb->WritesDone();
      sa->Finish();
      sb->Finish();
      (void)client.DeleteSession(a->name());
      (void)client.DeleteSession(b->name());
      one_last.push_back(Mean(ol));
      str_last.push_back(Mean(sl));
      one_whole.push_back(Mean(ow));
      str_whole.push_back(Mean(sw));
    }
    std::vector<double> ratios;
    for (int r = 0; r < reps; ++r) ratios.push_back(str_last[r] / one_last[r]);
    const Stat a = Of(one_last), b = Of(str_last), c = Of(one_whole), d = Of(str_whole);
    const Stat q = Of(ratios);
    std::printf("%7.1f | %8.1f [%6.1f, %6.1f]    %8.1f [%6.1f, %6.1f]    %7.2f | "
                "%8.1f [%6.1f, %6.1f]    %8.1f [%6.1f, %6.1f]\n",
                gap_ms, a.median, a.min, a.max, b.median, b.min, b.max, q.median, c.median,
                c.min, c.max, d.median, d.min, d.max);
    std::fflush(stdout);
  }
  server->Shutdown(absl::Seconds(1));
  return 0;
}
