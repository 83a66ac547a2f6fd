// The soap kind through the service: a session mixing soap blocks (a square
// one refreshing by power iteration + QR, one by eigh, a tall one whose long
// side stays the identity, a 1-D one that is plain Adam, a rank-3 one seen
// through shampoo's merged view) with adam and sgd blocks gives the updates
// of the core blocks called in-process on an engine of our own, bit for bit;
// a snapshot restored into another server continues exactly; bad configs and
// steps name block and field and change nothing.
#include "gmock/gmock.h"
#include "google/protobuf/util/message_differencer.h"
#include "server/blocks/adam/math/adam_block.h"
#include "server/blocks/sgd/math/sgd_block.h"
#include "server/blocks/soap/math/soap_block.h"
#include "tests/service/server_fixture.h"

namespace natgrad::testing {
namespace {

using ::testing::HasSubstr;

enum class Kind { kSoap, kSoapEigh, kAdam, kSgd };

struct Spec {
  std::string name;
  int64_t rows, cols;
  bool rank1;
  Kind kind;
  int64_t max_precond_dim = 0;  // 0: the default
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
  static const std::vector<Spec> specs = {
      {"square", 8, 8, false, Kind::kSoap},
      {"eigh", 6, 5, false, Kind::kSoapEigh},
      {"tall", 12, 5, false, Kind::kSoap, 6},  // left side: identity
      {"bias", 7, 1, true, Kind::kSoap},
      {"head", 3, 4, false, Kind::kAdam},
      {"emb", 4, 2, false, Kind::kSgd},
      // [3, 2, 4] merges to a 6 x 4 view (max 6).
      {"conv", 3, 8, false, Kind::kSoap, 6, {3, 2, 4}, 6}};
  return specs;
}

void SetSoap(const Spec& s, natgrad::v1::SoapConfig* c) {
  *c->mutable_learning_rate() = Constant(0.02);
  *c->mutable_weight_decay() = Constant(0.05);
  c->set_beta1(0.9);
  // The eigh block leaves shampoo_beta unset: it must follow beta2.
  if (s.kind == Kind::kSoapEigh) {
    c->set_beta2(0.9);
  } else {
    c->set_shampoo_beta(0.8);
  }
  c->set_precondition_frequency(3);
  if (s.max_precond_dim) c->set_max_precond_dim(s.max_precond_dim);
  if (s.kind == Kind::kSoapEigh) c->set_refresh(natgrad::v1::SOAP_REFRESH_EIGH);
}

core::SoapOptions SoapCore(const Spec& s) {
  core::SoapOptions o;
  o.learning_rate = core::ConstantSchedule(0.02);
  o.weight_decay = core::ConstantSchedule(0.05);
  o.beta1 = 0.9;
  o.shampoo_beta = 0.8;
  if (s.kind == Kind::kSoapEigh) o.beta2 = o.shampoo_beta = 0.9;
  o.precondition_frequency = 3;
  if (s.max_precond_dim) o.max_precond_dim = s.max_precond_dim;
  if (s.kind == Kind::kSoapEigh) o.refresh = core::SoapRefresh::kEigh;
  o.vector = s.rank1;
  o.view_rows = s.view_rows;
  return o;
}

natgrad::v1::SessionConfig Config(natgrad::v1::DType dtype) {
  natgrad::v1::SessionConfig c;
  c.set_state_dtype(dtype);
  for (const Spec& s : Specs()) {
    auto* b = c.add_blocks();
    b->set_name(s.name);
    for (int64_t d : WireShape(s)) b->add_shape(d);
    switch (s.kind) {
      case Kind::kAdam:
        *b->mutable_adam()->mutable_learning_rate() = Constant(0.01);
        break;
      case Kind::kSgd:
        *b->mutable_sgd()->mutable_learning_rate() = Constant(0.1);
        break;
      default:
        SetSoap(s, b->mutable_soap());
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
  return DenseStepInputs(2000 + t, Shapes(), float32);
}

void RunAgainstCore(natgrad::v1::DType dtype) {
  const bool f32 = dtype == natgrad::v1::FLOAT32;
  const core::Precision prec = f32 ? core::Precision::kFloat32 : core::Precision::kFloat64;
  std::vector<std::unique_ptr<core::ParameterBlock>> ref;
  for (const Spec& s : Specs()) {
    switch (s.kind) {
      case Kind::kAdam: {
        core::AdamOptions ao;
        ao.learning_rate = core::ConstantSchedule(0.01);
        ref.push_back(*core::NewAdamBlock(s.name, {s.rows, s.cols}, ao, prec));
        break;
      }
      case Kind::kSgd: {
        core::SgdOptions so;
        so.learning_rate = core::ConstantSchedule(0.1);
        ref.push_back(*core::NewSgdBlock(s.name, {s.rows, s.cols}, so, prec));
        break;
      }
      default:
        ref.push_back(*core::NewSoapBlock(s.name, {s.rows, s.cols}, SoapCore(s), prec));
    }
  }
  // 11 steps: refreshes at steps 4, 7, 10.
  ExpectSessionEqualsCoreInProcess(
      Config(dtype), std::move(ref), 11, [&](int t) { return Inputs(t, f32); },
      [](int t, size_t i, const Eigen::MatrixXd& want) {
        if (t == 1 && Specs()[i].kind != Kind::kAdam && Specs()[i].kind != Kind::kSgd) {
          EXPECT_TRUE(want.isZero(0)) << "soap's first step only builds its bases";
        }
      });
}

TEST(SoapService, MixedSessionEqualsCoreInProcessFloat64) { RunAgainstCore(natgrad::v1::FLOAT64); }

TEST(SoapService, MixedSessionEqualsCoreInProcessFloat32) { RunAgainstCore(natgrad::v1::FLOAT32); }

TEST(SoapService, SnapshotRestoreContinuesExactly) {
  // Step 4 refreshed; 5 and 6 use its bases, 7 refreshes again.
  ExpectSnapshotRestoreContinuesExactly(
      Config(natgrad::v1::FLOAT32), [](int t) { return Inputs(t, true).wire; }, 5, 11,
      [](const natgrad::v1::SessionSnapshot& snapshot) {
        for (const auto& blk : snapshot.blocks()) {
          if (blk.name() == "tall") {
            EXPECT_EQ(blk.tensors().count("left_basis"), 0) << "12 > max_precond_dim 6";
            EXPECT_EQ(blk.tensors().count("right_basis"), 1);
          }
          if (blk.name() == "bias") EXPECT_EQ(blk.tensors().count("right_factor"), 0);
        }
      });
}

TEST(SoapService, BadConfigAndStepNameBlockAndFieldAndChangeNothing) {
  auto server = StartServer();
  client::Client c(ClientFor(*server));
  {
    auto bad = Config(natgrad::v1::FLOAT32);
    bad.mutable_blocks(1)->mutable_soap()->set_max_precond_dim(-3);
    auto r = c.CreateSession(bad);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(r.status().message(), HasSubstr("config.blocks[1]"));
    EXPECT_THAT(r.status().message(), HasSubstr("block \"eigh\""));
    EXPECT_THAT(r.status().message(), HasSubstr("max_precond_dim"));
  }
  {
    auto bad = Config(natgrad::v1::FLOAT32);
    bad.mutable_blocks(0)->mutable_soap()->set_beta2(1.0);
    auto r = c.CreateSession(bad);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(r.status().message(), HasSubstr("block \"square\": soap.beta2"));
  }
  {
    auto bad = Config(natgrad::v1::FLOAT32);
    bad.mutable_blocks(0)->mutable_soap()->set_refresh(static_cast<natgrad::v1::SoapRefresh>(7));
    auto r = c.CreateSession(bad);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(r.status().message(), HasSubstr("config.blocks[0].soap.refresh"));
  }

  auto s = c.CreateSession(Config(natgrad::v1::FLOAT32));
  ASSERT_TRUE(s.ok());
  auto stream = *c.OpenStream(s->name());
  ASSERT_TRUE(stream->Step(Inputs(1, true).wire).ok());
  ASSERT_TRUE(stream->Step(Inputs(2, true).wire).ok());
  auto before = c.ExportSession(s->name());
  {
    auto step = Inputs(3, true).wire;
    step[0].clear_params();  // weight decay needs them
    auto refused = stream->Step(step);
    EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(refused.status().message(), HasSubstr("block \"square\": params"));
  }
  {
    auto step = Inputs(3, true).wire;
    *step[2].mutable_gradient() =
        client::MakeTensor(std::vector<float>(60, 1.0f), std::vector<int64_t>{5, 12});
    auto refused = stream->Step(step);
    EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(refused.status().message(), HasSubstr("block \"tall\""));
  }
  auto after = c.ExportSession(s->name());
  EXPECT_TRUE(google::protobuf::util::MessageDifferencer::Equals(*before, *after));
}

}  // namespace
}  // namespace natgrad::testing
