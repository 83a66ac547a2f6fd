// Draining a replica onto its peers (docs/replicas.md), with in-process
// servers on port 0: Session.replica, the admin token, the SessionMoved
// redirect (its wire form), tombstones across a restart, tenants kept, and
// the race of steps streaming while their session is moved: every step is
// applied exactly once, on one replica, and the run matches an
// uninterrupted one bit for bit.
#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <fstream>
#include <thread>

#include "absl/synchronization/mutex.h"
#include "gmock/gmock.h"
#include "google/rpc/status.pb.h"
#include "natgrad/v1/admin_service.grpc.pb.h"
#include "server/common/log.h"
#include "server/service/session_moves.h"
#include "tests/ops/ops_util.h"
#include "tests/ops/server_process.h"
#include "tests/service/server_fixture.h"

namespace natgrad::testing {
namespace {

using ::testing::HasSubstr;

constexpr char kAdminToken[] = "admin-token-0123456789abcdef";

natgrad::v1::SessionConfig Config() {
  natgrad::v1::SessionConfig c;
  c.set_state_dtype(natgrad::v1::FLOAT64);
  auto* k = c.add_blocks();
  k->set_name("fc");
  auto* kd = k->mutable_kfac_dense();
  kd->set_d_in(4);
  kd->set_d_out(2);
  kd->set_inverse_period(2);
  *kd->mutable_momentum() = Constant(0.5);
  auto* a = c.add_blocks();
  a->set_name("b");
  a->add_shape(2);
  a->mutable_adam();
  return c;
}

std::vector<natgrad::v1::BlockStep> Inputs(int session, int t) {
  std::mt19937 rng(1000 * session + t);
  natgrad::v1::BlockStep fc, b;
  fc.set_name("fc");
  *fc.mutable_gradient() = client::MakeTensor(RandomVector(rng, 8), {2, 4});
  *fc.mutable_kfac()->mutable_raw()->mutable_activations() =
      client::MakeTensor(RandomVector(rng, 24), {6, 4});
  *fc.mutable_kfac()->mutable_raw()->mutable_output_gradients() =
      client::MakeTensor(RandomVector(rng, 12), {6, 2});
  b.set_name("b");
  *b.mutable_gradient() = client::MakeTensor(RandomVector(rng, 2), {2});
  return {fc, b};
}

std::string WriteFile(const std::string& dir, const std::string& name,
                      const std::string& text) {
  const std::string path = dir + "/" + name;
  std::ofstream(path) << text;
  return path;
}

struct Replica {
  std::string name;
  std::string checkpoint_dir;
  std::string tokens_file;
  std::unique_ptr<service::NatgradServer> server;
  std::string address() const { return "127.0.0.1:" + std::to_string(server->port()); }
};

Replica StartReplica(const std::string& name, const std::string& admin_file,
                     const std::string& checkpoint_dir = "", const std::string& tokens = "") {
  service::ServerOptions o;
  o.replica_name = name;
  o.admin_token_file = admin_file;
  o.checkpoint_dir = checkpoint_dir;
  o.auth_tokens_file = tokens;
  if (!checkpoint_dir.empty()) o.checkpoint_every_steps = 1;
  Replica r{name, checkpoint_dir, tokens, StartServer(o)};
  return r;
}

natgrad::v1::DrainResponse Drain(const Replica& from, const std::vector<const Replica*>& to,
                                 const std::string& token, grpc::Status* status) {
  auto stub = natgrad::v1::AdminService::NewStub(
      grpc::CreateChannel(from.address(), grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  if (!token.empty()) ctx.AddMetadata("authorization", "Bearer " + token);
  natgrad::v1::DrainRequest req;
  for (const Replica* p : to) {
    auto* peer = req.add_peers();
    peer->set_replica(p->name);
    peer->set_address(p->address());
  }
  natgrad::v1::DrainResponse out;
  *status = stub->Drain(&ctx, req, &out);
  return out;
}

// The redirect as it is on the wire: the status, and the SessionMoved inside
// the google.rpc.Status of grpc-status-details-bin.
std::optional<natgrad::v1::SessionMoved> RawRedirect(const Replica& r, const std::string& name,
                                                     grpc::Status* status,
                                                     const std::string& token = "") {
  auto stub = natgrad::v1::OptimizerService::NewStub(
      grpc::CreateChannel(r.address(), grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  if (!token.empty()) ctx.AddMetadata("authorization", "Bearer " + token);
  natgrad::v1::GetSessionRequest req;
  req.set_name(name);
  natgrad::v1::Session out;
  *status = stub->GetSession(&ctx, req, &out);
  google::rpc::Status details;
  if (!details.ParseFromString(status->error_details()) || details.details_size() != 1) {
    return std::nullopt;
  }
  if (details.code() != status->error_code() ||
      details.details(0).type_url() != "type.googleapis.com/natgrad.v1.SessionMoved") {
    return std::nullopt;
  }
  natgrad::v1::SessionMoved moved;
  if (!details.details(0).UnpackTo(&moved)) return std::nullopt;
  return moved;
}

// The value of a counter (or a histogram's sample count) in a server's
// registry, summed over the series whose labels include `label`.
double Metric(service::NatgradServer& server, const std::string& name,
              const std::string& label = "") {
  double total = 0;
  for (const auto& family : server.metrics().registry().Collect()) {
    if (family.name != name) continue;
    for (const auto& m : family.metric) {
      bool match = label.empty();
      for (const auto& l : m.label) match = match || l.name + "=" + l.value == label;
      if (!match) continue;
      total += family.type == prometheus::MetricType::Histogram
                   ? static_cast<double>(m.histogram.sample_count)
                   : m.counter.value;
    }
  }
  return total;
}

class DrainTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = MakeTempDir("ngdrain");
    admin_file_ = WriteFile(dir_, "admin", std::string(kAdminToken) + "\n");
  }
  std::string dir_, admin_file_;
};

TEST_F(DrainTest, SessionsNameTheirReplica) {
  Replica a = StartReplica("replica-a", admin_file_);
  client::Client c(ClientFor(*a.server));
  auto created = c.CreateSession(Config(), "named-1");
  ASSERT_TRUE(created.ok()) << created.status();
  EXPECT_EQ(created->replica(), "replica-a");
  EXPECT_EQ(c.GetSession("sessions/named-1")->replica(), "replica-a");
  auto listed = c.ListSessions();
  ASSERT_TRUE(listed.ok());
  ASSERT_EQ(listed->size(), 1u);
  EXPECT_EQ((*listed)[0].replica(), "replica-a");
  EXPECT_EQ(c.ReplicaOf("sessions/named-1"), "replica-a");
}

TEST_F(DrainTest, AdminNeedsTheAdminToken) {
  Replica open = StartReplica("replica-a", "");  // no --admin_token_file
  Replica guarded = StartReplica("replica-b", admin_file_);
  grpc::Status status;
  Drain(open, {&guarded}, kAdminToken, &status);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::PERMISSION_DENIED) << status.error_message();
  Drain(guarded, {&open}, "", &status);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  Drain(guarded, {&open}, "admin-token-0123456789abcdeX", &status);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  // Refused calls drained nothing.
  client::Client c(ClientFor(*guarded.server));
  EXPECT_TRUE(c.CreateSession(Config(), "still-here").ok());
}

TEST_F(DrainTest, MovedSessionsRedirectAndKeepTheirTenant) {
  const std::string tokens =
      WriteFile(dir_, "tokens", "alice-token-0123456789 alice\nbob-token-0123456789ab bob\n");
  Replica a = StartReplica("replica-a", admin_file_, dir_ + "/a", tokens);
  Replica b = StartReplica("replica-b", admin_file_, dir_ + "/b", tokens);
  client::ClientOptions alice_opts = ClientFor(*a.server);
  alice_opts.bearer_token = "alice-token-0123456789";
  alice_opts.connect_to_redirect_address = true;  // no router here
  client::Client alice(alice_opts);
  ASSERT_TRUE(alice.CreateSession(Config(), "moving-1").ok());
  auto stream = *alice.OpenStream("sessions/moving-1");
  for (int t = 1; t <= 3; ++t) ASSERT_TRUE(stream->Step(Inputs(1, t)).ok());

  grpc::Status status;
  auto drained = Drain(a, {&b}, kAdminToken, &status);
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(drained.moved(), 1);
  EXPECT_EQ(drained.failed(), 0) << drained.errors(0);
  EXPECT_EQ(a.server->registry().size(), 0);

  // Old replica: FAILED_PRECONDITION with the SessionMoved detail.
  auto moved = RawRedirect(a, "sessions/moving-1", &status, "alice-token-0123456789");
  EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_EQ(status.error_message(), "session \"sessions/moving-1\" moved to replica \"replica-b\"");
  ASSERT_TRUE(moved.has_value());
  EXPECT_EQ(moved->session(), "sessions/moving-1");
  EXPECT_EQ(moved->replica(), "replica-b");
  EXPECT_EQ(moved->address(), b.address());
  EXPECT_EQ(Metric(*a.server, "natgrad_sessions_moved_total", "outcome=moved"), 1);
  EXPECT_EQ(Metric(*a.server, "natgrad_sessions_moved_total", "outcome=failed"), 0);
  EXPECT_EQ(Metric(*a.server, "natgrad_drain_duration_seconds"), 1);
  EXPECT_EQ(Metric(*a.server, "natgrad_redirects_total"), 1);
  // Another tenant learns nothing: NOT_FOUND, as for any id it does not hold.
  RawRedirect(a, "sessions/moving-1", &status, "bob-token-0123456789ab");
  EXPECT_EQ(status.error_code(), grpc::StatusCode::NOT_FOUND);

  // The open stream ends with the redirect at its next step; the client
  // follows it and continues on replica-b.
  auto next = stream->Step(Inputs(1, 4));
  ASSERT_TRUE(next.ok()) << next.status();
  EXPECT_EQ(next->step(), 4);
  EXPECT_EQ(alice.ReplicaOf("sessions/moving-1"), "replica-b");
  EXPECT_GE(alice.redirects(), 1);
  // On replica-b it is alice's, not bob's.
  client::ClientOptions bob_opts = ClientFor(*b.server);
  bob_opts.bearer_token = "bob-token-0123456789ab";
  client::Client bob(bob_opts);
  EXPECT_EQ(bob.GetSession("sessions/moving-1").status().code(), absl::StatusCode::kNotFound);
  client::ClientOptions alice_b = ClientFor(*b.server);
  alice_b.bearer_token = "alice-token-0123456789";
  auto there = client::Client(alice_b).GetSession("sessions/moving-1");
  ASSERT_TRUE(there.ok()) << there.status();
  EXPECT_EQ(there->last_step(), 4);
  EXPECT_EQ(there->replica(), "replica-b");

  // A draining replica sends new sessions to a peer.
  auto created = alice.CreateSession(Config(), "created-after");
  ASSERT_TRUE(created.ok()) << created.status();
  EXPECT_EQ(created->replica(), "replica-b");
  EXPECT_EQ(a.server->registry().size(), 0);
  // The old replica served three redirects: the raw GetSession, the
  // stream's step 4, and this CreateSession.
  EXPECT_EQ(Metric(*a.server, "natgrad_redirects_total"), 3);
  // A server-chosen id: the redirect names no session, the client creates
  // on the peer and keeps using it there.
  auto unnamed = alice.CreateSession(Config());
  ASSERT_TRUE(unnamed.ok()) << unnamed.status();
  EXPECT_EQ(unnamed->replica(), "replica-b");
  auto unnamed_stream = alice.OpenStream(unnamed->name());
  ASSERT_TRUE(unnamed_stream.ok()) << unnamed_stream.status();
  EXPECT_TRUE((*unnamed_stream)->Step(Inputs(2, 1)).ok());

  // The tombstone survives a restart of replica-a, and its checkpoint does
  // not bring the session back there.
  stream.reset();
  a.server->Shutdown(absl::ZeroDuration());
  a.server.reset();
  Replica a2 = StartReplica("replica-a", admin_file_, dir_ + "/a", tokens);
  EXPECT_EQ(a2.server->registry().size(), 0);
  EXPECT_EQ(a2.server->moves().size(), 1);
  moved = RawRedirect(a2, "sessions/moving-1", &status, "alice-token-0123456789");
  EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  ASSERT_TRUE(moved.has_value());
  EXPECT_EQ(moved->replica(), "replica-b");
}

TEST_F(DrainTest, APeerThatRefusesLeavesTheSessionServedHere) {
  Replica a = StartReplica("replica-a", admin_file_);
  Replica b = StartReplica("replica-b", admin_file_);
  client::Client ca(ClientFor(*a.server)), cb(ClientFor(*b.server));
  ASSERT_TRUE(ca.CreateSession(Config(), "taken-id").ok());
  ASSERT_TRUE(cb.CreateSession(Config(), "taken-id").ok());  // the peer has the id
  grpc::Status status;
  auto drained = Drain(a, {&b}, kAdminToken, &status);
  ASSERT_TRUE(status.ok());
  EXPECT_EQ(drained.moved(), 0);
  ASSERT_EQ(drained.failed(), 1);
  EXPECT_THAT(drained.errors(0), HasSubstr("still served here"));
  EXPECT_EQ(Metric(*a.server, "natgrad_sessions_moved_total", "outcome=failed"), 1);
  // Unfrozen and still here: steps go on.
  auto stream = *ca.OpenStream("sessions/taken-id");
  EXPECT_TRUE(stream->Step(Inputs(1, 1)).ok());
}

// Sessions stream steps while their replica is drained: each stream keeps
// stepping until the drain has returned, then takes a few more steps. Each
// response must be bit-identical to the same step of an uninterrupted run on
// another server, every step answered once and in order, and the final state
// on the peer equal to the uninterrupted one: a step applied twice, or lost,
// would show in all three.
TEST_F(DrainTest, StepsStreamingDuringADrainAreAppliedExactlyOnce) {
  constexpr int kSessions = 4;
  constexpr int kAfterDrain = 5;
  constexpr int kMaxSteps = 5000;  // a bound, far beyond a drain's length
  Replica a = StartReplica("replica-a", admin_file_, dir_ + "/a");
  Replica b = StartReplica("replica-b", admin_file_, dir_ + "/b");
  Replica c = StartReplica("replica-c", admin_file_, dir_ + "/c");
  Replica ref = StartReplica("reference", "");

  client::ClientOptions opts = ClientFor(*a.server);
  opts.connect_to_redirect_address = true;
  opts.max_retries = 1000;
  opts.max_retry_time = absl::Seconds(60);
  client::Client client(opts);
  for (int s = 0; s < kSessions; ++s) {
    ASSERT_TRUE(client.CreateSession(Config(), "race-" + std::to_string(s)).ok());
  }
  absl::Mutex mu;
  int warmed = 0;  // sessions past step 3: the drain starts once all are
  bool drained_flag = false;
  std::vector<std::vector<std::string>> got(kSessions);
  std::vector<std::string> errors(kSessions);
  std::vector<std::thread> threads;
  for (int s = 0; s < kSessions; ++s) {
    threads.emplace_back([&, s] {
      auto stream = client.OpenStream("sessions/race-" + std::to_string(s));
      if (!stream.ok()) {
        errors[s] = stream.status().ToString();
        return;
      }
      int left_after_drain = -1;
      for (int t = 1; t <= kMaxSteps && left_after_drain != 0; ++t) {
        auto resp = (*stream)->Step(Inputs(s, t));
        if (!resp.ok()) {
          errors[s] = absl::StrCat("step ", t, ": ", resp.status().ToString());
          return;
        }
        if (resp->step() != t) {
          errors[s] = absl::StrCat("step ", t, " answered as step ", resp->step());
          return;
        }
        got[s].push_back(client::Normalized(*resp));
        absl::MutexLock lock(&mu);
        if (t == 3) ++warmed;
        if (left_after_drain > 0) --left_after_drain;
        if (left_after_drain < 0 && drained_flag) left_after_drain = kAfterDrain;
      }
      (*stream)->Close().IgnoreError();
    });
  }
  {
    absl::MutexLock lock(&mu);
    mu.Await(absl::Condition(
        +[](int* w) { return *w >= kSessions; }, &warmed));
  }
  grpc::Status status;
  auto drained = Drain(a, {&b, &c}, kAdminToken, &status);
  {
    absl::MutexLock lock(&mu);
    drained_flag = true;
  }
  for (auto& t : threads) t.join();
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(drained.moved(), kSessions);
  EXPECT_EQ(drained.failed(), 0) << (drained.errors_size() ? drained.errors(0) : "");
  // The streams were open across the moves, so they were redirected.
  EXPECT_GE(client.redirects(), 1);

  EXPECT_EQ(a.server->registry().size(), 0);
  EXPECT_EQ(b.server->registry().size() + c.server->registry().size(), kSessions);
  client::Client r(ClientFor(*ref.server));
  for (int s = 0; s < kSessions; ++s) {
    SCOPED_TRACE("session " + std::to_string(s));
    EXPECT_EQ(errors[s], "");
    const int steps = static_cast<int>(got[s].size());
    ASSERT_GT(steps, 3 + kAfterDrain);
    // The uninterrupted run of the same steps.
    const std::string id = "race-" + std::to_string(s);
    ASSERT_TRUE(r.CreateSession(Config(), id).ok());
    auto ref_stream = *r.OpenStream("sessions/" + id);
    for (int t = 1; t <= steps; ++t) {
      auto resp = ref_stream->Step(Inputs(s, t));
      ASSERT_TRUE(resp.ok()) << resp.status();
      EXPECT_TRUE(client::Normalized(*resp) == got[s][t - 1]) << "step " << t << " differs";
    }
    ASSERT_TRUE(ref_stream->Close().ok());
    const natgrad::v1::SessionSnapshot expected_state = *r.ExportSession("sessions/" + id);

    // Held by exactly one peer, at the last step, in the uninterrupted state.
    const std::string name = "sessions/" + id;
    auto on_b = b.server->registry().Get(name, "");
    auto on_c = c.server->registry().Get(name, "");
    ASSERT_NE(on_b.ok(), on_c.ok());
    EXPECT_EQ(client.ReplicaOf(name), on_b.ok() ? "replica-b" : "replica-c");
    natgrad::v1::SessionSnapshot state = (on_b.ok() ? *on_b : *on_c)->Snapshot();
    EXPECT_EQ(state.last_step(), steps);
    ASSERT_EQ(state.blocks_size(), expected_state.blocks_size());
    for (int i = 0; i < state.blocks_size(); ++i) {
      for (const auto& [tname, tensor] : expected_state.blocks(i).tensors()) {
        ASSERT_TRUE(state.blocks(i).tensors().contains(tname)) << tname;
        EXPECT_EQ(state.blocks(i).tensors().at(tname).data(), tensor.data())
            << "block " << state.blocks(i).name() << " tensor " << tname;
      }
      for (const auto& [sname, value] : expected_state.blocks(i).scalars()) {
        EXPECT_EQ(state.blocks(i).scalars().at(sname), value) << sname;
      }
    }
  }
}

// The replica-to-replica import: admin token only, into the snapshot's
// tenant, idempotent for one move_id, refused by a draining replica.
TEST_F(DrainTest, ImportMovedIsGuardedAndIdempotentPerMove) {
  Replica a = StartReplica("replica-a", admin_file_);
  Replica b = StartReplica("replica-b", admin_file_);
  client::Client ca(ClientFor(*a.server));
  ASSERT_TRUE(ca.CreateSession(Config(), "import-me").ok());
  auto held = a.server->registry().Get("sessions/import-me", "");
  ASSERT_TRUE(held.ok());
  natgrad::v1::ImportMovedRequest req;
  *req.mutable_snapshot() = (*held)->Snapshot();
  req.mutable_snapshot()->set_tenant("carol");
  req.set_source_replica("replica-a");
  req.set_move_id("move-1");
  auto stub = natgrad::v1::AdminService::NewStub(
      grpc::CreateChannel(b.address(), grpc::InsecureChannelCredentials()));
  auto call = [&](const std::string& token, const natgrad::v1::ImportMovedRequest& r) {
    grpc::ClientContext ctx;
    if (!token.empty()) ctx.AddMetadata("authorization", "Bearer " + token);
    natgrad::v1::Session out;
    return stub->ImportMoved(&ctx, r, &out);
  };
  EXPECT_EQ(call("", req).error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_EQ(b.server->registry().size(), 0);
  grpc::Status first = call(kAdminToken, req);
  ASSERT_TRUE(first.ok()) << first.error_message();
  EXPECT_TRUE(b.server->registry().Get("sessions/import-me", "carol").ok());
  EXPECT_FALSE(b.server->registry().Get("sessions/import-me", "").ok());
  // The same move again (a lost reply): acknowledged, nothing added.
  EXPECT_TRUE(call(kAdminToken, req).ok());
  EXPECT_EQ(b.server->registry().size(), 1);
  // Another move of the same id: refused.
  req.set_move_id("move-2");
  EXPECT_EQ(call(kAdminToken, req).error_code(), grpc::StatusCode::ALREADY_EXISTS);
  // A draining replica takes no moved sessions.
  Replica c = StartReplica("replica-c", admin_file_);
  grpc::Status status;
  Drain(b, {&c}, kAdminToken, &status);
  ASSERT_TRUE(status.ok());
  req.set_move_id("move-3");
  req.mutable_snapshot()->set_name("sessions/another-one");
  EXPECT_EQ(call(kAdminToken, req).error_code(), grpc::StatusCode::FAILED_PRECONDITION);
}

// Behind a router the client does not reconnect on a redirect: it keeps its
// target and names the new replica in natgrad-replica (here, with no router
// to act on it, the old replica keeps redirecting until max_redirects). The
// server's debug line of each failed call shows the headers it was sent.
TEST_F(DrainTest, BehindARouterTheClientSwitchesTheReplicaHeader) {
  const std::string log_path = dir_ + "/log";
  const int fd = ::open(log_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
  ASSERT_GE(fd, 0);
  log::SetFdForTesting(fd);
  log::SetLevel(log::Level::kDebug);
  {
    Replica a = StartReplica("replica-a", admin_file_);
    Replica b = StartReplica("replica-b", admin_file_);
    client::ClientOptions opts = ClientFor(*a.server);  // connect_to_redirect_address off
    opts.max_redirects = 2;
    client::Client c(opts);
    ASSERT_TRUE(c.CreateSession(Config(), "routed-1").ok());
    grpc::Status status;
    ASSERT_EQ(Drain(a, {&b}, kAdminToken, &status).moved(), 1);
    auto got = c.GetSession("sessions/routed-1");
    EXPECT_EQ(got.status().code(), absl::StatusCode::kFailedPrecondition);
    ASSERT_TRUE(client::SessionMovedFrom(got.status()).has_value());
    EXPECT_EQ(c.ReplicaOf("sessions/routed-1"), "replica-b");
    EXPECT_EQ(c.redirects(), 2);
  }
  log::SetFdForTesting(2);
  log::SetLevel(log::Level::kInfo);
  ::close(fd);
  const std::string log = ReadText(log_path);
  // First attempt: the replica learnt from CreateSession; then the new one.
  EXPECT_THAT(log, HasSubstr("GetSession failed: code=FAILED_PRECONDITION"));
  EXPECT_THAT(log, HasSubstr("natgrad-session-key=routed-1 natgrad-replica=replica-a:"));
  EXPECT_THAT(log, HasSubstr("natgrad-session-key=routed-1 natgrad-replica=replica-b:"));
}

// The move gate on its own: a frozen session's step waits, then is refused
// with UNAVAILABLE, or gets the redirect once the move is recorded; a freeze
// waits for the step in progress.
TEST(SessionMovesGate, FreezeHoldsStepsThenRedirectsOrRefuses) {
  auto moves = service::SessionMoves::Open({.freeze_wait = absl::Milliseconds(50)}, nullptr);
  ASSERT_TRUE(moves.ok());
  service::SessionMoves& m = **moves;
  ASSERT_TRUE(m.Enter("t", "gated").ok());  // a step in progress
  absl::Status frozen = absl::UnknownError("not run");
  std::thread freezer([&] { frozen = m.Freeze("t", "gated", absl::Seconds(60)); });
  m.Exit("t", "gated");  // the freeze can only complete after this
  freezer.join();
  ASSERT_TRUE(frozen.ok()) << frozen;
  EXPECT_EQ(m.Freeze("t", "gated", absl::Seconds(1)).code(),
            absl::StatusCode::kFailedPrecondition);  // already frozen
  // Frozen, nothing recorded: refused after freeze_wait, nothing applied.
  EXPECT_EQ(m.Enter("t", "gated").code(), absl::StatusCode::kUnavailable);
  // Another tenant's session of the same id is not affected.
  ASSERT_TRUE(m.Enter("u", "gated").ok());
  m.Exit("u", "gated");
  // Recorded while (or before) a step waits: the step gets the redirect.
  absl::Status waited = absl::UnknownError("not run");
  std::thread stepper([&] { waited = m.Enter("t", "gated"); });
  natgrad::v1::SessionMoved moved;
  moved.set_session("sessions/gated");
  moved.set_replica("replica-z");
  ASSERT_TRUE(m.Record("t", "gated", moved).ok());
  stepper.join();
  EXPECT_EQ(waited.code(), absl::StatusCode::kFailedPrecondition);
  auto detail = waited.GetPayload(service::kSessionMovedTypeUrl);
  ASSERT_TRUE(detail.has_value());
  natgrad::v1::SessionMoved parsed;
  ASSERT_TRUE(parsed.ParseFromString(std::string(*detail)));
  EXPECT_EQ(parsed.replica(), "replica-z");
  // Moved back: served again.
  m.Forget("t", "gated");
  EXPECT_TRUE(m.Enter("t", "gated").ok());
  m.Exit("t", "gated");
}

// Tombstones in the checkpoint directory: read back by a new instance, and
// gone (file included) once older than the TTL.
TEST(SessionMovesTombstones, PersistAndExpireWithTheTtl) {
  const std::string dir = MakeTempDir("ngtomb");
  service::SessionMovesOptions o{.checkpoint_dir = dir, .ttl = absl::Hours(1)};
  natgrad::v1::SessionMoved moved;
  moved.set_session("sessions/kept-1");
  moved.set_replica("replica-z");
  moved.set_address("10.0.0.9:50051");
  {
    auto m = service::SessionMoves::Open(o, nullptr);
    ASSERT_TRUE(m.ok());
    ASSERT_TRUE((*m)->Record("alice", "kept-1", moved).ok());
  }
  auto m = service::SessionMoves::Open(o, nullptr);
  ASSERT_TRUE(m.ok());
  EXPECT_EQ((*m)->size(), 1);
  EXPECT_TRUE((*m)->IsMoved("alice", "kept-1"));
  EXPECT_FALSE((*m)->IsMoved("bob", "kept-1"));
  absl::Status redirect = (*m)->CheckNotMoved("alice", "kept-1");
  EXPECT_EQ(redirect.message(), "session \"sessions/kept-1\" moved to replica \"replica-z\"");
  EXPECT_EQ((*m)->ExpireOld(absl::Now()), 0);
  EXPECT_EQ((*m)->ExpireOld(absl::Now() + absl::Hours(2)), 1);
  EXPECT_FALSE((*m)->IsMoved("alice", "kept-1"));
  auto reopened = service::SessionMoves::Open(o, nullptr);
  ASSERT_TRUE(reopened.ok());
  EXPECT_EQ((*reopened)->size(), 0);
}

// UNAVAILABLE is retried within max_retry_time: a call made while no server
// listens succeeds once one does, and without one it gives up.
TEST(ClientRetry, UnavailableIsRetriedUntilAReplicaServes) {
  auto first = StartServer();
  const int port = first->port();
  first->Shutdown(absl::ZeroDuration());
  first.reset();
  client::ClientOptions o;
  o.target = "127.0.0.1:" + std::to_string(port);
  o.initial_backoff = absl::Milliseconds(5);
  o.max_backoff = absl::Milliseconds(50);
  o.max_retry_time = absl::Milliseconds(200);
  EXPECT_EQ(client::Client(o).CreateSession(Config(), "nobody-home").status().code(),
            absl::StatusCode::kUnavailable);

  o.max_retry_time = absl::Seconds(60);
  client::Client c(o);
  absl::StatusOr<natgrad::v1::Session> created = absl::UnknownError("not run");
  std::thread call([&] { created = c.CreateSession(Config(), "came-back"); });
  service::ServerOptions so;
  so.address = "127.0.0.1:" + std::to_string(port);
  so.engine.backend = "cpu";
  auto second = service::NatgradServer::Start(so);
  ASSERT_TRUE(second.ok()) << second.status();
  call.join();
  ASSERT_TRUE(created.ok()) << created.status();
  EXPECT_EQ(created->name(), "sessions/came-back");
}

}  // namespace
}  // namespace natgrad::testing
