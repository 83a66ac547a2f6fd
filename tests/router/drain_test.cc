// Draining a replica onto its peers (docs/replicas.md), with in-process
// servers on port 0: Session.replica, the admin token, the SessionMoved
// redirect (its wire form), tombstones across a restart, tenants kept, and
// the race of steps streaming while their session is moved: every step is
// applied exactly once, on one replica, and the run matches an
// uninterrupted one bit for bit.
#include <atomic>
#include <fstream>
#include <thread>

#include "absl/synchronization/mutex.h"
#include "gmock/gmock.h"
#include "google/rpc/status.pb.h"
#include "natgrad/v1/admin_service.grpc.pb.h"
#include "server/service/session_moves.h"
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

// Sessions stream steps while their replica is drained. Each response must
// be bit-identical to the same step of an uninterrupted run on a third
// server, steps 1..T each answered once in order, and the final state on the
// peer equal to the uninterrupted one: a step applied twice, or lost, would
// show in all three.
TEST_F(DrainTest, StepsStreamingDuringADrainAreAppliedExactlyOnce) {
  constexpr int kSessions = 4;
  constexpr int kSteps = 30;
  Replica a = StartReplica("replica-a", admin_file_, dir_ + "/a");
  Replica b = StartReplica("replica-b", admin_file_, dir_ + "/b");
  Replica c = StartReplica("replica-c", admin_file_, dir_ + "/c");
  Replica ref = StartReplica("reference", "");

  // The uninterrupted run.
  std::vector<std::vector<std::string>> expected(kSessions);
  std::vector<natgrad::v1::SessionSnapshot> expected_state(kSessions);
  {
    client::Client r(ClientFor(*ref.server));
    for (int s = 0; s < kSessions; ++s) {
      const std::string id = "race-" + std::to_string(s);
      ASSERT_TRUE(r.CreateSession(Config(), id).ok());
      auto stream = *r.OpenStream("sessions/" + id);
      for (int t = 1; t <= kSteps; ++t) {
        auto resp = stream->Step(Inputs(s, t));
        ASSERT_TRUE(resp.ok()) << resp.status();
        expected[s].push_back(client::Normalized(*resp));
      }
      ASSERT_TRUE(stream->Close().ok());
      expected_state[s] = *r.ExportSession("sessions/" + id);
    }
  }

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
      for (int t = 1; t <= kSteps; ++t) {
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
        if (t == 3) {
          absl::MutexLock lock(&mu);
          ++warmed;
        }
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
  for (auto& t : threads) t.join();
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(drained.moved(), kSessions);
  EXPECT_EQ(drained.failed(), 0) << (drained.errors_size() ? drained.errors(0) : "");

  EXPECT_EQ(a.server->registry().size(), 0);
  EXPECT_EQ(b.server->registry().size() + c.server->registry().size(), kSessions);
  for (int s = 0; s < kSessions; ++s) {
    SCOPED_TRACE("session " + std::to_string(s));
    EXPECT_EQ(errors[s], "");
    ASSERT_EQ(got[s].size(), expected[s].size());
    for (int t = 0; t < kSteps; ++t) {
      EXPECT_TRUE(got[s][t] == expected[s][t]) << "step " << t + 1 << " differs";
    }
    const std::string name = "sessions/race-" + std::to_string(s);
    const std::string replica = client.ReplicaOf(name);
    EXPECT_TRUE(replica == "replica-b" || replica == "replica-c") << replica;
    // Held by exactly one peer, at the last step, in the uninterrupted state.
    const Replica& holder = replica == "replica-b" ? b : c;
    const Replica& other = replica == "replica-b" ? c : b;
    EXPECT_FALSE(other.server->registry().Get(name, "").ok());
    auto held = holder.server->registry().Get(name, "");
    ASSERT_TRUE(held.ok()) << held.status();
    natgrad::v1::SessionSnapshot state = (*held)->Snapshot();
    EXPECT_EQ(state.last_step(), kSteps);
    ASSERT_EQ(state.blocks_size(), expected_state[s].blocks_size());
    for (int i = 0; i < state.blocks_size(); ++i) {
      for (const auto& [tname, tensor] : expected_state[s].blocks(i).tensors()) {
        ASSERT_TRUE(state.blocks(i).tensors().contains(tname)) << tname;
        EXPECT_EQ(state.blocks(i).tensors().at(tname).data(), tensor.data())
            << "block " << state.blocks(i).name() << " tensor " << tname;
      }
      for (const auto& [sname, value] : expected_state[s].blocks(i).scalars()) {
        EXPECT_EQ(state.blocks(i).scalars().at(sname), value) << sname;
      }
    }
  }
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
