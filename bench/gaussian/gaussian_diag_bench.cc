// A diagonal Gaussian block of M elements (default 10^7, float32, mean +
// log-std, parametrisation gradients) stepped through a real server over
// loopback, and the same block in-process on the same compute pool: time per
// step and the bytes per second the step moves (request + response payloads).
//
//   gaussian_diag_bench [--dim=10000000] [--steps=5]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "bench/common/loopback_server.h"
#include "client/cpp/natgrad_client.h"
#include "client/cpp/tensor.h"
#include "server/blocks/gaussian_diag/math/gaussian_diag_block.h"
#include "server/linalg/compute_pool.h"
#include "server/service/natgrad_server.h"

ABSL_FLAG(int64_t, dim, 10000000, "elements of the diagonal Gaussian");
ABSL_FLAG(int, steps, 5, "timed steps (after one warm-up)");

namespace {

using Clock = std::chrono::steady_clock;

using natgrad::bench::Median;

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  const int64_t dim = absl::GetFlag(FLAGS_dim);
  const int steps = absl::GetFlag(FLAGS_steps);
  std::mt19937 rng(1);
  std::normal_distribution<float> normal(0.f, 0.1f);
  std::vector<float> m(dim), rho(dim), g1(dim), g2(dim);
  for (int64_t i = 0; i < dim; ++i) {
    m[i] = normal(rng);
    rho[i] = normal(rng);
    g1[i] = normal(rng);
    g2[i] = normal(rng);
  }

  auto server = natgrad::bench::StartLoopbackServer();
  natgrad::client::ClientOptions co = natgrad::bench::LoopbackClientOptions(*server);
  co.max_message_bytes = int64_t{1} << 30;
  natgrad::client::Client client(co);
  natgrad::v1::SessionConfig c;
  c.set_state_dtype(natgrad::v1::FLOAT32);
  auto* q = c.add_blocks();
  q->set_name("q");
  q->mutable_gaussian_diag()->set_dim(dim);
  q->mutable_gaussian_diag()->set_parametrization(natgrad::v1::DIAG_MEAN_LOG_STD);
  q->mutable_gaussian_diag()->mutable_gamma()->mutable_constant()->set_value(0.1);
  auto session = client.CreateSession(c);
  if (!session.ok()) {
    std::fprintf(stderr, "%s\n", session.status().ToString().c_str());
    return 1;
  }
  auto stream = client.OpenStream(session->name());
  natgrad::v1::BlockStep b;
  b.set_name("q");
  auto* in = b.mutable_gaussian();
  *in->mutable_param1() = natgrad::client::MakeTensor(m, {1, dim});
  *in->mutable_param2() = natgrad::client::MakeTensor(rho, {1, dim});
  *in->mutable_grad1() = natgrad::client::MakeTensor(g1, {1, dim});
  *in->mutable_grad2() = natgrad::client::MakeTensor(g2, {1, dim});
  in->set_gradient_space(natgrad::v1::PARAMETRIZATION_GRADIENT);
  std::vector<double> rpc_ms, server_ms;
  int64_t bytes = 0;
  for (int t = 0; t <= steps; ++t) {
    const auto start = Clock::now();
    auto r = (*stream)->Step({b});
    const double ms = std::chrono::duration<double, std::milli>(Clock::now() - start).count();
    if (!r.ok()) {
      std::fprintf(stderr, "%s\n", r.status().ToString().c_str());
      return 1;
    }
    bytes = static_cast<int64_t>(b.ByteSizeLong() + r->ByteSizeLong());
    if (t > 0) {
      rpc_ms.push_back(ms);
      server_ms.push_back(r->timing().server_micros() / 1000.0);
    }
  }
  (*stream)->Close().IgnoreError();

  // In-process: the block alone on a pool of the same size as the server's.
  natgrad::linalg::ComputePool pool(0);
  natgrad::core::GaussianDiagOptions o;
  o.dim = dim;
  o.parametrization = natgrad::core::GaussianDiagParametrization::kMeanLogStd;
  o.gamma = natgrad::core::ConstantSchedule(0.1);
  auto block = *natgrad::core::NewGaussianDiagBlock("q", o, natgrad::core::Precision::kFloat32);
  auto tensor = [&](const std::vector<float>& v) {
    std::string bytes(v.size() * 4, '\0');
    std::memcpy(bytes.data(), v.data(), bytes.size());
    return natgrad::core::DenseTensor::FromBytes(natgrad::core::DType::kFloat32, {1, dim},
                                                 std::move(bytes));
  };
  natgrad::core::GaussianDiagStepInput ci;
  ci.param1 = tensor(m);
  ci.param2 = tensor(rho);
  ci.grad1 = tensor(g1);
  ci.grad2 = tensor(g2);
  ci.gradient_space = natgrad::core::GaussianStepInput::GradientSpace::kParametrization;
  std::vector<double> local_ms;
  for (int t = 1; t <= steps + 1; ++t) {
    natgrad::core::StepContext ctx;
    ctx.step = t;
    ctx.compute_pool = &pool;
    const auto start = Clock::now();
    auto p = block->Propose(ci, ctx);
    if (!p.ok()) return 1;
    (*p)->Commit(1);
    const double ms = std::chrono::duration<double, std::milli>(Clock::now() - start).count();
    if (t > 1) local_ms.push_back(ms);
  }
  const double rpc = Median(rpc_ms), srv = Median(server_ms), local = Median(local_ms);
  std::printf("gaussian_diag M=%lld float32, median of %d steps\n", static_cast<long long>(dim),
              steps);
  std::printf("  rpc step      %9.1f ms   %6.2f GB/s of payload (%.0f MB per step)\n", rpc,
              bytes / rpc / 1e6, bytes / 1e6);
  std::printf("  server side   %9.1f ms   (StepTiming.server_micros)\n", srv);
  std::printf("  in-process    %9.1f ms   %6.2f GB/s of the block's own arrays (4 in, 4 out)\n",
              local, 8.0 * 4 * dim / local / 1e6);
  std::printf("  rpc / in-process %.2f\n", rpc / local);
  server->Shutdown(absl::Seconds(1));
  return 0;
}
