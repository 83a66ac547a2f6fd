// The per-step parts of the contract a real training job leans on: a block
// left out of a step keeps its state, a client-side learning rate replaces
// the schedule for one step, and a convolution's location count may change
// from step to step. Each is checked against the core blocks in-process.
#include "gmock/gmock.h"
#include "server/blocks/adam/math/adam_block.h"
#include "server/blocks/kfac_dense/math/kfac_dense_block.h"
#include "server/engine/testing/eigen_inversion_engine.h"
#include "server/core/schedule.h"
#include "tests/service/row_major.h"
#include "tests/service/server_fixture.h"

namespace natgrad::testing {
namespace {

using ::testing::HasSubstr;

natgrad::v1::SessionConfig TwoAdamBlocks() {
  natgrad::v1::SessionConfig c;
  c.set_state_dtype(natgrad::v1::FLOAT64);
  for (const char* name : {"a", "b"}) {
    auto* b = c.add_blocks();
    b->set_name(name);
    b->add_shape(2);
    b->add_shape(3);
    *b->mutable_adam()->mutable_learning_rate() = Constant(0.01);
  }
  return c;
}

natgrad::v1::BlockStep GradientStep(const std::string& name, const std::vector<double>& g) {
  natgrad::v1::BlockStep b;
  b.set_name(name);
  *b.mutable_gradient() = client::MakeTensor(g, {2, 3});
  return b;
}

// Block "b" runs only on odd steps. Its Adam state (bias-correction count
// included) must equal a block that saw only those steps.
TEST(StepContract, OmittedBlockKeepsItsStateAndCounters) {
  auto server = StartServer();
  client::Client client(ClientFor(*server));
  auto session = client.CreateSession(TwoAdamBlocks());
  ASSERT_TRUE(session.ok()) << session.status();
  auto stream = client.OpenStream(session->name());
  ASSERT_TRUE(stream.ok());

  core::AdamOptions o;
  o.learning_rate = core::ConstantSchedule(0.01);
  auto ref_a = *core::NewAdamBlock("a", {2, 3}, o, core::Precision::kFloat64);
  auto ref_b = *core::NewAdamBlock("b", {2, 3}, o, core::Precision::kFloat64);
  std::mt19937 rng(7);
  for (int t = 1; t <= 9; ++t) {
    const bool with_b = t % 2 == 1;
    const std::vector<double> ga = RandomVector(rng, 6), gb = RandomVector(rng, 6);
    std::vector<natgrad::v1::BlockStep> blocks = {GradientStep("a", ga)};
    if (with_b) blocks.push_back(GradientStep("b", gb));
    auto response = (*stream)->Step(blocks);
    ASSERT_TRUE(response.ok()) << response.status();
    ASSERT_EQ(response->updates_size(), with_b ? 2 : 1);

    core::StepContext ctx;
    ctx.step = t;
    core::DenseStepInput in;
    in.gradient = RowMajorMatrix(ga, 2, 3);
    EXPECT_EQ(client::TensorValues(response->updates(0).delta()),
              RowMajorValues((*ref_a->Propose(in, ctx))->Commit(1.0).delta.ToMatrix<double>()));
    if (with_b) {
      in.gradient = RowMajorMatrix(gb, 2, 3);
      EXPECT_EQ(response->updates(1).name(), "b");
      EXPECT_EQ(client::TensorValues(response->updates(1).delta()),
                RowMajorValues((*ref_b->Propose(in, ctx))->Commit(1.0).delta.ToMatrix<double>()));
    }
  }
  // Adam's own step counts: 9 for "a", 5 for "b".
  auto exported = client.ExportSession(session->name());
  ASSERT_TRUE(exported.ok()) << exported.status();
  ASSERT_EQ(exported->blocks_size(), 2);
  EXPECT_EQ(exported->blocks(0).scalars().at("step"), 9);
  EXPECT_EQ(exported->blocks(1).scalars().at("step"), 5);
}

TEST(StepContract, LearningRateOverrideReplacesTheScheduleForOneStep) {
  auto server = StartServer();
  client::Client client(ClientFor(*server));
  auto session = client.CreateSession(TwoAdamBlocks());
  ASSERT_TRUE(session.ok()) << session.status();
  auto stream = client.OpenStream(session->name());
  ASSERT_TRUE(stream.ok());

  core::AdamOptions o;
  o.learning_rate = core::ConstantSchedule(0.01);
  auto ref = *core::NewAdamBlock("a", {2, 3}, o, core::Precision::kFloat64);
  std::mt19937 rng(3);
  const double lrs[] = {0.5, 0.25, 0.125};
  for (int t = 1; t <= 3; ++t) {
    const std::vector<double> g = RandomVector(rng, 6);
    natgrad::v1::BlockStep a = GradientStep("a", g);
    a.set_learning_rate(lrs[t - 1]);
    auto response = (*stream)->Step({a});
    ASSERT_TRUE(response.ok()) << response.status();
    EXPECT_EQ(response->updates(0).hyperparameters().at("learning_rate"), lrs[t - 1]);
    core::StepContext ctx;
    ctx.step = t;
    core::DenseStepInput in;
    in.gradient = RowMajorMatrix(g, 2, 3);
    in.learning_rate = lrs[t - 1];
    EXPECT_EQ(client::TensorValues(response->updates(0).delta()),
              RowMajorValues((*ref->Propose(in, ctx))->Commit(1.0).delta.ToMatrix<double>()));
  }
}

natgrad::v1::SessionConfig ConvConfig() {
  natgrad::v1::SessionConfig c;
  c.set_state_dtype(natgrad::v1::FLOAT64);
  auto* b = c.add_blocks();
  b->set_name("conv");
  auto* k = b->mutable_kfac_dense();
  k->set_d_in(4);
  k->set_d_out(3);
  k->set_has_bias(true);
  k->set_locations(4);
  *k->mutable_learning_rate() = Constant(0.1);
  *k->mutable_damping() = Constant(1e-2);
  return c;
}

// Spatial size 2x2 then 3x3 then 1x1 locations per example (n = 2).
TEST(StepContract, ConvolutionLocationsMayChangeBetweenSteps) {
  auto server = StartServer();
  client::Client client(ClientFor(*server));
  auto session = client.CreateSession(ConvConfig());
  ASSERT_TRUE(session.ok()) << session.status();
  auto stream = client.OpenStream(session->name());
  ASSERT_TRUE(stream.ok());

  core::KfacDenseOptions o;
  o.d_in = 4;
  o.d_out = 3;
  o.has_bias = true;
  o.locations = 4;
  o.learning_rate = core::ConstantSchedule(0.1);
  o.damping = core::ConstantSchedule(1e-2);
  auto ref = *core::NewKfacDenseBlock("conv", o, core::Precision::kFloat64);
  core::testing::EigenInversionEngine engine;
  std::mt19937 rng(11);
  const int64_t n = 2;
  for (int t = 1; t <= 3; ++t) {
    const int64_t locations = t == 1 ? 4 : (t == 2 ? 9 : 1);
    const int64_t rows = n * locations;
    const auto a = RandomVector(rng, rows * 4), g = RandomVector(rng, rows * 3);
    const auto grad = RandomVector(rng, 3 * 5);
    natgrad::v1::BlockStep b;
    b.set_name("conv");
    *b.mutable_gradient() = client::MakeTensor(grad, {3, 5});
    auto* raw = b.mutable_kfac()->mutable_raw();
    *raw->mutable_activations() = client::MakeTensor(a, {rows, 4});
    *raw->mutable_output_gradients() = client::MakeTensor(g, {rows, 3});
    if (t > 1) raw->set_locations(locations);  // step 1 uses the configured 4
    auto response = (*stream)->Step({b});
    ASSERT_TRUE(response.ok()) << "step " << t << ": " << response.status();

    core::StepContext ctx;
    ctx.step = t;
    ctx.engine = &engine;
    core::KfacStepInput in;
    in.gradient = RowMajorMatrix(grad, 3, 5);
    core::KfacStatisticsInput k;
    k.activations = RowMajorMatrix(a, rows, 4);
    k.output_gradients = RowMajorMatrix(g, rows, 3);
    k.num_examples = rows;
    k.locations = locations;
    in.kfac = std::move(k);
    const auto want = RowMajorValues((*ref->Propose(in, ctx))->Commit(1.0).delta.ToMatrix<double>());
    const auto got = client::TensorValues(response->updates(0).delta());
    ASSERT_EQ(got.size(), want.size());
    for (size_t i = 0; i < got.size(); ++i) EXPECT_NEAR(got[i], want[i], 1e-12) << "step " << t;
  }
  // 7 rows are not a multiple of the configured 4 locations.
  natgrad::v1::BlockStep b;
  b.set_name("conv");
  *b.mutable_gradient() = client::MakeTensor(RandomVector(rng, 15), {3, 5});
  auto* raw = b.mutable_kfac()->mutable_raw();
  *raw->mutable_activations() = client::MakeTensor(RandomVector(rng, 28), {7, 4});
  *raw->mutable_output_gradients() = client::MakeTensor(RandomVector(rng, 21), {7, 3});
  auto response = (*stream)->Step({b});
  ASSERT_FALSE(response.ok());
  EXPECT_EQ(response.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(response.status().message(), HasSubstr("multiple of locations (4)"));
}

}  // namespace
}  // namespace natgrad::testing

namespace natgrad::testing {
namespace {

// StepTiming's parts are disjoint intervals inside server_micros, which runs
// from the read of the step's first message to its encoded response: decode
// (from each message's read), queue (waiting for a worker), compute, encode.
void ExpectConsistentTiming(const natgrad::v1::StepTiming& t) {
  EXPECT_GT(t.compute_micros(), 0);
  EXPECT_GE(t.decode_micros(), 0);
  EXPECT_GE(t.encode_micros(), 0);
  EXPECT_GE(t.inversion_micros(), 0);
  ASSERT_TRUE(t.has_queue_micros());
  EXPECT_GE(t.queue_micros(), 0);
  EXPECT_LE(t.inversion_micros(), t.compute_micros());
  EXPECT_GE(t.server_micros(), t.decode_micros() + t.queue_micros() + t.encode_micros());
  // 1 ms of slack only for the compute term: it is timed on the steady clock
  // (in the session), the rest on absl::Now.
  EXPECT_GE(t.server_micros() + 1000,
            t.decode_micros() + t.queue_micros() + t.compute_micros() + t.encode_micros());
}

natgrad::v1::BlockStep ConvStep(std::mt19937& rng) {
  natgrad::v1::BlockStep b;
  b.set_name("conv");
  *b.mutable_gradient() = client::MakeTensor(RandomVector(rng, 15), {3, 5});
  auto* raw = b.mutable_kfac()->mutable_raw();
  *raw->mutable_activations() = client::MakeTensor(RandomVector(rng, 64 * 4), {64, 4});
  *raw->mutable_output_gradients() = client::MakeTensor(RandomVector(rng, 64 * 3), {64, 3});
  return b;
}

TEST(StepContract, TimingCoversDecodeQueueComputeAndEncode) {
  auto server = StartServer();
  client::Client client(ClientFor(*server));
  auto session = client.CreateSession(ConvConfig());
  ASSERT_TRUE(session.ok()) << session.status();
  auto stream = client.OpenStream(session->name());
  std::mt19937 rng(5);
  for (int t = 1; t <= 3; ++t) {
    auto r = (*stream)->Step({ConvStep(rng)});
    ASSERT_TRUE(r.ok()) << r.status();
    SCOPED_TRACE(t);
    ExpectConsistentTiming(r->timing());
  }
}

// A step over several messages: server_micros runs from the first one's
// read, and decode sums every message's.
TEST(StepContract, TimingOfAStepOverSeveralMessages) {
  auto server = StartServer();
  client::ClientOptions o = ClientFor(*server);
  o.max_blocks_per_message = 1;  // every block its own message
  client::Client client(o);
  natgrad::v1::SessionConfig config = ConvConfig();
  *config.add_blocks() = config.blocks(0);
  config.mutable_blocks(1)->set_name("conv2");
  auto session = client.CreateSession(config);
  ASSERT_TRUE(session.ok()) << session.status();
  auto stream = client.OpenStream(session->name());
  std::mt19937 rng(6);
  natgrad::v1::BlockStep second = ConvStep(rng);
  second.set_name("conv2");
  auto r = (*stream)->Step({ConvStep(rng), second});
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->updates_size(), 2);
  ExpectConsistentTiming(r->timing());
}

}  // namespace
}  // namespace natgrad::testing
