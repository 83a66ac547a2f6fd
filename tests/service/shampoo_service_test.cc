// The shampoo kind through the service: a session mixing blocked shampoo
// blocks (a 20 x 12 parameter with max_preconditioner_dim 8: six tiles), a
// diagonal (1-D) shampoo block and an adam block gives the updates of the
// core blocks called in-process on an engine of our own, bit for bit; a
// snapshot restored into another server continues exactly.
#include "gmock/gmock.h"
#include "google/protobuf/util/message_differencer.h"
#include "server/blocks/adam/math/adam_block.h"
#include "server/blocks/shampoo/math/shampoo_block.h"
#include "server/engine/engine_factory.h"
#include "tests/service/server_fixture.h"

namespace natgrad::testing {
namespace {

using ::testing::HasSubstr;

constexpr int64_t kRows = 20, kCols = 12, kSmallRows = 5, kSmallCols = 3, kBias = 12;

void SetShampoo(natgrad::v1::ShampooConfig* s) {
  *s->mutable_learning_rate() = Constant(0.05);
  *s->mutable_weight_decay() = Constant(0.01);
  s->set_beta2(0.95);
  s->set_epsilon(1e-6);
  s->set_bias_correction(true);
  s->set_precondition_frequency(3);
  s->set_start_preconditioning_step(2);
  s->set_max_preconditioner_dim(8);
}

core::ShampooOptions ShampooCore() {
  core::ShampooOptions o;
  o.learning_rate = core::ConstantSchedule(0.05);
  o.weight_decay = core::ConstantSchedule(0.01);
  o.beta2 = 0.95;
  o.epsilon = 1e-6;
  o.bias_correction = true;
  o.precondition_frequency = 3;
  o.start_preconditioning_step = 2;
  o.max_preconditioner_dim = 8;
  return o;
}

struct Spec {
  std::string name;
  int64_t rows, cols;
  bool rank1;
  bool adam;
  // The wire shape when it is not [rows, cols] / [rows].
  std::vector<int64_t> tensor = {};
  int64_t view_rows = 0;  // what the kind must derive from `tensor`
};

std::vector<int64_t> WireShape(const Spec& s) {
  if (!s.tensor.empty()) return s.tensor;
  if (s.rank1) return {s.rows};
  return {s.rows, s.cols};
}

const std::vector<Spec>& Specs() {
  static const std::vector<Spec> specs = {{"big", kRows, kCols, false, false},
                                          {"small", kSmallRows, kSmallCols, false, false},
                                          {"bias", kBias, 1, true, false},
                                          {"head", 3, 4, false, true},
                                          // [3, 2, 10] merges to a 6 x 10 view (max 8).
                                          {"conv", 3, 20, false, false, {3, 2, 10}, 6}};
  return specs;
}

natgrad::v1::SessionConfig Config(natgrad::v1::DType dtype) {
  natgrad::v1::SessionConfig c;
  c.set_state_dtype(dtype);
  for (const Spec& s : Specs()) {
    auto* b = c.add_blocks();
    b->set_name(s.name);
    for (int64_t d : WireShape(s)) b->add_shape(d);
    if (s.adam) {
      *b->mutable_adam()->mutable_learning_rate() = Constant(0.01);
    } else {
      SetShampoo(b->mutable_shampoo());
      if (s.name == "small") b->mutable_shampoo()->set_grafting(natgrad::v1::SHAMPOO_GRAFTING_SGD);
    }
  }
  return c;
}

Eigen::MatrixXd RowMajor(const std::vector<double>& v, int64_t r, int64_t c) {
  Eigen::MatrixXd m(r, c);
  for (int64_t i = 0; i < r; ++i)
    for (int64_t j = 0; j < c; ++j) m(i, j) = v[i * c + j];
  return m;
}

std::vector<double> Flatten(const Eigen::MatrixXd& m) {
  std::vector<double> v;
  for (int64_t r = 0; r < m.rows(); ++r)
    for (int64_t c = 0; c < m.cols(); ++c) v.push_back(m(r, c));
  return v;
}

struct StepData {
  std::vector<natgrad::v1::BlockStep> wire;
  std::vector<core::DenseStepInput> core;
};

StepData Inputs(int t, bool float32) {
  std::mt19937 rng(1000 + t);
  StepData d;
  for (const Spec& s : Specs()) {
    auto g = RandomVector(rng, s.rows * s.cols);
    auto p = RandomVector(rng, s.rows * s.cols);
    if (float32) {
      for (auto* v : {&g, &p})
        for (double& x : *v) x = static_cast<float>(x);
    }
    const std::vector<int64_t> shape = WireShape(s);
    natgrad::v1::BlockStep b;
    b.set_name(s.name);
    *b.mutable_gradient() = client::MakeTensor(g, shape);
    *b.mutable_params() = client::MakeTensor(p, shape);
    if (float32) {
      *b.mutable_gradient() = client::MakeTensor(std::vector<float>(g.begin(), g.end()), shape);
      *b.mutable_params() = client::MakeTensor(std::vector<float>(p.begin(), p.end()), shape);
    }
    d.wire.push_back(b);
    core::DenseStepInput in;
    in.gradient = RowMajor(g, s.rows, s.cols);
    in.params = RowMajor(p, s.rows, s.cols);
    d.core.push_back(std::move(in));
  }
  return d;
}

void RunAgainstCore(natgrad::v1::DType dtype) {
  const bool f32 = dtype == natgrad::v1::FLOAT32;
  const core::Precision prec = f32 ? core::Precision::kFloat32 : core::Precision::kFloat64;
  auto server = StartServer();
  client::Client client(ClientFor(*server));
  auto session = client.CreateSession(Config(dtype));
  ASSERT_TRUE(session.ok()) << session.status();
  auto stream = client.OpenStream(session->name());
  ASSERT_TRUE(stream.ok());

  engine::EngineOptions eo;
  eo.backend = "cpu";
  auto engine = engine::CreateInversionEngine(eo);
  ASSERT_TRUE(engine.ok());
  std::vector<std::unique_ptr<core::ParameterBlock>> ref;
  for (const Spec& s : Specs()) {
    if (s.adam) {
      core::AdamOptions ao;
      ao.learning_rate = core::ConstantSchedule(0.01);
      ref.push_back(*core::NewAdamBlock(s.name, {s.rows, s.cols}, ao, prec));
    } else {
      core::ShampooOptions o = ShampooCore();
      if (s.name == "small") o.grafting = core::ShampooGrafting::kSgd;
      o.view_rows = s.view_rows;
      ref.push_back(*core::NewShampooBlock(s.name, {s.rows, s.cols}, o, prec));
    }
  }
  for (int t = 1; t <= 9; ++t) {
    StepData d = Inputs(t, f32);
    auto r = (*stream)->Step(d.wire);
    ASSERT_TRUE(r.ok()) << r.status();
    core::StepContext ctx;
    ctx.step = t;
    ctx.engine = engine->engine.get();
    for (size_t i = 0; i < ref.size(); ++i) {
      auto p = ref[i]->Propose(d.core[i], ctx);
      ASSERT_TRUE(p.ok()) << p.status();
      const Eigen::MatrixXd want = (*p)->Commit(1.0).delta;
      // Bit for bit: the same arithmetic, only the transport differs (a
      // float32 reply carries the float32 delta exactly).
      ASSERT_EQ(client::TensorValues(r->updates(i).delta()), Flatten(want))
          << "step " << t << " block " << Specs()[i].name;
    }
  }
}

TEST(ShampooService, MixedSessionEqualsCoreInProcessFloat64) {
  RunAgainstCore(natgrad::v1::FLOAT64);
}

TEST(ShampooService, MixedSessionEqualsCoreInProcessFloat32) {
  RunAgainstCore(natgrad::v1::FLOAT32);
}

TEST(ShampooService, SnapshotRestoreContinuesExactly) {
  auto a = StartServer();
  auto b = StartServer();
  client::Client ca(ClientFor(*a)), cb(ClientFor(*b));
  auto reference = ca.CreateSession(Config(natgrad::v1::FLOAT32));
  auto moving = ca.CreateSession(Config(natgrad::v1::FLOAT32));
  ASSERT_TRUE(reference.ok() && moving.ok());
  auto ref_stream = *ca.OpenStream(reference->name());
  auto mov_stream = *ca.OpenStream(moving->name());
  // Step 5 refreshes; steps 6 and 7 use its roots, 8 refreshes again.
  for (int t = 1; t <= 5; ++t) {
    ASSERT_TRUE(ref_stream->Step(Inputs(t, true).wire).ok());
    ASSERT_TRUE(mov_stream->Step(Inputs(t, true).wire).ok());
  }
  mov_stream->Close().IgnoreError();
  auto snapshot = ca.ExportSession(moving->name());
  ASSERT_TRUE(snapshot.ok()) << snapshot.status();
  bool saw_tile = false;
  for (const auto& blk : snapshot->blocks()) {
    if (blk.name() == "big") saw_tile = blk.tensors().count("right_root.5") > 0;
  }
  EXPECT_TRUE(saw_tile) << "the 20 x 12 block should export six tiles";
  auto imported = cb.ImportSession(*snapshot);
  ASSERT_TRUE(imported.ok()) << imported.status();
  auto moved = *cb.OpenStream(moving->name());
  for (int t = 6; t <= 10; ++t) {
    auto want = ref_stream->Step(Inputs(t, true).wire);
    auto got = moved->Step(Inputs(t, true).wire);
    ASSERT_TRUE(want.ok() && got.ok()) << got.status();
    for (int i = 0; i < got->updates_size(); ++i) {
      EXPECT_EQ(got->updates(i).delta().data(), want->updates(i).delta().data())
          << "step " << t << " block " << i;
    }
  }
}

TEST(ShampooService, BadConfigAndStepNameBlockAndFieldAndChangeNothing) {
  auto server = StartServer();
  client::Client c(ClientFor(*server));
  auto bad = Config(natgrad::v1::FLOAT32);
  bad.mutable_blocks(0)->mutable_shampoo()->set_max_preconditioner_dim(-3);
  auto r = c.CreateSession(bad);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(r.status().message(), HasSubstr("config.blocks[0]"));
  EXPECT_THAT(r.status().message(), HasSubstr("block \"big\""));
  EXPECT_THAT(r.status().message(), HasSubstr("max_preconditioner_dim"));

  auto s = c.CreateSession(Config(natgrad::v1::FLOAT32));
  ASSERT_TRUE(s.ok());
  auto stream = *c.OpenStream(s->name());
  ASSERT_TRUE(stream->Step(Inputs(1, true).wire).ok());
  auto before = c.ExportSession(s->name());
  auto step = Inputs(2, true).wire;
  step[0].clear_params();  // weight decay needs them
  auto refused = stream->Step(step);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(refused.status().message(), HasSubstr("block \"big\": params"));
  auto after = c.ExportSession(s->name());
  EXPECT_TRUE(google::protobuf::util::MessageDifferencer::Equals(*before, *after));
}

}  // namespace
}  // namespace natgrad::testing
