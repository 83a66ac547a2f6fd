// The ekfac kind through the service: a session mixing EKFAC blocks (a dense
// layer with bias, an unfolded convolution whose T changes between steps)
// with adam and sgd blocks gives the updates of the core blocks called
// in-process on an engine of our own, bit for bit, with KL clipping (and
// Levenberg-Marquardt damping) applied the same way; a snapshot restored
// into another server continues exactly; reduced statistics, bad shapes and
// non-finite values are refused naming block and field, changing nothing.
#include <functional>

#include "gmock/gmock.h"
#include "google/protobuf/util/message_differencer.h"
#include "server/blocks/adam/math/adam_block.h"
#include "server/blocks/ekfac/math/ekfac_block.h"
#include "server/blocks/sgd/math/sgd_block.h"
#include "server/core/curvature/kl_clipping.h"
#include "server/core/curvature/levenberg_marquardt_damping.h"
#include "server/engine/engine_factory.h"
#include "tests/service/row_major.h"
#include "tests/service/server_fixture.h"

namespace natgrad::testing {
namespace {

using ::testing::HasSubstr;
using google::protobuf::util::MessageDifferencer;

// fc: dense 5 -> 4 with bias; conv: 6 (C_in kh kw) -> 3 channels, T = 3
// (every third step sends T = 2).
struct Layer {
  std::string name;
  int64_t d_in, d_out;
  bool bias;
  int64_t locations;
};
const std::vector<Layer>& Layers() {
  static const std::vector<Layer> l = {{"fc", 5, 4, true, 1}, {"conv", 6, 3, false, 3}};
  return l;
}
constexpr int64_t kBatch = 8;
constexpr int64_t kAdamSize = 7, kSgdSize = 4;

natgrad::v1::SessionConfig Config(natgrad::v1::DType dtype, bool adaptive) {
  natgrad::v1::SessionConfig c;
  c.set_state_dtype(dtype);
  c.mutable_kl_clip()->set_enabled(true);
  c.mutable_kl_clip()->set_kappa(1e-2);
  if (adaptive) {
    c.mutable_adaptive_damping()->set_enabled(true);
    c.mutable_adaptive_damping()->set_interval(2);
  }
  for (const Layer& l : Layers()) {
    auto* b = c.add_blocks();
    b->set_name(l.name);
    auto* k = b->mutable_ekfac();
    k->set_d_in(l.d_in);
    k->set_d_out(l.d_out);
    k->set_has_bias(l.bias);
    *k->mutable_learning_rate() = Constant(0.5);
    *k->mutable_damping() = Constant(1e-2);
    *k->mutable_momentum() = Constant(0.9);
    *k->mutable_weight_decay() = Constant(1e-3);
    k->set_ema_decay(0.9);
    k->set_inverse_period(3);
    k->set_locations(l.locations);
  }
  auto* a = c.add_blocks();
  a->set_name("norm");
  a->add_shape(kAdamSize);
  *a->mutable_adam()->mutable_learning_rate() = Constant(0.01);
  auto* s = c.add_blocks();
  s->set_name("head");
  s->add_shape(kSgdSize);
  *s->mutable_sgd()->mutable_learning_rate() = Constant(0.1);
  return c;
}

std::vector<std::unique_ptr<core::ParameterBlock>> CoreBlocks(core::Precision prec) {
  std::vector<std::unique_ptr<core::ParameterBlock>> ref;
  for (const Layer& l : Layers()) {
    core::EkfacOptions o;
    o.d_in = l.d_in;
    o.d_out = l.d_out;
    o.has_bias = l.bias;
    o.learning_rate = core::ConstantSchedule(0.5);
    o.damping = core::ConstantSchedule(1e-2);
    o.momentum = core::ConstantSchedule(0.9);
    o.weight_decay = core::ConstantSchedule(1e-3);
    o.ema_decay = 0.9;
    o.inverse_period = 3;
    o.locations = l.locations;
    ref.push_back(*core::NewEkfacBlock(l.name, o, prec));
  }
  core::AdamOptions ao;
  ao.learning_rate = core::ConstantSchedule(0.01);
  ref.push_back(*core::NewAdamBlock("norm", {kAdamSize, 1}, ao, prec));
  core::SgdOptions so;
  so.learning_rate = core::ConstantSchedule(0.1);
  ref.push_back(*core::NewSgdBlock("head", {kSgdSize, 1}, so, prec));
  return ref;
}

natgrad::v1::Tensor Wire(const std::vector<double>& v, std::vector<int64_t> shape, bool f32) {
  if (f32) return client::MakeTensor(std::vector<float>(v.begin(), v.end()), std::move(shape));
  return client::MakeTensor(v, std::move(shape));
}

struct StepData {
  std::vector<natgrad::v1::BlockStep> wire;
  std::vector<core::BlockStepInput> core;
};

StepData Inputs(int t, bool f32) {
  std::mt19937 rng(500 + t);
  auto rand = [&](size_t n, double scale = 1.0) {
    auto v = RandomVector(rng, n, scale);
    if (f32)
      for (double& x : v) x = static_cast<float>(x);
    return v;
  };
  StepData d;
  for (const Layer& l : Layers()) {
    const int64_t da = l.d_in + (l.bias ? 1 : 0);
    // The convolution's spatial size changes every third step.
    const int64_t T = l.locations == 1 ? 1 : (t % 3 == 0 ? 2 : l.locations);
    const int64_t rows = kBatch * T;
    auto g = rand(l.d_out * da, 0.1), p = rand(l.d_out * da);
    auto a = rand(rows * l.d_in), og = rand(rows * l.d_out);
    natgrad::v1::BlockStep s;
    s.set_name(l.name);
    *s.mutable_gradient() = Wire(g, {l.d_out, da}, f32);
    *s.mutable_params() = Wire(p, {l.d_out, da}, f32);
    auto* raw = s.mutable_kfac()->mutable_raw();
    *raw->mutable_activations() = Wire(a, {rows, l.d_in}, f32);
    *raw->mutable_output_gradients() = Wire(og, {rows, l.d_out}, f32);
    if (T != l.locations) raw->set_locations(T);
    d.wire.push_back(s);
    core::KfacStepInput in;
    in.gradient = RowMajorMatrix(g, l.d_out, da);
    in.params = RowMajorMatrix(p, l.d_out, da);
    core::KfacStatisticsInput k;
    k.activations = RowMajorMatrix(a, rows, l.d_in);
    k.output_gradients = RowMajorMatrix(og, rows, l.d_out);
    k.num_examples = rows;
    k.locations = T != l.locations ? T : 0;
    in.kfac = k;
    d.core.push_back(std::move(in));
  }
  for (auto [name, size] : {std::pair{"norm", kAdamSize}, std::pair{"head", kSgdSize}}) {
    auto g = rand(size);
    natgrad::v1::BlockStep s;
    s.set_name(name);
    *s.mutable_gradient() = Wire(g, {size}, f32);
    d.wire.push_back(s);
    core::DenseStepInput in;
    in.gradient = RowMajorMatrix(g, size, 1);
    d.core.push_back(std::move(in));
  }
  return d;
}

void RunAgainstCore(natgrad::v1::DType dtype, bool adaptive) {
  const bool f32 = dtype == natgrad::v1::FLOAT32;
  auto server = StartServer();
  client::Client client(ClientFor(*server));
  auto session = client.CreateSession(Config(dtype, adaptive));
  ASSERT_TRUE(session.ok()) << session.status();
  auto stream = client.OpenStream(session->name());
  ASSERT_TRUE(stream.ok());

  engine::EngineOptions eo;
  eo.backend = "cpu";
  auto engine = engine::CreateInversionEngine(eo);
  ASSERT_TRUE(engine.ok());
  auto ref = CoreBlocks(f32 ? core::Precision::kFloat32 : core::Precision::kFloat64);
  core::LevenbergMarquardtOptions lo;
  lo.initial_damping = 1e-2;
  lo.interval = 2;
  auto lm = *core::LevenbergMarquardtDamping::Create(lo);
  double loss = 2.0;
  for (int t = 1; t <= 10; ++t) {
    StepData d = Inputs(t, f32);
    loss *= (t % 4 == 0) ? 1.05 : 0.9;
    auto r = (*stream)->Step(d.wire, adaptive ? std::optional<double>(loss) : std::nullopt);
    ASSERT_TRUE(r.ok()) << r.status();
    core::StepContext ctx;
    ctx.step = t;
    ctx.engine = engine->engine.get();
    if (adaptive) {
      ctx.loss = loss;
      ctx.damping_override = lm.BeginStep(t, loss);
    }
    std::vector<std::unique_ptr<core::PendingBlockUpdate>> pending;
    for (size_t i = 0; i < ref.size(); ++i) {
      auto p = ref[i]->Propose(d.core[i], ctx);
      ASSERT_TRUE(p.ok()) << p.status();
      pending.push_back(*std::move(p));
    }
    const double nu = core::KlClipScale(core::KlClipSum(pending), 1e-2);
    EXPECT_EQ(r->kl_clip_scale(), nu) << "step " << t;
    if (adaptive) {
      double predicted = 0;
      for (auto& p : pending)
        if (p->curvature()) predicted += p->curvature()->PredictedReduction(nu);
      lm.EndStep(t, predicted);
      EXPECT_EQ(r->damping(), *ctx.damping_override) << "step " << t;
    }
    ASSERT_EQ(r->updates_size(), static_cast<int>(ref.size()));
    for (size_t i = 0; i < ref.size(); ++i) {
      const Eigen::MatrixXd want = pending[i]->Commit(i < Layers().size() ? nu : 1.0).delta.ToMatrix<double>();
      // Bit for bit: the same arithmetic, only the transport differs.
      ASSERT_EQ(client::TensorValues(r->updates(i).delta()), RowMajorValues(want))
          << "step " << t << " block " << r->updates(i).name();
    }
  }
  if (adaptive) {
    EXPECT_NE(client.GetSession(session->name())->damping(), 1e-2);
    EXPECT_EQ(client.GetSession(session->name())->damping(), lm.damping());
  }
}

TEST(EkfacService, MixedSessionEqualsCoreInProcessFloat64) {
  RunAgainstCore(natgrad::v1::FLOAT64, false);
}

TEST(EkfacService, MixedSessionEqualsCoreInProcessFloat32) {
  RunAgainstCore(natgrad::v1::FLOAT32, false);
}

TEST(EkfacService, AdaptiveDampingEqualsCoreInProcess) {
  RunAgainstCore(natgrad::v1::FLOAT64, true);
}

TEST(EkfacService, SnapshotRestoreContinuesExactly) {
  auto a = StartServer();
  auto b = StartServer();
  client::Client ca(ClientFor(*a)), cb(ClientFor(*b));
  auto reference = ca.CreateSession(Config(natgrad::v1::FLOAT32, false));
  auto moving = ca.CreateSession(Config(natgrad::v1::FLOAT32, false));
  ASSERT_TRUE(reference.ok() && moving.ok());
  auto ref_stream = *ca.OpenStream(reference->name());
  auto mov_stream = *ca.OpenStream(moving->name());
  // Step 4 refreshes the basis; 5 and 6 fold the scaling in it, 7 refreshes.
  for (int t = 1; t <= 5; ++t) {
    ASSERT_TRUE(ref_stream->Step(Inputs(t, true).wire).ok());
    ASSERT_TRUE(mov_stream->Step(Inputs(t, true).wire).ok());
  }
  mov_stream->Close().IgnoreError();
  auto snapshot = ca.ExportSession(moving->name());
  ASSERT_TRUE(snapshot.ok()) << snapshot.status();
  bool saw = false;
  for (const auto& blk : snapshot->blocks()) {
    if (blk.name() == "conv") {
      saw = blk.tensors().count("scaling_ema") > 0 && blk.tensors().count("g_eigenvectors") > 0;
    }
  }
  EXPECT_TRUE(saw) << "the conv block should export its scaling and eigenvectors";
  auto imported = cb.ImportSession(*snapshot);
  ASSERT_TRUE(imported.ok()) << imported.status();
  auto moved = *cb.OpenStream(moving->name());
  for (int t = 6; t <= 10; ++t) {
    auto want = ref_stream->Step(Inputs(t, true).wire);
    auto got = moved->Step(Inputs(t, true).wire);
    ASSERT_TRUE(want.ok() && got.ok()) << got.status();
    ASSERT_EQ(got->updates_size(), want->updates_size());
    for (int i = 0; i < got->updates_size(); ++i) {
      EXPECT_EQ(got->updates(i).delta().data(), want->updates(i).delta().data())
          << "step " << t << " block " << i;
    }
  }
}

class EkfacRefusal : public ::testing::Test {
 protected:
  void SetUp() override {
    server_ = StartServer();
    client_ = std::make_unique<client::Client>(ClientFor(*server_));
    auto s = client_->CreateSession(Config(natgrad::v1::FLOAT64, false));
    ASSERT_TRUE(s.ok()) << s.status();
    name_ = s->name();
    auto st = client_->OpenStream(name_);
    ASSERT_TRUE(st.ok());
    stream_ = *std::move(st);
    ASSERT_TRUE(stream_->Step(Inputs(1, false).wire).ok());
  }

  // Sends the next step changed by `edit`; expects INVALID_ARGUMENT naming
  // all of `want` and the session exactly as before; then the unchanged step
  // goes through under the same number.
  void ExpectRefused(const std::function<void(std::vector<natgrad::v1::BlockStep>&)>& edit,
                     const std::vector<std::string>& want) {
    auto before = client_->ExportSession(name_);
    ASSERT_TRUE(before.ok());
    const int t = static_cast<int>(stream_->next_step());
    auto steps = Inputs(t, false).wire;
    edit(steps);
    auto r = stream_->Step(steps);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
    for (const std::string& w : want) EXPECT_THAT(r.status().message(), HasSubstr(w));
    auto after = client_->ExportSession(name_);
    ASSERT_TRUE(after.ok());
    EXPECT_TRUE(MessageDifferencer::Equals(*before, *after));
    EXPECT_EQ(client_->GetSession(name_)->last_step(), t - 1);
    auto good = stream_->Step(Inputs(t, false).wire);
    EXPECT_TRUE(good.ok()) << good.status();
  }

  std::unique_ptr<service::NatgradServer> server_;
  std::unique_ptr<client::Client> client_;
  std::string name_;
  std::unique_ptr<client::SessionStream> stream_;
};

TEST_F(EkfacRefusal, ReducedStatisticsAreRefused) {
  ExpectRefused(
      [](auto& steps) {
        natgrad::v1::BlockStep& s = steps[1];  // conv
        s.mutable_kfac()->Clear();
        auto* red = s.mutable_kfac()->mutable_reduced();
        std::vector<double> eye6(36, 0.0), eye3(9, 0.0);
        for (int i = 0; i < 6; ++i) eye6[i * 7] = 1;
        for (int i = 0; i < 3; ++i) eye3[i * 4] = 1;
        *red->mutable_a_factor() = client::MakeTensor(eye6, {6, 6});
        *red->mutable_g_factor() = client::MakeTensor(eye3, {3, 3});
        red->set_num_examples(kBatch);
      },
      {"block \"conv\"", "kfac.reduced", "ekfac needs raw statistics"});
}

TEST_F(EkfacRefusal, MissingStatisticsAreRefused) {
  ExpectRefused([](auto& steps) { steps[0].clear_kfac(); },
                {"block \"fc\"", "kfac statistics are missing", "raw statistics"});
}

TEST_F(EkfacRefusal, BadShapesAreRefused) {
  ExpectRefused(
      [](auto& steps) {
        auto* raw = steps[0].mutable_kfac()->mutable_raw();
        *raw->mutable_activations() =
            client::MakeTensor(std::vector<double>(kBatch * 6, 0.5), {kBatch, 6});
      },
      {"block \"fc\"", "kfac.raw.activations has 6 columns, want 5"});
  ExpectRefused(
      [](auto& steps) {
        // 8 examples * 3 locations = 24 rows; 23 is not a multiple of T.
        auto* raw = steps[1].mutable_kfac()->mutable_raw();
        *raw->mutable_activations() =
            client::MakeTensor(std::vector<double>(23 * 6, 0.5), {23, 6});
        *raw->mutable_output_gradients() =
            client::MakeTensor(std::vector<double>(23 * 3, 0.5), {23, 3});
        raw->clear_locations();
      },
      {"block \"conv\"", "kfac.raw.activations has 23 rows, want a multiple of locations (3)"});
}

TEST_F(EkfacRefusal, NonFiniteValuesAreRefused) {
  ExpectRefused(
      [](auto& steps) {
        auto* raw = steps[1].mutable_kfac()->mutable_raw();
        std::vector<double> v = client::TensorValues(raw->output_gradients());
        v[5] = std::nan("");
        const int64_t rows = raw->output_gradients().shape(0);
        *raw->mutable_output_gradients() = client::MakeTensor(v, {rows, 3});
      },
      {"block \"conv\"", "kfac.raw.output_gradients has a non-finite value (nan) at [1, 2]"});
}

TEST(EkfacService, BadConfigNamesBlockAndField) {
  auto server = StartServer();
  client::Client c(ClientFor(*server));
  auto bad = Config(natgrad::v1::FLOAT32, false);
  bad.mutable_blocks(1)->mutable_ekfac()->set_ema_decay(1.5);
  auto r = c.CreateSession(bad);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(r.status().message(), HasSubstr("config.blocks[1]"));
  EXPECT_THAT(r.status().message(), HasSubstr("block \"conv\""));
  EXPECT_THAT(r.status().message(), HasSubstr("ekfac.ema_decay"));
  bad = Config(natgrad::v1::FLOAT32, false);
  bad.mutable_blocks(0)->add_shape(4);
  bad.mutable_blocks(0)->add_shape(5);  // want [4, 6] with the bias
  EXPECT_THAT(c.CreateSession(bad).status().message(),
              HasSubstr("config.blocks[0].shape: block \"fc\": an ekfac block's shape"));
}

}  // namespace
}  // namespace natgrad::testing
