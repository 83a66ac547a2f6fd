// Many K-FAC sessions stepping at once on a server with one worker slot
// (--worker_threads=1): steps blocked on the inversion engine give the slot
// to other sessions' steps (server/service/step_executor.h), every session
// completes, and each one's updates equal its core blocks run in-process.
#include <algorithm>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "server/blocks/kfac_dense/math/kfac_dense_block.h"
#include "server/engine/engine_factory.h"
#include "server/service/step_executor.h"
#include "tests/service/row_major.h"
#include "tests/service/server_fixture.h"

namespace natgrad::testing {
namespace {

const std::vector<int64_t> kWidths = {12, 8, 4};
constexpr int64_t kBatch = 16;
constexpr int kSessions = 12;
constexpr int kSteps = 5;

bool EigenExact(int session) { return session % 2 == 1; }

natgrad::v1::SessionConfig MlpConfig(int session) {
  natgrad::v1::SessionConfig c;
  c.set_state_dtype(natgrad::v1::FLOAT64);
  for (size_t l = 0; l + 1 < kWidths.size(); ++l) {
    auto* b = c.add_blocks();
    b->set_name("fc" + std::to_string(l));
    auto* k = b->mutable_kfac_dense();
    k->set_d_in(kWidths[l]);
    k->set_d_out(kWidths[l + 1]);
    k->set_has_bias(true);
    *k->mutable_learning_rate() = Constant(0.3);
    *k->mutable_damping() = Constant(1e-2);
    *k->mutable_momentum() = Constant(0.9);
    k->set_inverse_period(1);  // every step decomposes
    k->set_damping_mode(EigenExact(session) ? natgrad::v1::EIGEN_EXACT
                                            : natgrad::v1::FACTORED_TIKHONOV);
  }
  return c;
}

std::vector<std::unique_ptr<core::ParameterBlock>> CoreBlocks(int session) {
  std::vector<std::unique_ptr<core::ParameterBlock>> blocks;
  for (size_t l = 0; l + 1 < kWidths.size(); ++l) {
    core::KfacDenseOptions o;
    o.d_in = kWidths[l];
    o.d_out = kWidths[l + 1];
    o.has_bias = true;
    o.learning_rate = core::ConstantSchedule(0.3);
    o.damping = core::ConstantSchedule(1e-2);
    o.momentum = core::ConstantSchedule(0.9);
    o.inverse_period = 1;
    o.damping_mode = EigenExact(session) ? core::KfacDampingMode::kEigenExact
                                         : core::KfacDampingMode::kFactoredTikhonov;
    blocks.push_back(
        *core::NewKfacDenseBlock("fc" + std::to_string(l), o, core::Precision::kFloat64));
  }
  return blocks;
}

// One session's step: the wire blocks and the same inputs as core types.
struct StepInputs {
  std::vector<natgrad::v1::BlockStep> wire;
  std::vector<core::KfacStepInput> core;
};

StepInputs InputsFor(int session, int step) {
  std::mt19937 rng(1000 * session + step);
  StepInputs d;
  for (size_t l = 0; l + 1 < kWidths.size(); ++l) {
    const int64_t din = kWidths[l], dout = kWidths[l + 1];
    auto g = RandomVector(rng, dout * (din + 1), 0.1);
    auto a = RandomVector(rng, kBatch * din);
    auto og = RandomVector(rng, kBatch * dout);
    natgrad::v1::BlockStep s;
    s.set_name("fc" + std::to_string(l));
    *s.mutable_gradient() = client::MakeTensor(g, {dout, din + 1});
    *s.mutable_kfac()->mutable_raw()->mutable_activations() = client::MakeTensor(a, {kBatch, din});
    *s.mutable_kfac()->mutable_raw()->mutable_output_gradients() =
        client::MakeTensor(og, {kBatch, dout});
    d.wire.push_back(s);
    core::KfacStepInput in;
    in.gradient = RowMajorMatrix(g, dout, din + 1);
    core::KfacStatisticsInput k;
    k.activations = RowMajorMatrix(a, kBatch, din);
    k.output_gradients = RowMajorMatrix(og, kBatch, dout);
    k.num_examples = kBatch;
    in.kfac = k;
    d.core.push_back(in);
  }
  return d;
}

TEST(ConcurrentKfacService, SessionsOnOneWorkerSlotAllCompleteAndEqualCoreInProcess) {
  service::ServerOptions options;
  options.worker_threads = 1;
  auto server = StartServer(options);
  ASSERT_NE(server, nullptr);
  // Held while the first steps arrive: each blocks on the engine in its
  // first block, so the pending jobs (2 per step) show how many steps wait
  // at once on the one slot.
  server->engine().Pause();

  std::vector<std::vector<natgrad::v1::StepResponse>> got(kSessions);
  absl::Mutex mu;
  int first_steps_done = 0;  // guarded by mu
  std::vector<std::thread> threads;
  for (int i = 0; i < kSessions; ++i) {
    threads.emplace_back([&, i] {
      client::Client client(ClientFor(*server));
      auto session = client.CreateSession(MlpConfig(i));
      ASSERT_TRUE(session.ok()) << session.status();
      auto stream = client.OpenStream(session->name());
      ASSERT_TRUE(stream.ok()) << stream.status();
      for (int t = 1; t <= kSteps; ++t) {
        auto r = (*stream)->Step(InputsFor(i, t).wire);
        ASSERT_TRUE(r.ok()) << "session " << i << " step " << t << ": " << r.status();
        got[i].push_back(*std::move(r));
        if (t == 1) {
          absl::MutexLock lock(&mu);
          ++first_steps_done;
        }
      }
    });
  }
  // Polled: the engine offers no event for a job being queued.
  // Every session's first step, up to the executor's bound on steps in
  // flight per slot (the bound itself: step_executor_test).
  const int64_t want_pending =
      2 * std::min<int64_t>(kSessions, service::StepExecutor::kMaxThreadsPerSlot);
  const absl::Time deadline = absl::Now() + absl::Seconds(60);
  int64_t pending = 0;
  while ((pending = server->engine().stats().pending) < want_pending && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(1));
  }
  EXPECT_EQ(pending, want_pending)
      << "with one worker slot, " << want_pending / 2
      << " steps should wait on the held engine at once";
  {
    absl::MutexLock lock(&mu);
    EXPECT_EQ(first_steps_done, 0);  // nothing can finish while the engine is held
  }
  server->engine().Resume();
  for (auto& t : threads) t.join();

  // The reference: each session's core blocks on an engine of the test's own,
  // stepped on this thread (no executor: plain blocking waits).
  engine::EngineOptions eo;
  eo.backend = "cpu";
  auto engine = engine::CreateInversionEngine(eo);
  ASSERT_TRUE(engine.ok());
  for (int i = 0; i < kSessions; ++i) {
    ASSERT_EQ(got[i].size(), size_t(kSteps)) << "session " << i;
    auto ref = CoreBlocks(i);
    for (int t = 1; t <= kSteps; ++t) {
      StepInputs d = InputsFor(i, t);
      core::StepContext ctx;
      ctx.step = t;
      ctx.engine = engine->engine.get();
      const natgrad::v1::StepResponse& r = got[i][t - 1];
      for (size_t l = 0; l < ref.size(); ++l) {
        auto p = ref[l]->Propose(d.core[l], ctx);
        ASSERT_TRUE(p.ok()) << p.status();
        const Eigen::MatrixXd want = (*p)->Commit(1.0).delta.ToMatrix<double>();
        const std::vector<double> values = client::TensorValues(r.updates(l).delta());
        ASSERT_EQ(values.size(), size_t(want.size()));
        const double scale = want.cwiseAbs().maxCoeff();
        for (int64_t a = 0; a < want.rows(); ++a)
          for (int64_t b = 0; b < want.cols(); ++b)
            ASSERT_NEAR(values[a * want.cols() + b], want(a, b), 1e-10 * scale)
                << "session " << i << " step " << t << " layer " << l;
      }
    }
  }
}

}  // namespace
}  // namespace natgrad::testing
