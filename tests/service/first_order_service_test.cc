// Issue 2's end-to-end oracle: hundreds of steps streamed through a real
// server give exactly the updates of calling the core blocks in-process; and
// the step protocol (replay, order, reconnect, one stream per session).
#include <thread>

#include "gmock/gmock.h"
#include "google/protobuf/util/message_differencer.h"
#include "server/blocks/adam/math/adam_block.h"
#include "server/blocks/sgd/math/sgd_block.h"
#include "server/core/schedule.h"
#include "tests/service/server_fixture.h"

namespace natgrad::testing {
namespace {

using ::testing::HasSubstr;

constexpr int kRows = 3, kCols = 4, kBias = 5;

natgrad::v1::SessionConfig TwoBlockConfig() {
  natgrad::v1::SessionConfig c;
  c.set_state_dtype(natgrad::v1::FLOAT64);
  auto* w = c.add_blocks();
  w->set_name("w");
  w->add_shape(kRows);
  w->add_shape(kCols);
  auto* adam = w->mutable_adam();
  auto* warm = adam->mutable_learning_rate()->mutable_linear_warmup();
  warm->set_start(0.0);
  warm->set_end(0.01);
  warm->set_steps(20);
  *adam->mutable_weight_decay() = Constant(0.01);
  adam->set_decoupled_weight_decay(true);
  auto* b = c.add_blocks();
  b->set_name("b");
  b->add_shape(kBias);
  auto* sgd = b->mutable_sgd();
  *sgd->mutable_learning_rate() = Constant(0.1);
  *sgd->mutable_momentum() = Constant(0.9);
  sgd->set_nesterov(true);
  return c;
}

// The same two blocks, built directly from core.
struct CoreReference {
  std::unique_ptr<core::ParameterBlock> w, b;
  CoreReference() {
    core::AdamOptions ao;
    ao.learning_rate = *core::LinearWarmupSchedule(0.0, 0.01, 20);
    ao.weight_decay = core::ConstantSchedule(0.01);
    ao.decoupled_weight_decay = true;
    w = *core::NewAdamBlock("w", {kRows, kCols}, ao, core::Precision::kFloat64);
    core::SgdOptions so;
    so.learning_rate = core::ConstantSchedule(0.1);
    so.momentum = core::ConstantSchedule(0.9);
    so.nesterov = true;
    b = *core::NewSgdBlock("b", {kBias, 1}, so, core::Precision::kFloat64);
  }
};

Eigen::MatrixXd RowMajorMatrix(const std::vector<double>& v, int rows, int cols) {
  Eigen::MatrixXd m(rows, cols);
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols; ++c) m(r, c) = v[r * cols + c];
  return m;
}

std::vector<double> Flatten(const Eigen::MatrixXd& m) {
  std::vector<double> v;
  for (int r = 0; r < m.rows(); ++r)
    for (int c = 0; c < m.cols(); ++c) v.push_back(m(r, c));
  return v;
}

std::vector<natgrad::v1::BlockStep> RandomStep(std::mt19937& rng, std::vector<double>* wg,
                                               std::vector<double>* wp,
                                               std::vector<double>* bg) {
  *wg = RandomVector(rng, kRows * kCols);
  *wp = RandomVector(rng, kRows * kCols);
  *bg = RandomVector(rng, kBias);
  natgrad::v1::BlockStep w, b;
  w.set_name("w");
  *w.mutable_gradient() = client::MakeTensor(*wg, {kRows, kCols});
  *w.mutable_params() = client::MakeTensor(*wp, {kRows, kCols});
  b.set_name("b");
  *b.mutable_gradient() = client::MakeTensor(*bg, {kBias});
  return {w, b};
}

void RunAgainstCore(service::NatgradServer& server, int steps, uint32_t seed) {
  client::Client client(ClientFor(server));
  auto session = client.CreateSession(TwoBlockConfig());
  ASSERT_TRUE(session.ok()) << session.status();
  auto stream = client.OpenStream(session->name());
  ASSERT_TRUE(stream.ok());
  CoreReference ref;
  std::mt19937 rng(seed);
  for (int t = 1; t <= steps; ++t) {
    std::vector<double> wg, wp, bg;
    auto blocks = RandomStep(rng, &wg, &wp, &bg);
    auto response = (*stream)->Step(blocks);
    ASSERT_TRUE(response.ok()) << response.status();
    ASSERT_EQ(response->step(), t);

    core::StepContext ctx;
    ctx.step = t;
    core::DenseStepInput win;
    win.gradient = RowMajorMatrix(wg, kRows, kCols);
    win.params = RowMajorMatrix(wp, kRows, kCols);
    auto wpending = ref.w->Propose(win, ctx);
    ASSERT_TRUE(wpending.ok());
    const Eigen::MatrixXd wdelta = (*wpending)->Commit(1.0).delta.ToMatrix<double>();
    core::DenseStepInput bin;
    bin.gradient = RowMajorMatrix(bg, kBias, 1);
    auto bpending = ref.b->Propose(bin, ctx);
    ASSERT_TRUE(bpending.ok());
    const Eigen::MatrixXd bdelta = (*bpending)->Commit(1.0).delta.ToMatrix<double>();

    // Bit-for-bit: the same arithmetic, only the transport differs.
    ASSERT_EQ(client::TensorValues(response->updates(0).delta()), Flatten(wdelta)) << "step " << t;
    ASSERT_EQ(client::TensorValues(response->updates(1).delta()), Flatten(bdelta)) << "step " << t;
    ASSERT_EQ(response->updates(1).delta().shape_size(), 1);  // the client's own shape
  }
}

TEST(FirstOrderService, HundredsOfStepsEqualCoreInProcess) {
  auto server = StartServer();
  RunAgainstCore(*server, 300, 1);
}

TEST(FirstOrderService, SeveralSessionsConcurrently) {
  auto server = StartServer();
  std::vector<std::thread> threads;
  for (int i = 0; i < 6; ++i) {
    threads.emplace_back([&, i] { RunAgainstCore(*server, 60, 100 + i); });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(server->registry().size(), 6);
}

TEST(StepProtocol, RetriedStepReplaysCachedResponseAndChangesNothing) {
  auto server = StartServer();
  client::Client client(ClientFor(*server));
  auto session = client.CreateSession(TwoBlockConfig());
  ASSERT_TRUE(session.ok());
  auto stream = client.OpenStream(session->name());
  std::mt19937 rng(3);
  std::vector<double> wg, wp, bg;
  auto first = (*stream)->Step(RandomStep(rng, &wg, &wp, &bg));
  ASSERT_TRUE(first.ok());
  auto before = client.ExportSession(session->name());
  // The same step number again, even with other content: the cached answer.
  auto replay = (*stream)->StepNumbered(1, RandomStep(rng, &wg, &wp, &bg));
  ASSERT_TRUE(replay.ok()) << replay.status();
  EXPECT_TRUE(replay->replayed());
  EXPECT_FALSE(first->replayed());
  EXPECT_EQ(replay->updates(0).delta().data(), first->updates(0).delta().data());
  auto after = client.ExportSession(session->name());
  EXPECT_TRUE(google::protobuf::util::MessageDifferencer::Equals(*before, *after));
}

TEST(StepProtocol, GapsAndOldStepsAreRejected) {
  auto server = StartServer();
  client::Client client(ClientFor(*server));
  auto session = client.CreateSession(TwoBlockConfig());
  auto stream = client.OpenStream(session->name());
  std::mt19937 rng(4);
  std::vector<double> wg, wp, bg;
  ASSERT_TRUE((*stream)->Step(RandomStep(rng, &wg, &wp, &bg)).ok());
  ASSERT_TRUE((*stream)->Step(RandomStep(rng, &wg, &wp, &bg)).ok());
  auto gap = (*stream)->StepNumbered(4, RandomStep(rng, &wg, &wp, &bg));
  EXPECT_EQ(gap.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(gap.status().message(), HasSubstr("next step is 3"));
  auto old = (*stream)->StepNumbered(1, RandomStep(rng, &wg, &wp, &bg));
  EXPECT_EQ(old.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(client.GetSession(session->name())->last_step(), 2);
  EXPECT_TRUE((*stream)->StepNumbered(3, RandomStep(rng, &wg, &wp, &bg)).ok());
}

TEST(StepProtocol, ReconnectsAfterADroppedStream) {
  auto server = StartServer();
  client::Client client(ClientFor(*server));
  auto session = client.CreateSession(TwoBlockConfig());
  auto stream = client.OpenStream(session->name());
  std::mt19937 rng(5);
  std::vector<double> wg, wp, bg;
  for (int t = 1; t <= 10; ++t) {
    if (t % 3 == 0) (*stream)->DropStream();
    auto r = (*stream)->Step(RandomStep(rng, &wg, &wp, &bg));
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->step(), t);
  }
  EXPECT_EQ(client.GetSession(session->name())->last_step(), 10);
}

TEST(StepProtocol, SecondStreamOnASessionIsRefused) {
  auto server = StartServer();
  client::Client client(ClientFor(*server));
  auto session = client.CreateSession(TwoBlockConfig());
  auto a = client.OpenStream(session->name());
  std::mt19937 rng(6);
  std::vector<double> wg, wp, bg;
  ASSERT_TRUE((*a)->Step(RandomStep(rng, &wg, &wp, &bg)).ok());
  // A raw second stream (the client's retry logic would wait it out).
  grpc::ClientContext ctx;
  auto raw = client.stub().Step(&ctx);
  natgrad::v1::StepRequest req;
  req.set_session(session->name());
  req.set_step(2);
  req.set_last(true);
  raw->Write(req);
  natgrad::v1::StepResponse resp;
  EXPECT_FALSE(raw->Read(&resp));
  grpc::Status s = raw->Finish();
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(s.error_message(), HasSubstr("stream already open"));
}

TEST(StepProtocol, SessionDeletedUnderAnOpenStreamIsNotFound) {
  auto server = StartServer();
  client::Client client(ClientFor(*server));
  auto session = client.CreateSession(TwoBlockConfig());
  auto stream = client.OpenStream(session->name());
  std::mt19937 rng(8);
  std::vector<double> wg, wp, bg;
  ASSERT_TRUE((*stream)->Step(RandomStep(rng, &wg, &wp, &bg)).ok());
  ASSERT_TRUE(client.DeleteSession(session->name()).ok());
  auto r = (*stream)->Step(RandomStep(rng, &wg, &wp, &bg));
  EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound);
}

TEST(StepProtocol, UnknownSessionIsNotFound) {
  auto server = StartServer();
  client::Client client(ClientFor(*server));
  client::SessionStream stream(&client, "sessions/0123456789abcdef0123456789abcdef", 1);
  auto r = stream.Step({});
  EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(client.GetSession("sessions/nope-nope").status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(client.DeleteSession("sessions/nope-nope").code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(client.GetSession("bad/name!").status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(SessionLifecycle, CreateGetListDelete) {
  service::ServerOptions o;
  o.limits.max_sessions = 5;
  auto server = StartServer(o);
  client::Client client(ClientFor(*server));
  std::vector<std::string> names;
  for (int i = 0; i < 5; ++i) {
    auto s = client.CreateSession(TwoBlockConfig());
    ASSERT_TRUE(s.ok());
    EXPECT_EQ(s->name().size(), std::string("sessions/").size() + 32);
    names.push_back(s->name());
  }
  auto full = client.CreateSession(TwoBlockConfig());
  EXPECT_EQ(full.status().code(), absl::StatusCode::kResourceExhausted);
  auto listed = client.ListSessions();
  ASSERT_TRUE(listed.ok());
  EXPECT_EQ(listed->size(), 5u);
  auto got = client.GetSession(names[0]);
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(got->config().blocks_size(), 2);
  EXPECT_EQ(got->last_step(), 0);
  EXPECT_GT(got->state_bytes(), 0);
  ASSERT_TRUE(client.DeleteSession(names[0]).ok());
  EXPECT_EQ(client.GetSession(names[0]).status().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(client.CreateSession(TwoBlockConfig(), "my-session").ok());
  // Five held again: the limit applies before the id is considered.
  EXPECT_EQ(client.CreateSession(TwoBlockConfig(), "my-session-2").status().code(),
            absl::StatusCode::kResourceExhausted);
}

TEST(SessionLifecycle, ListPagesThroughEverySession) {
  auto server = StartServer();
  client::Client client(ClientFor(*server));
  for (int i = 0; i < 7; ++i) ASSERT_TRUE(client.CreateSession(TwoBlockConfig()).ok());
  grpc::ClientContext ctx;
  natgrad::v1::ListSessionsRequest req;
  req.set_page_size(3);
  natgrad::v1::ListSessionsResponse page;
  ASSERT_TRUE(client.stub().ListSessions(&ctx, req, &page).ok());
  EXPECT_EQ(page.sessions_size(), 3);
  EXPECT_FALSE(page.next_page_token().empty());
  EXPECT_EQ(client.ListSessions()->size(), 7u);
}

TEST(SessionLifecycle, SessionSizeLimitIsEnforcedAtCreate) {
  service::ServerOptions o;
  o.limits.max_session_bytes = 1000;
  auto server = StartServer(o);
  client::Client client(ClientFor(*server));
  natgrad::v1::SessionConfig c;
  auto* b = c.add_blocks();
  b->set_name("big");
  b->add_shape(100);
  b->add_shape(100);
  b->mutable_adam();
  auto s = client.CreateSession(c);
  EXPECT_EQ(s.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(s.status().message(), HasSubstr("limit"));
}

}  // namespace
}  // namespace natgrad::testing
