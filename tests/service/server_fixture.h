// A real natgrad server in-process on port 0 plus a C++ client (Envoy style:
// hermetic, no sleeps, real servers).
#ifndef NATGRAD_TESTS_SERVICE_SERVER_FIXTURE_H_
#define NATGRAD_TESTS_SERVICE_SERVER_FIXTURE_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "Eigen/Core"
#include "client/cpp/natgrad_client.h"
#include "client/cpp/tensor.h"
#include "gtest/gtest.h"
#include "server/core/block.h"
#include "server/engine/engine_factory.h"
#include "server/service/natgrad_server.h"
#include "tests/service/row_major.h"

namespace natgrad::testing {

inline std::unique_ptr<service::NatgradServer> StartServer(
    service::ServerOptions options = {}) {
  options.address = "127.0.0.1:0";
  options.engine.backend = "cpu";
  auto server = service::NatgradServer::Start(std::move(options));
  EXPECT_TRUE(server.ok()) << server.status();
  return server.ok() ? *std::move(server) : nullptr;
}

inline client::ClientOptions ClientFor(const service::NatgradServer& server) {
  client::ClientOptions o;
  o.target = "127.0.0.1:" + std::to_string(server.port());
  o.initial_backoff = absl::Milliseconds(5);
  return o;
}

inline std::vector<double> RandomVector(std::mt19937& rng, size_t n, double scale = 1.0) {
  std::normal_distribution<double> normal(0.0, scale);
  std::vector<double> v(n);
  for (auto& x : v) x = normal(rng);
  return v;
}

inline natgrad::v1::Schedule Constant(double v) {
  natgrad::v1::Schedule s;
  s.mutable_constant()->set_value(v);
  return s;
}

// One dense-gradient block of a test session: its core matrix shape and the
// shape it has on the wire.
struct DenseBlockShape {
  std::string name;
  int64_t rows, cols;
  std::vector<int64_t> wire;
};

// One step's inputs, as the wire and the in-process core blocks see them.
struct DenseStepData {
  std::vector<natgrad::v1::BlockStep> wire;
  std::vector<core::DenseStepInput> core;
};

// A random gradient and params per block (normal, from seed); float32 rounds
// them to float and sends float32 tensors, so both sides see one input.
inline DenseStepData DenseStepInputs(uint32_t seed, const std::vector<DenseBlockShape>& blocks,
                                     bool float32) {
  std::mt19937 rng(seed);
  DenseStepData d;
  for (const DenseBlockShape& s : blocks) {
    auto g = RandomVector(rng, s.rows * s.cols);
    auto p = RandomVector(rng, s.rows * s.cols);
    if (float32) {
      for (auto* v : {&g, &p})
        for (double& x : *v) x = static_cast<float>(x);
    }
    natgrad::v1::BlockStep b;
    b.set_name(s.name);
    *b.mutable_gradient() = client::MakeTensor(g, s.wire);
    *b.mutable_params() = client::MakeTensor(p, s.wire);
    if (float32) {
      *b.mutable_gradient() = client::MakeTensor(std::vector<float>(g.begin(), g.end()), s.wire);
      *b.mutable_params() = client::MakeTensor(std::vector<float>(p.begin(), p.end()), s.wire);
    }
    d.wire.push_back(b);
    core::DenseStepInput in;
    in.gradient = RowMajorMatrix(g, s.rows, s.cols);
    in.params = RowMajorMatrix(p, s.rows, s.cols);
    d.core.push_back(std::move(in));
  }
  return d;
}

// Steps 1..steps a session of config on a fresh server and the blocks that
// make_ref builds (the same blocks as core objects, in config order) on an
// engine of the test's own, and asserts the deltas equal bit for bit: the
// same arithmetic, only the transport differs (a float32 reply carries the
// float32 delta exactly). check, if set, sees each in-process delta.
inline void ExpectSessionEqualsCoreInProcess(
    const natgrad::v1::SessionConfig& config,
    std::vector<std::unique_ptr<core::ParameterBlock>> ref, int steps,
    const std::function<DenseStepData(int)>& inputs,
    const std::function<void(int step, size_t block, const Eigen::MatrixXd& delta)>& check = {}) {
  auto server = StartServer();
  client::Client client(ClientFor(*server));
  auto session = client.CreateSession(config);
  ASSERT_TRUE(session.ok()) << session.status();
  auto stream = client.OpenStream(session->name());
  ASSERT_TRUE(stream.ok());

  engine::EngineOptions eo;
  eo.backend = "cpu";
  auto engine = engine::CreateInversionEngine(eo);
  ASSERT_TRUE(engine.ok());
  for (int t = 1; t <= steps; ++t) {
    DenseStepData d = inputs(t);
    auto r = (*stream)->Step(d.wire);
    ASSERT_TRUE(r.ok()) << r.status();
    core::StepContext ctx;
    ctx.step = t;
    ctx.engine = engine->engine.get();
    for (size_t i = 0; i < ref.size(); ++i) {
      auto p = ref[i]->Propose(d.core[i], ctx);
      ASSERT_TRUE(p.ok()) << p.status();
      const Eigen::MatrixXd want = (*p)->Commit(1.0).delta.ToMatrix<double>();
      ASSERT_EQ(client::TensorValues(r->updates(i).delta()), RowMajorValues(want))
          << "step " << t << " block " << ref[i]->name();
      if (check) check(t, i, want);
    }
  }
}

// Two sessions of config step 1..split alike on one server; the second is
// exported (inspect sees the snapshot), imported into another server, and
// both step on to last: every delta must be the same bytes.
inline void ExpectSnapshotRestoreContinuesExactly(
    const natgrad::v1::SessionConfig& config,
    const std::function<std::vector<natgrad::v1::BlockStep>(int)>& inputs, int split, int last,
    const std::function<void(const natgrad::v1::SessionSnapshot&)>& inspect) {
  auto a = StartServer();
  auto b = StartServer();
  client::Client ca(ClientFor(*a)), cb(ClientFor(*b));
  auto reference = ca.CreateSession(config);
  auto moving = ca.CreateSession(config);
  ASSERT_TRUE(reference.ok() && moving.ok());
  auto ref_stream = *ca.OpenStream(reference->name());
  auto mov_stream = *ca.OpenStream(moving->name());
  for (int t = 1; t <= split; ++t) {
    ASSERT_TRUE(ref_stream->Step(inputs(t)).ok());
    ASSERT_TRUE(mov_stream->Step(inputs(t)).ok());
  }
  mov_stream->Close().IgnoreError();
  auto snapshot = ca.ExportSession(moving->name());
  ASSERT_TRUE(snapshot.ok()) << snapshot.status();
  inspect(*snapshot);
  auto imported = cb.ImportSession(*snapshot);
  ASSERT_TRUE(imported.ok()) << imported.status();
  auto moved = *cb.OpenStream(moving->name());
  for (int t = split + 1; t <= last; ++t) {
    auto want = ref_stream->Step(inputs(t));
    auto got = moved->Step(inputs(t));
    ASSERT_TRUE(want.ok() && got.ok()) << got.status();
    for (int i = 0; i < got->updates_size(); ++i) {
      EXPECT_EQ(got->updates(i).delta().data(), want->updates(i).delta().data())
          << "step " << t << " block " << i;
    }
  }
}

}  // namespace natgrad::testing

#endif  // NATGRAD_TESTS_SERVICE_SERVER_FIXTURE_H_
