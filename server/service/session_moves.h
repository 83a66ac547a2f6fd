// Where sessions went when this replica was drained (docs/replicas.md), and
// the gate that keeps a session from changing while it is being moved.
//
// Tombstones: (tenant, id) -> SessionMoved. Every call for a moved session
// is answered with FAILED_PRECONDITION carrying the SessionMoved (MovedError;
// ToGrpcStatus puts it in grpc-status-details-bin). With a checkpoint
// directory each tombstone is a file in <dir>/moved/, written durably before
// it takes effect, so it survives a restart; without one it is memory only.
// A tombstone expires --idle_session_ttl after the move (never when the TTL
// is zero).
//
// Gate: every step and delete of a session runs between Enter and Exit.
// Freeze waits for those in progress to leave and holds new ones in Enter
// (for at most freeze_wait, then UNAVAILABLE) until Unfreeze, or until
// Record, after which they get the redirect. So once Freeze returns OK the
// session cannot change, and a snapshot taken then is its final state here.
#ifndef NATGRAD_SERVER_SERVICE_SESSION_MOVES_H_
#define NATGRAD_SERVER_SERVICE_SESSION_MOVES_H_

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "natgrad/v1/admin_service.pb.h"
#include "prometheus/counter.h"
#include "prometheus/registry.h"

namespace natgrad::service {

inline constexpr char kSessionMovedTypeUrl[] = "type.googleapis.com/natgrad.v1.SessionMoved";

// FAILED_PRECONDITION `session "sessions/ID" moved to replica "NAME"` with
// the serialized SessionMoved as the kSessionMovedTypeUrl payload.
absl::Status MovedError(const natgrad::v1::SessionMoved& moved);

struct SessionMovesOptions {
  std::string checkpoint_dir;  // empty: tombstones in memory only
  absl::Duration ttl = absl::ZeroDuration();
  // How long a step or delete waits in Enter while the session is frozen.
  absl::Duration freeze_wait = absl::Seconds(5);
};

class SessionMoves {
 public:
  // Reads the tombstones of `checkpoint_dir` (dropping expired ones).
  // `metrics` may be null.
  static absl::StatusOr<std::unique_ptr<SessionMoves>> Open(SessionMovesOptions options,
                                                            prometheus::Registry* metrics);

  // OK, or the redirect (counted in natgrad_redirects_total) when the
  // session was moved away.
  absl::Status CheckNotMoved(absl::string_view tenant, absl::string_view id);
  bool IsMoved(absl::string_view tenant, absl::string_view id) const;

  // Records the move (the file first, when there is a directory), ends the
  // freeze, and wakes waiting steps, which get the redirect. The move is in
  // force in memory even when the file cannot be written (the error is
  // returned): the peer holds the session now.
  absl::Status Record(absl::string_view tenant, absl::string_view id,
                      const natgrad::v1::SessionMoved& moved);
  // The session lives here again (moved back): drops its tombstone.
  void Forget(absl::string_view tenant, absl::string_view id);
  // Drops tombstones older than the TTL; returns how many.
  int ExpireOld(absl::Time now);
  int64_t size() const;

  absl::Status Enter(absl::string_view tenant, absl::string_view id);
  void Exit(absl::string_view tenant, absl::string_view id);
  // FAILED_PRECONDITION when already frozen or moved; UNAVAILABLE (and not
  // frozen) when a step in progress does not leave within `wait`.
  absl::Status Freeze(absl::string_view tenant, absl::string_view id, absl::Duration wait);
  void Unfreeze(absl::string_view tenant, absl::string_view id);

  // From the first Drain on: CreateSession (and ImportSession) here are
  // redirected to PeerFor(id).
  void SetDraining(std::vector<natgrad::v1::Peer> peers);
  bool draining() const;
  // The peer a session id goes to: FNV-1a of the id modulo the peer count.
  std::optional<natgrad::v1::Peer> PeerFor(absl::string_view id) const;
  // While draining: the redirect of a new session `id` (may be empty) to
  // PeerFor(id), counted in natgrad_redirects_total; OK when not draining.
  absl::Status RedirectNew(absl::string_view id);

 private:
  using Key = std::pair<std::string, std::string>;  // (tenant, id)
  struct Tombstone {
    natgrad::v1::SessionMoved moved;
    absl::Time when;
  };
  struct Gate {
    int active = 0;
    bool frozen = false;
  };

  explicit SessionMoves(SessionMovesOptions options) : options_(std::move(options)) {}
  std::string PathFor(const Key& key) const;
  absl::Status WriteFile(const Key& key, const Tombstone& t) const;
  void RemoveFile(const Key& key) const;
  void LoadFiles();
  absl::Status RedirectLocked(const Key& key) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const SessionMovesOptions options_;
  std::string directory_;  // <checkpoint_dir>/moved, or empty
  prometheus::Counter* redirects_ = nullptr;

  mutable absl::Mutex mu_;
  absl::CondVar changed_;
  std::map<Key, Tombstone> tombstones_ ABSL_GUARDED_BY(mu_);
  std::map<Key, Gate> gates_ ABSL_GUARDED_BY(mu_);
  std::vector<natgrad::v1::Peer> drain_peers_ ABSL_GUARDED_BY(mu_);
  bool draining_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace natgrad::service

#endif  // NATGRAD_SERVER_SERVICE_SESSION_MOVES_H_
