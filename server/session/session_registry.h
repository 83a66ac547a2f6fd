// All sessions of a server, keyed by (tenant, id): ids are per tenant, so two
// tenants may each hold "sessions/x" and nothing a tenant does can tell
// whether an id exists under another (no ALREADY_EXISTS, no NOT_FOUND
// difference). Random ids are 128 bits so that a session cannot be guessed.
#ifndef NATGRAD_SERVER_SESSION_SESSION_REGISTRY_H_
#define NATGRAD_SERVER_SESSION_SESSION_REGISTRY_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "natgrad/v1/session.pb.h"
#include "server/engine/inversion_engine.h"
#include "server/linalg/compute_pool.h"
#include "server/session/session.h"

namespace natgrad::session {

struct RegistryLimits {
  int64_t max_sessions = 1024;
  int64_t max_session_bytes = int64_t{1} << 30;
  // Per tenant; 0 means only the global limits apply.
  int64_t max_sessions_per_tenant = 0;
  int64_t max_bytes_per_tenant = 0;
  // Server-wide bound on the session state held (each session's estimate
  // plus a fixed overhead per session and per block) together with the
  // bytes of steps received but not yet applied; 0: no bound.
  int64_t memory_budget_bytes = 0;
};

// What a session is charged against the memory budget: its state estimate,
// its cached last reply, and the bookkeeping a session and each block carry
// (saturating).
int64_t AccountedBytes(const natgrad::v1::SessionConfig& config);

class SessionRegistry {
 public:
  // Sessions get `engine` and `compute_pool` (may be null: steps run their
  // math on the calling thread) for their whole life.
  SessionRegistry(RegistryLimits limits, engine::InversionEngine* engine,
                  linalg::ComputePool* compute_pool = nullptr);

  // requested_id may be empty (a random id is made). RESOURCE_EXHAUSTED when
  // a limit would be exceeded, ALREADY_EXISTS for a taken id.
  absl::StatusOr<std::shared_ptr<Session>> Create(
      const natgrad::v1::SessionConfig& config, absl::string_view tenant,
      absl::string_view requested_id);
  absl::StatusOr<std::shared_ptr<Session>> Import(
      const natgrad::v1::SessionSnapshot& snapshot, absl::string_view tenant,
      absl::string_view requested_id);

  // `name` is "sessions/{id}" (a bare id is accepted too).
  absl::StatusOr<std::shared_ptr<Session>> Get(absl::string_view name,
                                               absl::string_view tenant) const;
  absl::Status Delete(absl::string_view name, absl::string_view tenant);
  // Sorted by id, ids greater than `after_id`, at most `limit`.
  std::vector<std::shared_ptr<Session>> List(absl::string_view tenant,
                                             absl::string_view after_id,
                                             int limit) const;
  std::vector<std::shared_ptr<Session>> All() const;
  int64_t size() const;

  // Removes (and marks deleted) every session with no step and no Get for
  // longer than `ttl`, and returns them. A step is noticed at the next call,
  // so the idle time is measured to within the interval between calls.
  std::vector<std::shared_ptr<Session>> ExpireIdle(absl::Duration ttl, absl::Time now);

  // In-flight step data against the memory budget: RESOURCE_EXHAUSTED
  // (nothing reserved) when `bytes` more would exceed it. Every reservation
  // is released once the step is applied or dropped.
  absl::Status ReserveInFlight(int64_t bytes);
  void ReleaseInFlight(int64_t bytes);
  // Bytes charged against the budget now: state (accounted) plus in flight.
  int64_t ChargedBytes() const;

  static absl::StatusOr<std::string> ParseName(absl::string_view name);
  const RegistryLimits& limits() const { return limits_; }

 private:
  absl::Status CheckLimitsLocked(absl::string_view tenant, int64_t bytes,
                                 const natgrad::v1::SessionConfig* config) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<std::string> PickIdLocked(absl::string_view tenant,
                                           absl::string_view requested) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void InsertLocked(std::shared_ptr<Session> session) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  struct Entry {
    std::shared_ptr<Session> session;
    // For ExpireIdle: when a Get or a new step was last seen.
    absl::Time last_active;
    int64_t seen_step = 0;
    int64_t accounted_bytes = 0;  // AccountedBytes(config), kept for erase
  };
  using Key = std::pair<std::string, std::string>;  // (tenant, id)

  const RegistryLimits limits_;
  engine::InversionEngine* const engine_;
  linalg::ComputePool* const compute_pool_;
  mutable absl::Mutex mu_;
  // Mutable: Get records activity.
  mutable std::map<Key, Entry> sessions_ ABSL_GUARDED_BY(mu_);
  int64_t state_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t in_flight_bytes_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace natgrad::session

#endif  // NATGRAD_SERVER_SESSION_SESSION_REGISTRY_H_
