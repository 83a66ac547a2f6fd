#include "server/service/admin_service.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>

#include <chrono>
#include <fstream>
#include <sstream>

#include "absl/random/random.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/strip.h"
#include "server/common/log.h"
#include "server/service/service_metrics.h"
#include "server/service/status_conversion.h"

namespace natgrad::service {
namespace {

std::string Sha256(absl::string_view bytes) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  EVP_Digest(bytes.data(), bytes.size(), md, &len, EVP_sha256(), nullptr);
  return std::string(reinterpret_cast<const char*>(md), len);
}

std::string RandomMoveId() {
  absl::BitGen gen;
  return absl::StrFormat("%016x%016x", absl::Uniform<uint64_t>(gen),
                         absl::Uniform<uint64_t>(gen));
}

// Whether the peer may have imported although the call failed: the request
// may have been delivered and the reply lost.
bool Ambiguous(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::UNAVAILABLE:
    case grpc::StatusCode::DEADLINE_EXCEEDED:
    case grpc::StatusCode::CANCELLED:
    case grpc::StatusCode::UNKNOWN:
    case grpc::StatusCode::INTERNAL:
    case grpc::StatusCode::ABORTED:
      return true;
    default:
      return false;
  }
}

constexpr size_t kMaxRememberedImports = 4096;
constexpr int kImportAttempts = 4;

}  // namespace

absl::StatusOr<std::string> ReadAdminToken(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::FailedPreconditionError(absl::StrCat("--admin_token_file: cannot read ", path));
  std::stringstream buffer;
  buffer << in.rdbuf();
  std::string token(absl::StripAsciiWhitespace(buffer.str()));
  if (token.size() < 16 || absl::StrContains(token, '\n') || absl::StrContains(token, ' ')) {
    return absl::InvalidArgumentError(
        "--admin_token_file: want one token of at least 16 characters");
  }
  return token;
}

AdminService::AdminService(const ServiceDependencies& deps, AdminOptions options,
                           prometheus::Registry* metrics)
    : deps_(deps), options_(std::move(options)) {
  if (!options_.token.empty()) token_digest_ = Sha256(options_.token);
  if (metrics != nullptr) {
    auto& moved = prometheus::BuildCounter()
                      .Name("natgrad_sessions_moved_total")
                      .Help("Sessions a drain moved to a peer, by outcome (failed: still "
                            "here, or left frozen when the peer's answer was lost)")
                      .Register(*metrics);
    moved_ok_ = &moved.Add({{"outcome", "moved"}});
    moved_failed_ = &moved.Add({{"outcome", "failed"}});
    drain_seconds_ = &prometheus::BuildHistogram()
                          .Name("natgrad_drain_duration_seconds")
                          .Help("Wall time of AdminService.Drain calls")
                          .Register(*metrics)
                          .Add({}, prometheus::Histogram::BucketBoundaries{
                                       0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300});
  }
}

AdminService::~AdminService() {
  std::vector<std::thread> threads;
  {
    absl::MutexLock lock(&mu_);
    threads.swap(threads_);
  }
  for (auto& t : threads) t.join();
}

absl::Status AdminService::Authorize(const grpc::CallbackServerContext& context) const {
  if (token_digest_.empty()) {
    return absl::PermissionDeniedError(
        "the admin service is disabled (the server runs without --admin_token_file)");
  }
  const auto& md = context.client_metadata();
  auto it = md.find("authorization");
  std::string presented;
  if (it != md.end()) {
    absl::string_view value(it->second.data(), it->second.size());
    if (absl::ConsumePrefix(&value, "Bearer ")) presented = std::string(value);
  }
  // Digests of equal length, compared in constant time (as the tenant
  // tokens are): the time does not tell how much of a guess was right.
  const std::string digest = Sha256(presented);
  if (presented.empty() ||
      CRYPTO_memcmp(digest.data(), token_digest_.data(), digest.size()) != 0) {
    return absl::PermissionDeniedError("admin call without the admin token");
  }
  return absl::OkStatus();
}

natgrad::v1::AdminService::Stub* AdminService::StubFor(const std::string& address) {
  absl::MutexLock lock(&mu_);
  auto& stub = stubs_[address];
  if (stub == nullptr) {
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(-1);
    args.SetMaxSendMessageSize(-1);
    auto creds = options_.peer_credentials ? options_.peer_credentials
                                           : grpc::InsecureChannelCredentials();
    stub = natgrad::v1::AdminService::NewStub(grpc::CreateCustomChannel(address, creds, args));
  }
  return stub.get();
}

grpc::ServerUnaryReactor* AdminService::Drain(grpc::CallbackServerContext* context,
                                              const natgrad::v1::DrainRequest* request,
                                              natgrad::v1::DrainResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  absl::Status status = Authorize(*context);
  if (status.ok() && request->peers().empty()) {
    status = absl::InvalidArgumentError("peers: at least one peer is required");
  }
  for (int i = 0; status.ok() && i < request->peers_size(); ++i) {
    const auto& p = request->peers(i);
    if (p.replica().empty() || p.address().empty()) {
      status = absl::InvalidArgumentError(
          absl::StrCat("peers[", i, "]: replica and address are required"));
    } else if (p.replica() == deps_.replica_name) {
      status = absl::InvalidArgumentError(
          absl::StrCat("peers[", i, "]: \"", p.replica(), "\" is this replica"));
    }
  }
  if (!status.ok()) {
    reactor->Finish(ToGrpcStatus(status));
    return reactor;
  }
  // The moves block on peers' answers: off gRPC's callback threads.
  absl::MutexLock lock(&mu_);
  threads_.emplace_back([this, reactor, request, response] {
    *response = RunDrain(*request);
    reactor->Finish(grpc::Status::OK);
  });
  return reactor;
}

natgrad::v1::DrainResponse AdminService::RunDrain(const natgrad::v1::DrainRequest& request) {
  absl::MutexLock drain_lock(&drain_mu_);
  const absl::Time start = absl::Now();
  std::vector<natgrad::v1::Peer> peers(request.peers().begin(), request.peers().end());
  // From now on new sessions go to the peers.
  deps_.moves->SetDraining(peers);
  NATGRAD_LOG(kInfo, "drain: replica ", deps_.replica_name, " moving ",
              deps_.registry->size(), " session(s) to ", peers.size(), " peer(s)");
  natgrad::v1::DrainResponse out;
  for (const auto& s : deps_.registry->All()) {
    if (s->deleted()) continue;
    natgrad::v1::Peer peer = *deps_.moves->PeerFor(s->id());
    {
      absl::MutexLock lock(&mu_);
      auto it = unsettled_.find({s->tenant(), s->id()});
      if (it != unsettled_.end()) peer = it->second.first;  // finish that move
    }
    bool left_frozen = false;
    absl::Status moved = MoveOne(s, peer, &left_frozen);
    if (moved.ok()) {
      out.set_moved(out.moved() + 1);
      if (moved_ok_) moved_ok_->Increment();
    } else {
      out.set_failed(out.failed() + 1);
      if (moved_failed_) moved_failed_->Increment();
      out.add_errors(absl::StrCat(s->name(), " -> ", peer.replica(), ": ", moved.message(),
                                  left_frozen ? " (left frozen: run Drain again)"
                                              : " (still served here)"));
      NATGRAD_LOG(kWarning, "drain: ", out.errors(out.errors_size() - 1));
    }
  }
  if (deps_.metrics) deps_.metrics->SetSessions(deps_.registry->size());
  const absl::Duration took = absl::Now() - start;
  if (drain_seconds_) drain_seconds_->Observe(absl::ToDoubleSeconds(took));
  NATGRAD_LOG(kInfo, "drain: moved ", out.moved(), ", failed ", out.failed(), " in ",
              absl::FormatDuration(took));
  return out;
}

absl::Status AdminService::MoveOne(const std::shared_ptr<session::Session>& session,
                                   const natgrad::v1::Peer& peer, bool* left_frozen) {
  const std::string tenant = session->tenant();
  const std::string id = session->id();
  const std::pair<std::string, std::string> key(tenant, id);
  natgrad::v1::AdminService::Stub* stub = StubFor(peer.address());
  std::string move_id;
  bool retrying_unsettled = false;
  {
    absl::MutexLock lock(&mu_);
    auto it = unsettled_.find(key);
    if (it != unsettled_.end()) {
      move_id = it->second.second;
      retrying_unsettled = true;
    }
  }
  if (!retrying_unsettled) {
    // A peer that cannot be reached is not tried: the session stays here
    // unfrozen, and no import can be in doubt.
    grpc::ClientContext probe;
    natgrad::v1::ImportMovedRequest empty;
    natgrad::v1::Session ignored;
    probe.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    probe.AddMetadata("authorization", "Bearer " + options_.token);
    grpc::Status reach = stub->ImportMoved(&probe, empty, &ignored);
    if (reach.error_code() == grpc::StatusCode::UNAVAILABLE ||
        reach.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED) {
      return absl::UnavailableError(
          absl::StrCat("peer ", peer.address(), " unreachable: ", reach.error_message()));
    }
    if (reach.error_code() == grpc::StatusCode::PERMISSION_DENIED) {
      return absl::PermissionDeniedError(absl::StrCat(
          "peer ", peer.address(), " refused the admin token: ", reach.error_message()));
    }
    if (absl::Status frozen = deps_.moves->Freeze(tenant, id, options_.freeze_wait);
        !frozen.ok()) {
      return frozen;
    }
    move_id = RandomMoveId();
  }
  // Frozen: nothing changes the session from here on.
  natgrad::v1::ImportMovedRequest request;
  *request.mutable_snapshot() = session->Snapshot();
  request.set_source_replica(deps_.replica_name);
  request.set_move_id(move_id);
  grpc::Status last;
  bool doubt = retrying_unsettled;
  bool acknowledged = false;
  absl::Duration backoff = absl::Milliseconds(100);
  for (int attempt = 0; attempt < kImportAttempts; ++attempt) {
    grpc::ClientContext ctx;
    ctx.AddMetadata("authorization", "Bearer " + options_.token);
    ctx.set_deadline(absl::ToChronoTime(absl::Now() + options_.import_deadline));
    natgrad::v1::Session imported;
    last = stub->ImportMoved(&ctx, request, &imported);
    if (last.ok()) {
      acknowledged = true;
      break;
    }
    if (!Ambiguous(last.error_code())) break;
    doubt = true;
    absl::SleepFor(backoff);
    backoff *= 2;
  }
  if (!acknowledged) {
    // Refused without doubt: the peer does not hold it, so it is served
    // here again. After a lost reply any answer (ALREADY_EXISTS, a limit)
    // may be about our own first import, so the session stays frozen.
    if (!doubt) {
      deps_.moves->Unfreeze(tenant, id);
      absl::MutexLock lock(&mu_);
      unsettled_.erase(key);
      return absl::Status(static_cast<absl::StatusCode>(last.error_code()),
                          absl::StrCat("peer refused the import: ", last.error_message()));
    }
    *left_frozen = true;
    absl::MutexLock lock(&mu_);
    unsettled_[key] = {peer, move_id};
    return absl::Status(static_cast<absl::StatusCode>(last.error_code()),
                        absl::StrCat("the peer's answer to the import was lost (",
                                     last.error_message(), ")"));
  }
  {
    absl::MutexLock lock(&mu_);
    unsettled_.erase(key);
  }
  // The peer holds it durably: redirect from now on, then forget it here.
  natgrad::v1::SessionMoved moved;
  moved.set_session(session->name());
  moved.set_replica(peer.replica());
  moved.set_address(peer.address());
  if (absl::Status t = deps_.moves->Record(tenant, id, moved); !t.ok()) {
    NATGRAD_LOG(kError, "drain: tombstone of ", session->name(), " not written (", t.message(),
                "); the redirect holds until this replica restarts");
  }
  deps_.registry->Delete(session->name(), tenant).IgnoreError();  // marks it deleted
  if (deps_.checkpoints != nullptr) {
    if (absl::Status r = deps_.checkpoints->Remove(*session); !r.ok()) {
      // Loading skips a checkpoint that has a tombstone, so this is not a
      // second live copy after a restart; the files are only litter.
      NATGRAD_LOG(kError, "drain: checkpoint of moved ", session->name(),
                  " not removed: ", r.message());
    }
  }
  NATGRAD_LOG(kInfo, "session ", session->name(), " moved to replica ", peer.replica(), " (",
              peer.address(), ") at step ", request.snapshot().last_step());
  return absl::OkStatus();
}

grpc::ServerUnaryReactor* AdminService::ImportMoved(
    grpc::CallbackServerContext* context, const natgrad::v1::ImportMovedRequest* request,
    natgrad::v1::Session* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  absl::Status status = [&]() -> absl::Status {
    if (absl::Status a = Authorize(*context); !a.ok()) return a;
    const auto& snap = request->snapshot();
    if (snap.name().empty()) {
      // The drain's reachability probe (and a malformed call).
      return absl::InvalidArgumentError("snapshot.name: required");
    }
    if (deps_.moves->draining()) {
      return absl::FailedPreconditionError(
          absl::StrCat("replica \"", deps_.replica_name, "\" is draining"));
    }
    auto id = session::SessionRegistry::ParseName(snap.name());
    if (!id.ok()) return id.status();
    const std::string& tenant = snap.tenant();
    {
      absl::MutexLock lock(&mu_);
      auto it = imported_.find(request->move_id());
      if (!request->move_id().empty() && it != imported_.end() &&
          it->second == std::make_pair(tenant, *id)) {
        auto held = deps_.registry->Get(snap.name(), tenant);
        if (held.ok()) {
          *response = DescribeSession(deps_, **held);
          return absl::OkStatus();
        }
      }
    }
    auto session = deps_.registry->Import(snap, tenant, "");
    if (!session.ok()) return session.status();
    absl::Status durable = MakeDurableOrDrop(deps_, **session, tenant);
    if (deps_.metrics) deps_.metrics->SetSessions(deps_.registry->size());
    if (!durable.ok()) return durable;
    // It lives here again if it once moved away from here.
    deps_.moves->Forget(tenant, *id);
    {
      absl::MutexLock lock(&mu_);
      if (imported_.size() >= kMaxRememberedImports) imported_.erase(imported_.begin());
      if (!request->move_id().empty()) imported_[request->move_id()] = {tenant, *id};
    }
    *response = DescribeSession(deps_, **session);
    NATGRAD_LOG(kInfo, "session ", (*session)->name(), " moved here from replica ",
                request->source_replica(), ": tenant=", tenant.empty() ? "-" : tenant,
                " last_step=", (*session)->last_step());
    return absl::OkStatus();
  }();
  reactor->Finish(ToGrpcStatus(status));
  return reactor;
}

}  // namespace natgrad::service
