// Hostile inputs (issue 11): steps whose update or new state would not be
// finite, configs that cannot work, streams that stop inside a step, budgets
// and oversized client strings. Each gets its canonical code and a message,
// the session stays exactly as it was, and its export still imports.
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "google/protobuf/util/message_differencer.h"
#include "grpcpp/generic/generic_stub.h"
#include "tests/service/server_fixture.h"

namespace natgrad::testing {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

// sgd "w" (float64 state, momentum 0.5), adam "b" (float32 gradients).
natgrad::v1::SessionConfig Config() {
  natgrad::v1::SessionConfig c;
  c.set_state_dtype(natgrad::v1::FLOAT64);
  auto* w = c.add_blocks();
  w->set_name("w");
  w->add_shape(2);
  w->add_shape(3);
  *w->mutable_sgd()->mutable_learning_rate() = Constant(0.1);
  *w->mutable_sgd()->mutable_momentum() = Constant(0.5);
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
  std::vector<double> g = {1, 2, 3, 4, 5, 6};
  *w->mutable_gradient() = client::MakeTensor(g, {2, 3});
  auto* b = r.add_blocks();
  b->set_name("b");
  std::vector<float> bg = {0.5f, -0.5f};
  *b->mutable_gradient() = client::MakeTensor(bg, {2});
  return r;
}

bool Same(const natgrad::v1::SessionSnapshot& a, const natgrad::v1::SessionSnapshot& b) {
  return google::protobuf::util::MessageDifferencer::Equals(a, b);
}

// A session with one good step, so there is state to protect.
std::string SessionWithOneStep(client::Client& client,
                               const natgrad::v1::SessionConfig& config = Config()) {
  auto session = client.CreateSession(config);
  EXPECT_TRUE(session.ok()) << session.status();
  if (!session.ok()) return "";
  auto stream = client.OpenStream(session->name());
  natgrad::v1::StepRequest good = ValidStep(session->name(), 1);
  auto r = (*stream)->Step({good.blocks().begin(), good.blocks().end()});
  EXPECT_TRUE(r.ok()) << r.status();
  EXPECT_TRUE((*stream)->Close().ok());
  return session->name();
}

// The session's own export imports (under another id) and equals it.
void ExpectExportImports(client::Client& client, const std::string& name) {
  auto snap = client.ExportSession(name);
  ASSERT_TRUE(snap.ok()) << snap.status();
  natgrad::v1::ImportSessionRequest req;
  *req.mutable_snapshot() = *snap;
  req.set_session_id("reimported");
  grpc::ClientContext ctx;
  natgrad::v1::Session out;
  grpc::Status s = client.stub().ImportSession(&ctx, req, &out);
  ASSERT_TRUE(s.ok()) << s.error_message();
  auto again = client.ExportSession(out.name());
  ASSERT_TRUE(again.ok());
  natgrad::v1::SessionSnapshot a = *snap, b = *again;
  a.clear_name();
  b.clear_name();
  EXPECT_TRUE(Same(a, b));
}

struct HostileStep {
  std::string what;
  std::function<void(natgrad::v1::StepRequest&)> mutate;
  grpc::StatusCode code;
  std::string message;
};

std::vector<HostileStep> StepCases() {
  using R = natgrad::v1::StepRequest;
  return {
      {"sgd delta overflows double",
       [](R& r) { r.mutable_blocks(0)->set_learning_rate(1e308); },
       grpc::StatusCode::INVALID_ARGUMENT, "block \"w\": delta would be non-finite"},
      {"adam delta overflows the float32 the client holds",
       [](R& r) { r.mutable_blocks(1)->set_learning_rate(1e39); },
       grpc::StatusCode::INVALID_ARGUMENT, "block \"b\": delta would overflow float32"},
      {"session name of a megabyte",
       [](R& r) { r.set_session("sessions/" + std::string(1 << 20, 'x')); },
       grpc::StatusCode::INVALID_ARGUMENT, "is not a session name"},
  };
}

class HostileStepInput : public ::testing::TestWithParam<size_t> {};

TEST_P(HostileStepInput, IsRejectedAndChangesNothing) {
  const HostileStep bad = StepCases()[GetParam()];
  auto server = StartServer();
  client::Client client(ClientFor(*server));
  const std::string name = SessionWithOneStep(client);
  const natgrad::v1::SessionSnapshot before = *client.ExportSession(name);

  natgrad::v1::StepRequest req = ValidStep(name, 2);
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
  // Client strings are cut in messages.
  EXPECT_LT(status.error_message().size(), 400u) << bad.what;

  EXPECT_TRUE(Same(*client.ExportSession(name), before)) << bad.what;
  ExpectExportImports(client, name);
  // And the session still takes the valid step 2.
  auto again = client.OpenStream(name);
  natgrad::v1::StepRequest good = ValidStep(name, 2);
  auto r = (*again)->Step({good.blocks().begin(), good.blocks().end()});
  EXPECT_TRUE(r.ok()) << bad.what << ": " << r.status();
}

INSTANTIATE_TEST_SUITE_P(Table, HostileStepInput,
                         ::testing::Range<size_t>(0, StepCases().size()),
                         [](const auto& info) {
                           std::string n = StepCases()[info.param].what;
                           for (char& c : n) if (!isalnum(c)) c = '_';
                           return n;
                         });

// Momentum from a schedule that reaches 1 only later: refused at that step,
// the committed state before it intact and exportable.
TEST(HostileStepInput, MomentumScheduleReachingOneIsRefusedAtThatStep) {
  auto server = StartServer();
  client::Client client(ClientFor(*server));
  natgrad::v1::SessionConfig c = Config();
  auto* warm = c.mutable_blocks(0)->mutable_sgd()->mutable_momentum()->mutable_linear_warmup();
  warm->set_start(0.0);
  warm->set_end(1.5);
  warm->set_steps(2);  // 0.75 at step 1, 1.5 from step 2 on
  const std::string name = SessionWithOneStep(client, c);
  const natgrad::v1::SessionSnapshot before = *client.ExportSession(name);
  auto stream = client.OpenStream(name);
  natgrad::v1::StepRequest req = ValidStep(name, 2);
  auto r = (*stream)->Step({req.blocks().begin(), req.blocks().end()});
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
  EXPECT_THAT(r.status().message(), HasSubstr("block \"w\": momentum at step 2 must be < 1"));
  EXPECT_TRUE(Same(*client.ExportSession(name), before));
  ExpectExportImports(client, name);
}

// Sends `messages` on a raw stream, half-closes, and returns the status.
grpc::Status SendAndClose(client::Client& client, const std::vector<natgrad::v1::StepRequest>& messages,
                          bool half_close = true) {
  grpc::ClientContext ctx;
  auto stream = client.stub().Step(&ctx);
  for (const auto& m : messages) stream->Write(m);
  if (half_close) stream->WritesDone();
  natgrad::v1::StepResponse resp;
  while (stream->Read(&resp)) {
  }
  return stream->Finish();
}

TEST(HostileStream, HalfCloseInsideAStepIsAnErrorNotOk) {
  auto server = StartServer();
  client::Client client(ClientFor(*server));
  const std::string name = SessionWithOneStep(client);
  const natgrad::v1::SessionSnapshot before = *client.ExportSession(name);
  natgrad::v1::StepRequest part = ValidStep(name, 2);
  part.set_last(false);
  part.mutable_blocks()->RemoveLast();
  grpc::Status s = SendAndClose(client, {part});
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s.error_message();
  EXPECT_THAT(s.error_message(), HasSubstr("step 2: the stream ended"));
  EXPECT_TRUE(Same(*client.ExportSession(name), before));
}

TEST(HostileStream, PartialStepIdleBeyondTheTimeoutEndsTheStream) {
  service::ServerOptions o;
  o.partial_step_timeout = absl::Milliseconds(200);
  auto server = StartServer(o);
  client::Client client(ClientFor(*server));
  const std::string name = SessionWithOneStep(client);
  const natgrad::v1::SessionSnapshot before = *client.ExportSession(name);
  natgrad::v1::StepRequest part = ValidStep(name, 2);
  part.set_last(false);
  part.mutable_blocks()->RemoveLast();
  // Never half-closed: the server's timer is what ends the stream (Read
  // blocks until it does).
  grpc::Status s = SendAndClose(client, {part}, /*half_close=*/false);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << s.error_message();
  EXPECT_THAT(s.error_message(), HasSubstr("--partial_step_timeout"));
  EXPECT_TRUE(Same(*client.ExportSession(name), before));
  // The session is free for a new stream, which takes step 2.
  auto again = client.OpenStream(name);
  natgrad::v1::StepRequest good = ValidStep(name, 2);
  auto r = (*again)->Step({good.blocks().begin(), good.blocks().end()});
  EXPECT_TRUE(r.ok()) << r.status();
}

TEST(HostileStream, AStepStreamThatKeepsSendingIsNotTimedOut) {
  // Complete steps only: the idle timer never ends a well-behaved stream.
  service::ServerOptions o;
  o.partial_step_timeout = absl::Milliseconds(1);
  auto server = StartServer(o);
  client::ClientOptions co = ClientFor(*server);
  client::Client client(co);
  const std::string name = SessionWithOneStep(client);
  auto stream = client.OpenStream(name);
  for (int step = 2; step <= 20; ++step) {
    natgrad::v1::StepRequest good = ValidStep(name, step);
    auto r = (*stream)->Step({good.blocks().begin(), good.blocks().end()});
    ASSERT_TRUE(r.ok()) << step << ": " << r.status();
  }
  EXPECT_TRUE((*stream)->Close().ok());
}

TEST(HostileBudget, HugeAdamBlockIsResourceExhaustedAtCreate) {
  service::ServerOptions o;
  o.limits.max_session_bytes = int64_t{1} << 50;  // only the budget stands
  o.limits.memory_budget_bytes = int64_t{1} << 30;
  auto server = StartServer(o);
  client::Client client(ClientFor(*server));
  natgrad::v1::SessionConfig c;
  auto* b = c.add_blocks();
  b->set_name("huge");
  b->add_shape(int64_t{1} << 16);
  b->add_shape(int64_t{1} << 16);  // 2^32 float32 elements, two moments: 32 GiB
  b->mutable_adam();
  auto s = client.CreateSession(c);
  EXPECT_EQ(s.status().code(), absl::StatusCode::kResourceExhausted) << s.status();
  EXPECT_THAT(s.status().message(), HasSubstr("memory budget"));
  EXPECT_EQ(server->registry().ChargedBytes(), 0);
}

TEST(HostileBudget, StepDataBeyondTheBudgetIsResourceExhaustedAndReleased) {
  service::ServerOptions o;
  // Room for the session (40 kB state + 80 kB cached reply + 68 KiB
  // bookkeeping) and 55 kB more.
  o.limits.memory_budget_bytes = 240 << 10;
  auto server = StartServer(o);
  client::Client client(ClientFor(*server));
  natgrad::v1::SessionConfig c;
  auto* w = c.add_blocks();
  w->set_name("w");
  w->add_shape(10000);
  w->mutable_sgd();
  auto session = client.CreateSession(c);
  ASSERT_TRUE(session.ok()) << session.status();
  const int64_t held = server->registry().ChargedBytes();
  natgrad::v1::StepRequest r;
  r.set_session(session->name());
  r.set_step(1);
  r.set_last(true);
  auto* blk = r.add_blocks();
  blk->set_name("w");
  std::vector<double> g(10000, 1.0);  // 80 kB: over what the budget has left
  *blk->mutable_gradient() = client::MakeTensor(g, {10000});
  grpc::Status s = SendAndClose(client, {r});
  EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << s.error_message();
  EXPECT_THAT(s.error_message(), HasSubstr("memory budget"));
  EXPECT_EQ(client.GetSession(session->name())->last_step(), 0);
  // Nothing stays reserved once the stream is gone; a step that fits runs.
  EXPECT_EQ(server->registry().ChargedBytes(), held);
  std::vector<float> small(10000, 1.0f);  // 40 kB fits
  *blk->mutable_gradient() = client::MakeTensor(small, {10000});
  auto stream = client.OpenStream(session->name());
  auto ok = (*stream)->Step({r.blocks().begin(), r.blocks().end()});
  EXPECT_TRUE(ok.ok()) << ok.status();
}

// Raw bytes on the wire, past the typed stubs: the generic stub.
grpc::ByteBuffer BytesOf(const std::string& s) {
  grpc::Slice slice(s);
  return grpc::ByteBuffer(&slice, 1);
}

grpc::ByteBuffer BytesOf(const google::protobuf::Message& m) { return BytesOf(m.SerializeAsString()); }

// A field 0 with wire type 7: no protobuf parser accepts it.
const std::string kGarbage("\x07\x07\x07\x07", 4);

void Await(grpc::CompletionQueue& cq, intptr_t want) {
  void* tag = nullptr;
  bool ok = false;
  ASSERT_TRUE(cq.Next(&tag, &ok));
  EXPECT_EQ(reinterpret_cast<intptr_t>(tag), want);
}

void Drain(grpc::CompletionQueue& cq) {
  cq.Shutdown();
  void* tag;
  bool ok;
  while (cq.Next(&tag, &ok)) {
  }
}

TEST(HostileStream, UndecodableMessageMidStepIsInvalidArgumentNotOk) {
  auto server = StartServer();
  client::Client client(ClientFor(*server));
  const std::string name = SessionWithOneStep(client);
  const natgrad::v1::SessionSnapshot before = *client.ExportSession(name);
  natgrad::v1::StepRequest part = ValidStep(name, 2);
  part.set_last(false);
  part.mutable_blocks()->RemoveLast();

  auto channel = grpc::CreateChannel("127.0.0.1:" + std::to_string(server->port()),
                                     grpc::InsecureChannelCredentials());
  grpc::GenericStub stub(channel);
  grpc::CompletionQueue cq;
  grpc::ClientContext ctx;
  auto call = stub.PrepareCall(&ctx, "/natgrad.v1.OptimizerService/Step", &cq);
  call->StartCall(reinterpret_cast<void*>(1));
  Await(cq, 1);
  call->Write(BytesOf(part), reinterpret_cast<void*>(2));
  Await(cq, 2);
  call->Write(BytesOf(kGarbage), reinterpret_cast<void*>(3));
  Await(cq, 3);
  grpc::Status status;
  call->Finish(&status, reinterpret_cast<void*>(4));
  Await(cq, 4);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << status.error_message();
  EXPECT_THAT(status.error_message(),
              HasSubstr("message 2 of the stream (4 bytes) is not a decodable "
                        "natgrad.v1.StepRequest; step 2 was dropped"));
  Drain(cq);
  EXPECT_TRUE(Same(*client.ExportSession(name), before));
  ExpectExportImports(client, name);
}

TEST(HostileUnary, UndecodableRequestIsInvalidArgumentWithAMessage) {
  auto server = StartServer();
  client::Client client(ClientFor(*server));
  const std::string name = SessionWithOneStep(client);
  const natgrad::v1::SessionSnapshot before = *client.ExportSession(name);
  auto channel = grpc::CreateChannel("127.0.0.1:" + std::to_string(server->port()),
                                     grpc::InsecureChannelCredentials());
  grpc::GenericStub stub(channel);
  for (const std::string method :
       {"CreateSession", "GetSession", "ListSessions", "DeleteSession", "ExportSession",
        "ImportSession"}) {
    grpc::CompletionQueue cq;
    grpc::ClientContext ctx;
    auto call = stub.PrepareUnaryCall(&ctx, "/natgrad.v1.OptimizerService/" + method,
                                      BytesOf(kGarbage), &cq);
    call->StartCall();
    grpc::ByteBuffer response;
    grpc::Status status;
    call->Finish(&response, &status, reinterpret_cast<void*>(1));
    Await(cq, 1);
    Drain(cq);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT)
        << method << ": " << status.error_message();
    EXPECT_THAT(status.error_message(), HasSubstr("not a decodable natgrad.v1.")) << method;
    EXPECT_THAT(status.error_message(), HasSubstr("Request")) << method;
  }
  EXPECT_TRUE(Same(*client.ExportSession(name), before));
  EXPECT_EQ(client.ListSessions()->size(), 1u);
}

struct HostileConfig {
  std::string what;
  std::function<void(natgrad::v1::SessionConfig&)> mutate;
  std::string message;
};

natgrad::v1::SessionConfig KfacConfig() {
  natgrad::v1::SessionConfig c;
  auto* k = c.add_blocks();
  k->set_name("k");
  k->add_shape(3);
  k->add_shape(4);
  k->mutable_kfac_dense()->set_d_in(4);
  k->mutable_kfac_dense()->set_d_out(3);
  return c;
}

TEST(HostileConfig, WhatCannotWorkIsRefusedAtCreate) {
  auto server = StartServer();
  client::Client client(ClientFor(*server));
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();
  using C = natgrad::v1::SessionConfig;
  auto sgd = [](C& c) { return c.mutable_blocks(0)->mutable_sgd(); };
  std::vector<HostileConfig> cases = {
      {"sgd momentum 10", [&](C& c) { *sgd(c)->mutable_momentum() = Constant(10); },
       "config.blocks[0].sgd.momentum.constant.value: is 10, want >= 0 and < 1"},
      {"sgd momentum exactly 1", [&](C& c) { *sgd(c)->mutable_momentum() = Constant(1); },
       "sgd.momentum"},
      {"sgd momentum 1 in a piecewise schedule", [&](C& c) {
         auto* p = sgd(c)->mutable_momentum()->mutable_piecewise_constant();
         p->add_boundaries(10);
         p->add_values(0.9);
         p->add_values(1.0);
       }, "sgd.momentum.piecewise_constant.values: is 1"},
      {"negative sgd learning rate",
       [&](C& c) { *sgd(c)->mutable_learning_rate() = Constant(-0.1); },
       "sgd.learning_rate.constant.value: is -0.1"},
      {"NaN warmup start", [&](C& c) {
         auto* w = sgd(c)->mutable_learning_rate()->mutable_linear_warmup();
         w->set_start(nan);
         w->set_end(0.1);
         w->set_steps(10);
       }, "sgd.learning_rate: linear_warmup: start must be finite"},
      {"Inf cosine alpha", [&](C& c) {
         auto* d = sgd(c)->mutable_learning_rate()->mutable_cosine_decay();
         d->set_init(0.1);
         d->set_steps(10);
         d->set_alpha(inf);
       }, "cosine_decay: alpha must be finite"},
      {"NaN inside a joined schedule", [&](C& c) {
         auto* j = sgd(c)->mutable_learning_rate()->mutable_joined();
         *j->add_schedules() = Constant(0.1);
         j->add_schedules()->mutable_exponential_decay()->set_init(nan);
         j->add_boundaries(5);
       }, "exponential_decay: init must be finite"},
      {"schedules nested 20 deep", [&](C& c) {
         natgrad::v1::Schedule* s = sgd(c)->mutable_learning_rate();
         for (int i = 0; i < 20; ++i) s = s->mutable_joined()->add_schedules();
         *s = Constant(0.1);
       }, "nested more than 8 deep"},
      {"negative adam learning rate", [](C& c) {
         *c.mutable_blocks(1)->mutable_adam()->mutable_learning_rate() = Constant(-1);
       }, "adam.learning_rate.constant.value: is -1"},
      {"NaN adam epsilon", [nan](C& c) { c.mutable_blocks(1)->mutable_adam()->set_epsilon(nan); },
       "epsilon"},
      {"adaptive damping NaN decay, even disabled",
       [nan](C& c) { c.mutable_adaptive_damping()->set_decay(nan); },
       "config.adaptive_damping.decay: must be finite"},
      {"adaptive damping Inf max_damping",
       [inf](C& c) { c.mutable_adaptive_damping()->set_max_damping(inf); },
       "config.adaptive_damping.max_damping: must be finite"},
      {"NaN kl kappa", [nan](C& c) { c.mutable_kl_clip()->set_kappa(nan); }, "kl_clip.kappa"},
  };
  for (const auto& bad : cases) {
    C c = Config();
    bad.mutate(c);
    auto s = client.CreateSession(c);
    EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument) << bad.what << s.status();
    EXPECT_THAT(std::string(s.status().message()), HasSubstr(bad.message)) << bad.what;
  }
  std::vector<HostileConfig> kfac = {
      {"kfac momentum 1", [](C& c) {
         *c.mutable_blocks(0)->mutable_kfac_dense()->mutable_momentum() = Constant(1);
       }, "kfac_dense.momentum.constant.value: is 1"},
      {"kfac damping 0", [](C& c) {
         *c.mutable_blocks(0)->mutable_kfac_dense()->mutable_damping() = Constant(0);
       }, "kfac_dense.damping.constant.value: is 0"},
      {"kfac negative learning rate", [](C& c) {
         *c.mutable_blocks(0)->mutable_kfac_dense()->mutable_learning_rate() = Constant(-1);
       }, "kfac_dense.learning_rate.constant.value: is -1"},
  };
  for (const auto& bad : kfac) {
    C c = KfacConfig();
    bad.mutate(c);
    auto s = client.CreateSession(c);
    EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument) << bad.what << s.status();
    EXPECT_THAT(std::string(s.status().message()), HasSubstr(bad.message)) << bad.what;
  }
  EXPECT_EQ(client.ListSessions()->size(), 0u);
  // The valid configs themselves are accepted.
  EXPECT_TRUE(client.CreateSession(Config()).ok());
  EXPECT_TRUE(client.CreateSession(KfacConfig()).ok());
}

TEST(HostileConfig, LongClientStringsAreCutInMessages) {
  auto server = StartServer();
  client::Client client(ClientFor(*server));
  auto s = client.CreateSession(Config(), std::string(100000, 'a'));
  EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.status().message(), HasSubstr("must match"));
  EXPECT_LT(s.status().message().size(), 200u);
  auto g = client.GetSession("sessions/" + std::string(100000, 'Q'));
  EXPECT_EQ(g.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_LT(g.status().message().size(), 200u);
  EXPECT_THAT(g.status().message(), Not(HasSubstr(std::string(100, 'Q'))));
}

}  // namespace
}  // namespace natgrad::testing
