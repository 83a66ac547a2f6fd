#include "server/session/session_registry.h"

#include <limits>
#include <random>

#include "absl/random/random.h"
#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "server/blocks/registry.h"
#include "server/core/block_error.h"

namespace natgrad::session {
namespace {

bool ValidId(absl::string_view id) {
  if (id.size() < 4 || id.size() > 63) return false;
  for (char c : id) {
    if (!(absl::ascii_islower(c) || absl::ascii_isdigit(c) || c == '-')) return false;
  }
  return true;
}

std::string RandomId() {
  // Seeded from the OS; 128 bits, so ids cannot be enumerated.
  static absl::Mutex mu(absl::kConstInit);
  static absl::BitGen* gen = new absl::BitGen(std::seed_seq{
      std::random_device{}(), std::random_device{}(), std::random_device{}(),
      std::random_device{}()});
  absl::MutexLock lock(&mu);
  return absl::StrFormat("%016x%016x", absl::Uniform<uint64_t>(*gen),
                         absl::Uniform<uint64_t>(*gen));
}

// Session and block bookkeeping (maps, names, config copies, the cached
// reply) that no state estimate covers; deliberately generous.
constexpr int64_t kSessionOverheadBytes = 64 << 10;
constexpr int64_t kBlockOverheadBytes = 4 << 10;

int64_t SatAdd(int64_t a, int64_t b) {
  if (a > std::numeric_limits<int64_t>::max() - b) return std::numeric_limits<int64_t>::max();
  return a + b;
}

}  // namespace

int64_t SatMul(int64_t a, int64_t b) {
  if (a <= 0 || b <= 0) return 0;
  if (a > std::numeric_limits<int64_t>::max() / b) return std::numeric_limits<int64_t>::max();
  return a * b;
}

int64_t AccountedBytes(const natgrad::v1::SessionConfig& config) {
  // The session keeps its last reply (for replay): about one float64 delta
  // per block. (A Gaussian reply also carries its dim x dim parameters; the
  // kind's state estimate, which counts that working set, covers it.)
  int64_t reply = 0;
  for (const auto& b : config.blocks()) {
    int64_t elements = 1;
    for (int64_t d : blocks::CanonicalShape(b)) elements = SatMul(elements, d);
    reply = SatAdd(reply, SatMul(elements, 8));
  }
  return SatAdd(SatAdd(SatAdd(blocks::EstimateStateBytes(config), reply), kSessionOverheadBytes),
                SatMul(kBlockOverheadBytes, config.blocks_size()));
}

absl::Status SessionRegistry::ReserveInFlight(int64_t bytes) {
  absl::MutexLock lock(&mu_);
  if (limits_.memory_budget_bytes > 0 &&
      SatAdd(SatAdd(state_bytes_, in_flight_bytes_), bytes) > limits_.memory_budget_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "server memory budget: ", bytes, " more bytes of step data would exceed ",
        limits_.memory_budget_bytes, " bytes (", state_bytes_, " of session state and ",
        in_flight_bytes_, " of steps in flight are held); retry later"));
  }
  in_flight_bytes_ += bytes;
  return absl::OkStatus();
}

void SessionRegistry::ReleaseInFlight(int64_t bytes) {
  absl::MutexLock lock(&mu_);
  in_flight_bytes_ -= bytes;
}

int64_t SessionRegistry::ChargedBytes() const {
  absl::MutexLock lock(&mu_);
  return SatAdd(state_bytes_, in_flight_bytes_);
}

SessionRegistry::SessionRegistry(RegistryLimits limits,
                                 engine::InversionEngine* engine,
                                 linalg::ComputePool* compute_pool)
    : limits_(limits), engine_(engine), compute_pool_(compute_pool) {}

absl::StatusOr<std::string> SessionRegistry::ParseName(absl::string_view name) {
  absl::string_view id = name;
  if (absl::StartsWith(id, "sessions/")) id.remove_prefix(9);
  if (!ValidId(id)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "name: ", core::QuotedClientString(name), " is not a session name (sessions/{id})"));
  }
  return std::string(id);
}

absl::Status SessionRegistry::CheckLimitsLocked(
    absl::string_view tenant, int64_t bytes, const natgrad::v1::SessionConfig* config) const {
  if (static_cast<int64_t>(sessions_.size()) >= limits_.max_sessions) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "the server holds its maximum of ", limits_.max_sessions, " sessions"));
  }
  if (bytes > limits_.max_session_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "config: the session would hold ", bytes,
        " bytes of optimizer state, the limit is ", limits_.max_session_bytes));
  }
  if (limits_.memory_budget_bytes > 0 && config != nullptr) {
    const int64_t charged = SatAdd(state_bytes_, in_flight_bytes_);
    const int64_t adds = AccountedBytes(*config);
    if (SatAdd(charged, adds) > limits_.memory_budget_bytes) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "server memory budget: the session would add ", adds,
          " bytes (state, its cached reply and bookkeeping) to the ", charged,
          " held, the budget is ", limits_.memory_budget_bytes));
    }
  }
  if (limits_.max_sessions_per_tenant > 0 || limits_.max_bytes_per_tenant > 0) {
    int64_t count = 0, total = bytes;
    const std::string t(tenant);
    for (auto it = sessions_.lower_bound(Key(t, "")); it != sessions_.end() &&
                                                      it->first.first == t;
         ++it) {
      ++count;
      total += blocks::EstimateStateBytes(it->second.session->config());
    }
    if (limits_.max_sessions_per_tenant > 0 &&
        count >= limits_.max_sessions_per_tenant) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "tenant holds its maximum of ", limits_.max_sessions_per_tenant, " sessions"));
    }
    if (limits_.max_bytes_per_tenant > 0 && total > limits_.max_bytes_per_tenant) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "tenant would hold ", total, " bytes of state, the limit is ",
          limits_.max_bytes_per_tenant));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> SessionRegistry::PickIdLocked(
    absl::string_view tenant, absl::string_view requested) const {
  if (requested.empty()) {
    std::string id;
    do {
      id = RandomId();
    } while (sessions_.contains(Key(tenant, id)));
    return id;
  }
  if (!ValidId(requested)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "session_id: ", core::QuotedClientString(requested), " must match [a-z0-9-]{4,63}"));
  }
  // Only this tenant's ids: another tenant's "sessions/x" is not revealed.
  if (sessions_.contains(Key(tenant, requested))) {
    return absl::AlreadyExistsError(
        absl::StrCat("session_id: sessions/", requested, " already exists"));
  }
  return std::string(requested);
}

absl::StatusOr<std::shared_ptr<Session>> SessionRegistry::Create(
    const natgrad::v1::SessionConfig& config, absl::string_view tenant,
    absl::string_view requested_id) {
  // Limits first: a config over the limit is refused before any work
  // (fuzz_session_config once found a K-FAC block with d_out = 29694
  // allocating 3.5 GB inside validation; validation no longer allocates).
  const int64_t bytes = blocks::EstimateStateBytes(config);
  {
    absl::MutexLock lock(&mu_);
    if (absl::Status s = CheckLimitsLocked(tenant, bytes, &config); !s.ok()) return s;
  }
  if (absl::Status s = blocks::ValidateSessionConfig(config); !s.ok()) return s;
  absl::MutexLock lock(&mu_);
  if (absl::Status s = CheckLimitsLocked(tenant, bytes, &config); !s.ok()) return s;
  auto id = PickIdLocked(tenant, requested_id);
  if (!id.ok()) return id.status();
  auto session =
      Session::Create(*id, std::string(tenant), config, engine_, compute_pool_);
  if (!session.ok()) return session.status();
  std::shared_ptr<Session> shared = *std::move(session);
  InsertLocked(shared);
  return shared;
}

absl::StatusOr<std::shared_ptr<Session>> SessionRegistry::Import(
    const natgrad::v1::SessionSnapshot& snapshot, absl::string_view tenant,
    absl::string_view requested_id) {
  std::string wanted(requested_id);
  if (wanted.empty()) {
    auto parsed = ParseName(snapshot.name());
    if (!parsed.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("snapshot.", parsed.status().message()));
    }
    wanted = *parsed;
  }
  natgrad::v1::SessionSnapshot owned = snapshot;
  owned.set_tenant(std::string(tenant));
  absl::MutexLock lock(&mu_);
  if (absl::Status s = CheckLimitsLocked(tenant, blocks::EstimateStateBytes(snapshot.config()),
                                          &snapshot.config());
      !s.ok()) {
    return s;
  }
  auto id = PickIdLocked(tenant, wanted);
  if (!id.ok()) return id.status();
  auto session = Session::Restore(owned, *id, engine_, compute_pool_);
  if (!session.ok()) return session.status();
  std::shared_ptr<Session> shared = *std::move(session);
  InsertLocked(shared);
  return shared;
}

void SessionRegistry::InsertLocked(std::shared_ptr<Session> session) {
  Entry& e = sessions_[Key(session->tenant(), session->id())];
  e.last_active = absl::Now();
  e.seen_step = session->last_step();
  e.accounted_bytes = AccountedBytes(session->config());
  state_bytes_ = SatAdd(state_bytes_, e.accounted_bytes);
  e.session = std::move(session);
}

absl::StatusOr<std::shared_ptr<Session>> SessionRegistry::Get(
    absl::string_view name, absl::string_view tenant) const {
  auto id = ParseName(name);
  if (!id.ok()) return id.status();
  absl::MutexLock lock(&mu_);
  auto it = sessions_.find(Key(tenant, *id));
  if (it == sessions_.end()) {
    return absl::NotFoundError(absl::StrCat("session sessions/", *id, " not found"));
  }
  it->second.last_active = absl::Now();
  return it->second.session;
}

absl::Status SessionRegistry::Delete(absl::string_view name,
                                     absl::string_view tenant) {
  auto id = ParseName(name);
  if (!id.ok()) return id.status();
  absl::MutexLock lock(&mu_);
  auto it = sessions_.find(Key(tenant, *id));
  if (it == sessions_.end()) {
    return absl::NotFoundError(absl::StrCat("session sessions/", *id, " not found"));
  }
  it->second.session->MarkDeleted();
  state_bytes_ -= it->second.accounted_bytes;
  sessions_.erase(it);
  return absl::OkStatus();
}

std::vector<std::shared_ptr<Session>> SessionRegistry::List(
    absl::string_view tenant, absl::string_view after_id, int limit) const {
  absl::MutexLock lock(&mu_);
  std::vector<std::shared_ptr<Session>> out;
  const std::string t(tenant);
  for (auto it = sessions_.upper_bound(Key(t, std::string(after_id)));
       it != sessions_.end() && it->first.first == t && static_cast<int>(out.size()) < limit;
       ++it) {
    out.push_back(it->second.session);
  }
  return out;
}

std::vector<std::shared_ptr<Session>> SessionRegistry::All() const {
  absl::MutexLock lock(&mu_);
  std::vector<std::shared_ptr<Session>> out;
  for (const auto& [key, e] : sessions_) out.push_back(e.session);
  return out;
}

int64_t SessionRegistry::size() const {
  absl::MutexLock lock(&mu_);
  return sessions_.size();
}

std::vector<std::shared_ptr<Session>> SessionRegistry::ExpireIdle(absl::Duration ttl,
                                                                  absl::Time now) {
  std::vector<std::shared_ptr<Session>> out;
  absl::MutexLock lock(&mu_);
  for (auto it = sessions_.begin(); it != sessions_.end();) {
    Entry& e = it->second;
    const int64_t step = e.session->last_step();
    if (step != e.seen_step) {  // stepped since the last look
      e.seen_step = step;
      e.last_active = now;
    }
    if (now - e.last_active > ttl) {
      e.session->MarkDeleted();
      out.push_back(std::move(e.session));
      state_bytes_ -= e.accounted_bytes;
      it = sessions_.erase(it);
    } else {
      ++it;
    }
  }
  return out;
}

}  // namespace natgrad::session
