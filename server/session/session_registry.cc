#include "server/session/session_registry.h"

#include <random>

#include "absl/random/random.h"
#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "server/blocks/registry.h"

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

}  // namespace

SessionRegistry::SessionRegistry(RegistryLimits limits,
                                 engine::InversionEngine* engine,
                                 linalg::ComputePool* compute_pool)
    : limits_(limits), engine_(engine), compute_pool_(compute_pool) {}

absl::StatusOr<std::string> SessionRegistry::ParseName(absl::string_view name) {
  absl::string_view id = name;
  if (absl::StartsWith(id, "sessions/")) id.remove_prefix(9);
  if (!ValidId(id)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "name: \"", name, "\" is not a session name (sessions/{id})"));
  }
  return std::string(id);
}

absl::Status SessionRegistry::CheckLimitsLocked(absl::string_view tenant,
                                                int64_t bytes) const {
  if (static_cast<int64_t>(sessions_.size()) >= limits_.max_sessions) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "the server holds its maximum of ", limits_.max_sessions, " sessions"));
  }
  if (bytes > limits_.max_session_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "config: the session would hold ", bytes,
        " bytes of optimizer state, the limit is ", limits_.max_session_bytes));
  }
  if (limits_.max_sessions_per_tenant > 0 || limits_.max_bytes_per_tenant > 0) {
    int64_t count = 0, total = bytes;
    for (const auto& [id, s] : sessions_) {
      if (s->tenant() != tenant) continue;
      ++count;
      total += blocks::EstimateStateBytes(s->config());
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
    absl::string_view requested) const {
  if (requested.empty()) {
    std::string id;
    do {
      id = RandomId();
    } while (sessions_.contains(id));
    return id;
  }
  if (!ValidId(requested)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "session_id: \"", requested, "\" must match [a-z0-9-]{4,63}"));
  }
  if (sessions_.contains(std::string(requested))) {
    return absl::AlreadyExistsError(
        absl::StrCat("session_id: sessions/", requested, " already exists"));
  }
  return std::string(requested);
}

absl::StatusOr<std::shared_ptr<Session>> SessionRegistry::Create(
    const natgrad::v1::SessionConfig& config, absl::string_view tenant,
    absl::string_view requested_id) {
  if (absl::Status s = blocks::ValidateSessionConfig(config); !s.ok()) return s;
  absl::MutexLock lock(&mu_);
  if (absl::Status s = CheckLimitsLocked(tenant, blocks::EstimateStateBytes(config)); !s.ok()) {
    return s;
  }
  auto id = PickIdLocked(requested_id);
  if (!id.ok()) return id.status();
  auto session =
      Session::Create(*id, std::string(tenant), config, engine_, compute_pool_);
  if (!session.ok()) return session.status();
  std::shared_ptr<Session> shared = *std::move(session);
  sessions_[*id] = shared;
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
  if (absl::Status s = CheckLimitsLocked(tenant, blocks::EstimateStateBytes(snapshot.config()));
      !s.ok()) {
    return s;
  }
  auto id = PickIdLocked(wanted);
  if (!id.ok()) return id.status();
  auto session = Session::Restore(owned, *id, engine_, compute_pool_);
  if (!session.ok()) return session.status();
  std::shared_ptr<Session> shared = *std::move(session);
  sessions_[*id] = shared;
  return shared;
}

absl::StatusOr<std::shared_ptr<Session>> SessionRegistry::Get(
    absl::string_view name, absl::string_view tenant) const {
  auto id = ParseName(name);
  if (!id.ok()) return id.status();
  absl::MutexLock lock(&mu_);
  auto it = sessions_.find(*id);
  if (it == sessions_.end() || it->second->tenant() != tenant) {
    return absl::NotFoundError(absl::StrCat("session sessions/", *id, " not found"));
  }
  return it->second;
}

absl::Status SessionRegistry::Delete(absl::string_view name,
                                     absl::string_view tenant) {
  auto session = Get(name, tenant);
  if (!session.ok()) return session.status();
  absl::MutexLock lock(&mu_);
  sessions_.erase((*session)->id());
  (*session)->MarkDeleted();
  return absl::OkStatus();
}

std::vector<std::shared_ptr<Session>> SessionRegistry::List(
    absl::string_view tenant, absl::string_view after_id, int limit) const {
  absl::MutexLock lock(&mu_);
  std::vector<std::shared_ptr<Session>> out;
  for (auto it = sessions_.upper_bound(std::string(after_id));
       it != sessions_.end() && static_cast<int>(out.size()) < limit; ++it) {
    if (it->second->tenant() == tenant) out.push_back(it->second);
  }
  return out;
}

std::vector<std::shared_ptr<Session>> SessionRegistry::All() const {
  absl::MutexLock lock(&mu_);
  std::vector<std::shared_ptr<Session>> out;
  for (const auto& [id, s] : sessions_) out.push_back(s);
  return out;
}

int64_t SessionRegistry::size() const {
  absl::MutexLock lock(&mu_);
  return sessions_.size();
}

}  // namespace natgrad::session
