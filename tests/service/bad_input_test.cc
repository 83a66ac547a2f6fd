// Every field a client can send, wrong: the gRPC code of docs/architecture.md, a
// message naming the field, and the session exactly as it was.
#include <functional>
#include <limits>

#include "gmock/gmock.h"
#include "google/protobuf/util/message_differencer.h"
#include "tests/service/server_fixture.h"

namespace natgrad::testing {
namespace {

using ::testing::HasSubstr;

natgrad::v1::SessionConfig Config() {
  natgrad::v1::SessionConfig c;
  c.set_state_dtype(natgrad::v1::FLOAT64);
  auto* w = c.add_blocks();
  w->set_name("w");
  w->add_shape(2);
  w->add_shape(3);
  *w->mutable_sgd()->mutable_learning_rate() = Constant(0.1);
  *w->mutable_sgd()->mutable_momentum() = Constant(0.5);
  *w->mutable_sgd()->mutable_weight_decay() = Constant(0.01);
  auto* b = c.add_blocks();
  b->set_name("b");
  b->add_shape(2);
  b->mutable_adam();
  return c;
}

natgrad::v1::StepRequest ValidStep(const std::string& session, int64_t step) {
  natgrad::v1::StepRequest r;
  r.set_session(session);
  r.set_step(step);
  r.set_last(true);
  auto* w = r.add_blocks();
  w->set_name("w");
  std::vector<double> g = {1, 2, 3, 4, 5, 6}, p = {0.1, 0.2, 0.3, 0.4, 0.5, 0.6};
  *w->mutable_gradient() = client::MakeTensor(g, {2, 3});
  *w->mutable_params() = client::MakeTensor(p, {2, 3});
  auto* b = r.add_blocks();
  b->set_name("b");
  std::vector<float> bg = {0.5f, -0.5f};
  *b->mutable_gradient() = client::MakeTensor(bg, {2});
  return r;
}

struct BadCase {
  std::string what;
  std::function<void(natgrad::v1::StepRequest&)> mutate;
  grpc::StatusCode code;
  std::string message;
};

std::vector<BadCase> Cases() {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();
  using R = natgrad::v1::StepRequest;
  return {
      {"unknown block", [](R& r) { r.mutable_blocks(0)->set_name("nope"); },
       grpc::StatusCode::INVALID_ARGUMENT, "block \"nope\": unknown block"},
      {"block sent twice", [](R& r) { *r.add_blocks() = r.blocks(0); },
       grpc::StatusCode::INVALID_ARGUMENT, "sent twice"},
      {"no blocks at all", [](R& r) { r.clear_blocks(); },
       grpc::StatusCode::INVALID_ARGUMENT, "step 2 has no blocks"},
      {"negative learning rate", [](R& r) { r.mutable_blocks(0)->set_learning_rate(-1); },
       grpc::StatusCode::INVALID_ARGUMENT, "block \"w\": learning_rate must be finite"},
      {"NaN learning rate", [nan](R& r) { r.mutable_blocks(0)->set_learning_rate(nan); },
       grpc::StatusCode::INVALID_ARGUMENT, "block \"w\": learning_rate must be finite"},
      {"missing gradient", [](R& r) { r.mutable_blocks(1)->clear_gradient(); },
       grpc::StatusCode::INVALID_ARGUMENT, "block \"b\": gradient is required"},
      {"wrong shape", [](R& r) {
         std::vector<double> g(6, 1.0);
         *r.mutable_blocks(0)->mutable_gradient() = client::MakeTensor(g, {3, 2});
         *r.mutable_blocks(0)->mutable_params() = client::MakeTensor(g, {3, 2});
       }, grpc::StatusCode::INVALID_ARGUMENT, "shape"},
      {"unknown dtype", [](R& r) {
         r.mutable_blocks(0)->mutable_gradient()->set_dtype(natgrad::v1::DTYPE_UNSPECIFIED);
       }, grpc::StatusCode::INVALID_ARGUMENT, "block \"w\": gradient has dtype"},
      {"bytes do not match shape", [](R& r) {
         r.mutable_blocks(0)->mutable_gradient()->mutable_data()->pop_back();
       }, grpc::StatusCode::INVALID_ARGUMENT, "block \"w\": gradient has 47 bytes of data"},
      {"negative dimension", [](R& r) {
         r.mutable_blocks(0)->mutable_gradient()->set_shape(0, -2);
       }, grpc::StatusCode::INVALID_ARGUMENT, "negative dimension"},
      {"NaN gradient", [nan](R& r) {
         std::vector<double> g = {1, nan, 3, 4, 5, 6};
         *r.mutable_blocks(0)->mutable_gradient() = client::MakeTensor(g, {2, 3});
       }, grpc::StatusCode::INVALID_ARGUMENT, "block \"w\": gradient contains NaN or Inf"},
      {"Inf params", [inf](R& r) {
         std::vector<double> p = {1, 2, inf, 4, 5, 6};
         *r.mutable_blocks(0)->mutable_params() = client::MakeTensor(p, {2, 3});
       }, grpc::StatusCode::INVALID_ARGUMENT, "block \"w\": params contains NaN or Inf"},
      {"params shape differs", [](R& r) {
         std::vector<double> p(6, 0.0);
         *r.mutable_blocks(0)->mutable_params() = client::MakeTensor(p, {6});
       }, grpc::StatusCode::INVALID_ARGUMENT, "block \"w\": params has shape"},
      {"weight decay without params", [](R& r) { r.mutable_blocks(0)->clear_params(); },
       grpc::StatusCode::INVALID_ARGUMENT, "params"},
      {"curvature statistics for an sgd block", [](R& r) {
         r.mutable_blocks(0)->mutable_kfac()->mutable_raw();
       }, grpc::StatusCode::INVALID_ARGUMENT, "is only for kfac_dense blocks"},
      {"gaussian input for an sgd block", [](R& r) {
         r.mutable_blocks(0)->mutable_gaussian();
       }, grpc::StatusCode::INVALID_ARGUMENT, "is only for gaussian blocks"},
      {"NaN loss", [nan](R& r) { r.set_loss(nan); },
       grpc::StatusCode::INVALID_ARGUMENT, "loss: must be finite"},
      {"step zero", [](R& r) { r.set_step(0); },
       grpc::StatusCode::INVALID_ARGUMENT, "step: must be >= 1"},
      {"step out of order", [](R& r) { r.set_step(5); },
       grpc::StatusCode::FAILED_PRECONDITION, "out of order"},
      {"no session name", [](R& r) { r.clear_session(); },
       grpc::StatusCode::INVALID_ARGUMENT, "session: required"},
      {"unknown session", [](R& r) { r.set_session("sessions/does-not-exist"); },
       grpc::StatusCode::NOT_FOUND, "not found"},
  };
}

class BadStepInput : public ::testing::TestWithParam<size_t> {};

TEST_P(BadStepInput, IsRejectedAndChangesNothing) {
  const BadCase bad = Cases()[GetParam()];
  auto server = StartServer();
  client::Client client(ClientFor(*server));
  auto session = client.CreateSession(Config());
  ASSERT_TRUE(session.ok());
  // One good step first so there is state to protect.
  {
    auto stream = client.OpenStream(session->name());
    natgrad::v1::StepRequest good = ValidStep(session->name(), 1);
    std::vector<natgrad::v1::BlockStep> blocks(good.blocks().begin(), good.blocks().end());
    ASSERT_TRUE((*stream)->Step(blocks).ok());
    ASSERT_TRUE((*stream)->Close().ok());
  }
  const natgrad::v1::SessionSnapshot before = *client.ExportSession(session->name());

  natgrad::v1::StepRequest req = ValidStep(session->name(), 2);
  bad.mutate(req);
  grpc::ClientContext ctx;
  auto stream = client.stub().Step(&ctx);
  stream->Write(req);
  stream->WritesDone();
  natgrad::v1::StepResponse resp;
  EXPECT_FALSE(stream->Read(&resp)) << bad.what;
  grpc::Status status = stream->Finish();
  EXPECT_EQ(status.error_code(), bad.code) << bad.what << ": " << status.error_message();
  EXPECT_THAT(status.error_message(), HasSubstr(bad.message)) << bad.what;

  EXPECT_TRUE(google::protobuf::util::MessageDifferencer::Equals(
      *client.ExportSession(session->name()), before))
      << bad.what;
  // And the session still takes the valid step 2.
  auto again = client.OpenStream(session->name());
  natgrad::v1::StepRequest good = ValidStep(session->name(), 2);
  std::vector<natgrad::v1::BlockStep> blocks(good.blocks().begin(), good.blocks().end());
  auto r = (*again)->Step(blocks);
  EXPECT_TRUE(r.ok()) << bad.what << ": " << r.status();
}

INSTANTIATE_TEST_SUITE_P(AllFields, BadStepInput, ::testing::Range<size_t>(0, Cases().size()),
                         [](const auto& info) {
                           std::string n = Cases()[info.param].what;
                           for (char& c : n) if (!isalnum(c)) c = '_';
                           return n;
                         });

TEST(BadStepInput, StepSplitOverMessagesWithChangingNumberIsRejected) {
  auto server = StartServer();
  client::Client client(ClientFor(*server));
  auto session = client.CreateSession(Config());
  natgrad::v1::StepRequest a = ValidStep(session->name(), 1);
  a.set_last(false);
  a.mutable_blocks()->RemoveLast();
  natgrad::v1::StepRequest b = ValidStep(session->name(), 2);
  b.mutable_blocks()->DeleteSubrange(0, 1);
  grpc::ClientContext ctx;
  auto stream = client.stub().Step(&ctx);
  stream->Write(a);
  stream->Write(b);
  stream->WritesDone();
  natgrad::v1::StepResponse resp;
  EXPECT_FALSE(stream->Read(&resp));
  grpc::Status s = stream->Finish();
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("arrived before step 1 was marked last"));
  EXPECT_EQ(client.GetSession(session->name())->last_step(), 0);
}

TEST(BadStepInput, StepSplitOverMessagesIsApplied) {
  auto server = StartServer();
  client::ClientOptions o = ClientFor(*server);
  o.max_blocks_per_message = 1;  // every block its own message
  client::Client client(o);
  auto session = client.CreateSession(Config());
  auto stream = client.OpenStream(session->name());
  natgrad::v1::StepRequest good = ValidStep(session->name(), 1);
  auto r = (*stream)->Step({good.blocks().begin(), good.blocks().end()});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->updates_size(), 2);
}

TEST(BadStepInput, OversizedMessageIsResourceExhausted) {
  service::ServerOptions o;
  o.max_message_bytes = 64 * 1024;
  auto server = StartServer(o);
  client::Client client(ClientFor(*server));
  natgrad::v1::SessionConfig c;
  auto* b = c.add_blocks();
  b->set_name("w");
  b->add_shape(100);
  b->add_shape(100);
  b->mutable_sgd();
  auto session = client.CreateSession(c);
  ASSERT_TRUE(session.ok());
  auto stream = client.OpenStream(session->name());
  natgrad::v1::BlockStep step;
  step.set_name("w");
  std::vector<double> g(100 * 100, 1.0);  // 80 kB > 64 KiB
  *step.mutable_gradient() = client::MakeTensor(g, {100, 100});
  auto r = (*stream)->Step({step});
  EXPECT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted) << r.status();
  EXPECT_EQ(client.GetSession(session->name())->last_step(), 0);
}

TEST(BadStepInput, StepLargerThanTheSessionBoundIsResourceExhausted) {
  service::ServerOptions o;
  o.limits.max_session_bytes = 50 * 1024;
  auto server = StartServer(o);
  client::Client client(ClientFor(*server));
  natgrad::v1::SessionConfig c;
  for (int i = 0; i < 8; ++i) {
    auto* b = c.add_blocks();
    b->set_name("w" + std::to_string(i));
    b->add_shape(10);
    b->mutable_sgd();
  }
  auto session = client.CreateSession(c);
  ASSERT_TRUE(session.ok()) << session.status();
  // Many messages of one step, never marked last: bounded server memory.
  // (Each names another block: a block sent twice is refused on its own.)
  grpc::ClientContext ctx;
  auto stream = client.stub().Step(&ctx);
  std::vector<double> g(1000, 1.0);  // 8 kB a message
  for (int i = 0; i < 8; ++i) {
    natgrad::v1::StepRequest r;
    r.set_session(session->name());
    r.set_step(1);
    auto* blk = r.add_blocks();
    blk->set_name("w" + std::to_string(i));
    *blk->mutable_gradient() = client::MakeTensor(g, {1000});
    if (!stream->Write(r)) break;
  }
  stream->WritesDone();
  natgrad::v1::StepResponse resp;
  EXPECT_FALSE(stream->Read(&resp));
  EXPECT_EQ(stream->Finish().error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
}

struct BadConfig {
  std::string what;
  std::function<void(natgrad::v1::SessionConfig&)> mutate;
  std::string message;
};

TEST(BadSessionConfig, EveryFieldIsValidated) {
  auto server = StartServer();
  client::Client client(ClientFor(*server));
  using C = natgrad::v1::SessionConfig;
  std::vector<BadConfig> cases = {
      {"no blocks", [](C& c) { c.clear_blocks(); }, "at least one block"},
      {"empty name", [](C& c) { c.mutable_blocks(0)->set_name(""); }, "config.blocks[0].name"},
      {"duplicate name", [](C& c) { c.mutable_blocks(1)->set_name("w"); }, "duplicate"},
      {"no kind", [](C& c) { c.mutable_blocks(0)->clear_sgd(); }, "kind is required"},
      {"no shape", [](C& c) { c.mutable_blocks(0)->clear_shape(); }, "config.blocks[0].shape"},
      {"zero dimension", [](C& c) { c.mutable_blocks(0)->set_shape(0, 0); }, "positive"},
      {"bad dtype", [](C& c) { c.set_state_dtype(static_cast<natgrad::v1::DType>(9)); },
       "state_dtype"},
      {"bad schedule", [](C& c) {
         c.mutable_blocks(0)->mutable_sgd()->mutable_learning_rate()
             ->mutable_log_linear_warmup()->set_steps(0);
       }, "config.blocks[0].sgd.learning_rate"},
      {"negative kl kappa", [](C& c) { c.mutable_kl_clip()->set_kappa(-1); }, "kl_clip"},
      {"adam beta out of range", [](C& c) { c.mutable_blocks(1)->mutable_adam()->set_beta1(1.5); },
       "beta1"},
  };
  for (const auto& bad : cases) {
    C c = Config();
    bad.mutate(c);
    auto s = client.CreateSession(c);
    EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument) << bad.what << s.status();
    EXPECT_THAT(s.status().message(), HasSubstr(bad.message)) << bad.what;
  }
  EXPECT_EQ(client.ListSessions()->size(), 0u);
  auto id = client.CreateSession(Config(), "UPPER case");
  EXPECT_EQ(id.status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace natgrad::testing
