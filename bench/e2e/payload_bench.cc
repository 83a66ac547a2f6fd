// Tensor payload one Step stream delivers over loopback: one session with a
// single sgd block of --values float32 values (16M: a 64 MiB gradient up and
// a 64 MiB float32 delta down), stepped through a real server (in-process
// NatgradServer on port 0, C++ client). Per rep, the p50 over --steps steps
// of
//   all in     payload bytes (up + down) / client round-trip time
//   no compute the same, with the server's StepTiming.compute_micros
//              subtracted (decode, encode and transport stay in)
// and, for scale, memcpy of the same bytes (up + down) in the same process;
// each column reported as the median over --reps reps. Also: the round trip,
// the server's StepTiming (decode, compute, encode, and server = first
// message received to reply encoded), "wire" = round trip - server (the
// client's encode and parse, transport both ways, the server's parse of the
// request), and the CPU time this process (client and server) spent per
// step, which says what an idle machine would do when others are compiling. The client's own
// serialization (MakeTensor from the caller's array, proto encoding) is in
// the round trip; producing the gradient values is not.
//
//   payload_bench [--values=16777216] [--steps=5] [--reps=5]

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "bench/common/loopback_server.h"
#include "server/linalg/openblas_environment.h"
#include "client/cpp/natgrad_client.h"
#include "client/cpp/tensor.h"

ABSL_FLAG(int64_t, values, int64_t{16} << 20, "float32 values in the gradient (16M: 64 MiB)");
ABSL_FLAG(int, steps, 5, "timed steps per rep (after one warm-up step)");
ABSL_FLAG(int, reps, 5, "reps; each column is the median of the reps' p50s");

namespace {

using Clock = std::chrono::steady_clock;

using natgrad::bench::LoadAverage;
using natgrad::bench::Median;
using natgrad::bench::ProcessCpuSeconds;

}  // namespace

int main(int argc, char** argv) {
  // The server in this process runs as natgrad-server does: idle OpenBLAS
  // workers asleep (server/linalg/openblas_environment.h).
  natgrad::linalg::ReexecWithQuietOpenBlasThreads(argv);
  absl::ParseCommandLine(argc, argv);
  const int64_t n = absl::GetFlag(FLAGS_values);
  const int steps = absl::GetFlag(FLAGS_steps);
  const int reps = absl::GetFlag(FLAGS_reps);
  if (n <= 0 || steps <= 0 || reps <= 0) {
    std::fprintf(stderr, "--values, --steps and --reps must be positive\n");
    return 2;
  }
  const int64_t bytes_each_way = n * static_cast<int64_t>(sizeof(float));
  const double payload = 2.0 * static_cast<double>(bytes_each_way);

  auto server = natgrad::bench::StartLoopbackServer();
  natgrad::client::Client client(natgrad::bench::LoopbackClientOptions(*server));

  natgrad::v1::SessionConfig config;
  auto* block = config.add_blocks();
  block->set_name("w");
  block->add_shape(n);
  block->mutable_sgd()->mutable_learning_rate()->mutable_constant()->set_value(1e-3);
  auto session = client.CreateSession(config);
  if (!session.ok()) {
    std::fprintf(stderr, "%s\n", session.status().ToString().c_str());
    return 1;
  }
  auto stream = client.OpenStream(session->name());
  if (!stream.ok()) {
    std::fprintf(stderr, "%s\n", stream.status().ToString().c_str());
    return 1;
  }

  // The caller's gradient: produced once, outside the timing.
  std::vector<float> gradient(n);
  {
    std::mt19937 rng(1);
    std::normal_distribution<float> d;
    for (auto& x : gradient) x = d(rng);
  }
  std::vector<float> copy_target(n);

  std::printf("payload %.1f MiB each way, %d steps/rep, %d reps\n",
              bytes_each_way / 1048576.0, steps, reps);
  std::vector<double> all_in, no_compute, memcpy_gbs, rtt_ms, compute_ms, decode_ms, encode_ms,
      server_ms, wire_ms, cpu_ms;
  for (int rep = 0; rep < reps; ++rep) {
    std::vector<double> rep_all, rep_nc, rep_rtt, rep_compute, rep_decode, rep_encode, rep_server,
        rep_wire, rep_cpu;
    for (int t = 0; t < steps + (rep == 0 ? 1 : 0); ++t) {
      const double cpu_start = ProcessCpuSeconds();
      const auto start = Clock::now();
      natgrad::v1::BlockStep s;
      s.set_name("w");
      *s.mutable_gradient() = natgrad::client::MakeTensor(gradient.data(), {n});
      std::vector<natgrad::v1::BlockStep> blocks;
      blocks.push_back(std::move(s));
      auto r = (*stream)->Step(std::move(blocks));
      const double s_elapsed = std::chrono::duration<double>(Clock::now() - start).count();
      const double cpu = ProcessCpuSeconds() - cpu_start;
      if (!r.ok()) {
        std::fprintf(stderr, "%s\n", r.status().ToString().c_str());
        return 1;
      }
      if (r->updates_size() != 1 || r->updates(0).delta().data().size() !=
                                        static_cast<size_t>(bytes_each_way)) {
        std::fprintf(stderr, "unexpected reply: %d updates, delta of %zu bytes\n",
                     r->updates_size(),
                     r->updates_size() > 0 ? r->updates(0).delta().data().size() : size_t{0});
        return 1;
      }
      if (rep == 0 && t == 0) continue;  // warm-up
      const double compute_s = r->timing().compute_micros() * 1e-6;
      rep_all.push_back(payload / s_elapsed / 1e9);
      rep_nc.push_back(payload / std::max(1e-9, s_elapsed - compute_s) / 1e9);
      rep_rtt.push_back(s_elapsed * 1e3);
      rep_compute.push_back(compute_s * 1e3);
      rep_decode.push_back(r->timing().decode_micros() * 1e-3);
      rep_encode.push_back(r->timing().encode_micros() * 1e-3);
      rep_server.push_back(r->timing().server_micros() * 1e-3);
      rep_wire.push_back(s_elapsed * 1e3 - r->timing().server_micros() * 1e-3);
      rep_cpu.push_back(cpu * 1e3);
    }
    // The same bytes moved by memcpy, up and down, in this process.
    std::vector<double> rep_memcpy;
    for (int t = 0; t < steps; ++t) {
      const auto start = Clock::now();
      std::memcpy(copy_target.data(), gradient.data(), bytes_each_way);
      std::memcpy(gradient.data(), copy_target.data(), bytes_each_way);
      const double s_elapsed = std::chrono::duration<double>(Clock::now() - start).count();
      rep_memcpy.push_back(payload / s_elapsed / 1e9);
    }
    all_in.push_back(Median(rep_all));
    no_compute.push_back(Median(rep_nc));
    rtt_ms.push_back(Median(rep_rtt));
    compute_ms.push_back(Median(rep_compute));
    memcpy_gbs.push_back(Median(rep_memcpy));
    decode_ms.push_back(Median(rep_decode));
    encode_ms.push_back(Median(rep_encode));
    server_ms.push_back(Median(rep_server));
    wire_ms.push_back(Median(rep_wire));
    cpu_ms.push_back(Median(rep_cpu));
    std::printf("rep %d: all in %.3f GB/s, no compute %.3f GB/s, round trip %.1f ms "
                "(compute %.1f ms, wire %.1f ms, cpu %.1f ms), memcpy %.2f GB/s, load %.2f\n",
                rep, all_in.back(), no_compute.back(), rtt_ms.back(), compute_ms.back(),
                wire_ms.back(), cpu_ms.back(), memcpy_gbs.back(), LoadAverage());
  }
  (*stream)->Close().IgnoreError();
  std::printf("%-8s %11s %15s %11s | %9s %9s %9s %9s %9s | %9s | %11s %6s\n", "MiB", "all in GB/s",
              "no compute GB/s", "rtt ms", "server ms", "decode", "compute", "encode", "wire ms",
              "cpu ms", "memcpy GB/s", "load");
  std::printf("%-8.1f %11.3f %15.3f %11.1f | %9.1f %9.1f %9.1f %9.1f %9.1f | %9.1f | %11.2f %6.2f\n",
              bytes_each_way / 1048576.0, Median(all_in), Median(no_compute), Median(rtt_ms),
              Median(server_ms), Median(decode_ms), Median(compute_ms), Median(encode_ms),
              Median(wire_ms), Median(cpu_ms), Median(memcpy_gbs), LoadAverage());
  server->Shutdown(absl::Seconds(1));
  return 0;
}
