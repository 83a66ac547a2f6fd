// The shampoo kind through the service: a session mixing blocked shampoo
// blocks (a 20 x 12 parameter with max_preconditioner_dim 8: six tiles), a
// diagonal (1-D) shampoo block and an adam block gives the updates of the
// core blocks called in-process on an engine of our own, bit for bit; a
// snapshot restored into another server continues exactly.
#include "gmock/gmock.h"
#include "google/protobuf/util/message_differencer.h"
#include "server/blocks/adam/math/adam_block.h"
#include "server/blocks/shampoo/math/shampoo_block.h"
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

std::vector<DenseBlockShape> Shapes() {
  std::vector<DenseBlockShape> out;
  for (const Spec& s : Specs()) out.push_back({s.name, s.rows, s.cols, WireShape(s)});
  return out;
}

DenseStepData Inputs(int t, bool float32) {
  return DenseStepInputs(1000 + t, Shapes(), float32);
}

void RunAgainstCore(natgrad::v1::DType dtype) {
  const bool f32 = dtype == natgrad::v1::FLOAT32;
  const core::Precision prec = f32 ? core::Precision::kFloat32 : core::Precision::kFloat64;
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
  ExpectSessionEqualsCoreInProcess(Config(dtype), std::move(ref), 9,
                                   [&](int t) { return Inputs(t, f32); });
}

TEST(ShampooService, MixedSessionEqualsCoreInProcessFloat64) {
  RunAgainstCore(natgrad::v1::FLOAT64);
}

TEST(ShampooService, MixedSessionEqualsCoreInProcessFloat32) {
  RunAgainstCore(natgrad::v1::FLOAT32);
}

TEST(ShampooService, SnapshotRestoreContinuesExactly) {
  // Step 5 refreshes; steps 6 and 7 use its roots, 8 refreshes again.
  ExpectSnapshotRestoreContinuesExactly(
      Config(natgrad::v1::FLOAT32), [](int t) { return Inputs(t, true).wire; }, 5, 10,
      [](const natgrad::v1::SessionSnapshot& snapshot) {
        bool saw_tile = false;
        for (const auto& blk : snapshot.blocks()) {
          if (blk.name() == "big") saw_tile = blk.tensors().count("right_root.5") > 0;
        }
        EXPECT_TRUE(saw_tile) << "the 20 x 12 block should export six tiles";
      });
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
