// Session snapshots on a local directory: one file per (tenant, session),
// each framed with a header and a SHA-256 digest so that a flipped byte or a
// truncation anywhere (including on a protobuf field boundary) is detected.
//
// Durability: a write goes to a temporary file that is fsynced, then the
// current file becomes the previous copy and the temporary file the current
// one, and the directory is fsynced. So at every instant an intact copy is on
// disk, and loading falls back to the previous copy when the current one is
// damaged or missing.
//
// File layout (all integers little-endian):
//   8 bytes  magic "\x89NGCKPT\n"
//   4 bytes  frame version (1)
//   8 bytes  payload length
//   N bytes  natgrad.v1.SessionSnapshot
//  32 bytes  SHA-256 over everything before it
// File names: "<id>.<tenant key>.ngckpt" (current) and "... .ngckpt.prev"
// (previous), where the tenant key is the first 16 bytes of SHA-256(tenant) in
// hex, so two tenants may hold the same session id.
//
// Files written before checksums ("<id>.ckpt", a bare SessionSnapshot) are
// still read: they cannot be verified, so each is logged as unverified and
// rewritten in the checksummed format at once, after which the old file is
// removed.
#ifndef NATGRAD_SERVER_SESSION_CHECKPOINT_STORE_H_
#define NATGRAD_SERVER_SESSION_CHECKPOINT_STORE_H_

#include <array>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/functional/function_ref.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "natgrad/v1/session.pb.h"

namespace natgrad::session {

struct LoadedCheckpoints {
  std::vector<natgrad::v1::SessionSnapshot> snapshots;
  // "path: reason" for each file that could not be used; never fatal.
  std::vector<std::string> skipped;
  // "path" of each previous copy loaded because the current file was bad.
  std::vector<std::string> from_previous;
  // "path" of each pre-checksum file that was loaded (and migrated).
  std::vector<std::string> legacy;
};

// The framed file bytes of `snapshot`.
std::string EncodeCheckpoint(const natgrad::v1::SessionSnapshot& snapshot);
// Verifies framing and digest, then parses and checks the snapshot's
// required fields. DATA_LOSS for damage, INVALID_ARGUMENT for a file that is
// not a checkpoint, UNIMPLEMENTED for an unknown frame version.
absl::StatusOr<natgrad::v1::SessionSnapshot> DecodeCheckpoint(absl::string_view bytes);

class CheckpointStore {
 public:
  // Creates `directory` if needed.
  static absl::StatusOr<CheckpointStore> Open(std::string directory);

  // Durable when it returns OK. A snapshot older (lower last_step) than the
  // one this store last wrote for the same session is not written: the newer
  // state is already durable.
  absl::Status Write(const natgrad::v1::SessionSnapshot& snapshot) const;
  // The same, but `deleted` is asked under the session's file lock, and
  // when it holds nothing is written (NOT_FOUND). Remove takes that lock
  // too, so once a session is marked deleted and Remove has returned, no
  // write of it can follow: a deleted session never comes back at restart,
  // whatever step or periodic write was in flight when it was deleted.
  absl::Status Write(const natgrad::v1::SessionSnapshot& snapshot,
                     absl::FunctionRef<bool()> deleted) const;
  // Removes the current, previous and temporary files of the session. Call
  // it after marking the session deleted (see Write).
  absl::Status Remove(absl::string_view tenant, absl::string_view session_id) const;
  // Reads every session; for each, the current file or else its previous
  // copy. Migrates pre-checksum files.
  LoadedCheckpoints LoadAll() const;

  const std::string& directory() const { return directory_; }
  std::string PathFor(absl::string_view tenant, absl::string_view session_id) const;
  std::string PreviousPathFor(absl::string_view tenant, absl::string_view session_id) const;
  // The pre-checksum file name of a session ("<id>.ckpt").
  std::string LegacyPathFor(absl::string_view session_id) const;

 private:
  struct Shared {
    // Writes of one file are serialised (the periodic writer and the step
    // path may checkpoint the same session at once); a hash picks the lock.
    std::array<absl::Mutex, 32> file_mu;
    absl::Mutex steps_mu;
    std::map<std::string, int64_t> written_step ABSL_GUARDED_BY(steps_mu);
  };
  explicit CheckpointStore(std::string directory)
      : directory_(std::move(directory)), shared_(std::make_shared<Shared>()) {}
  absl::Status SyncDirectory() const;

  std::string directory_;
  std::shared_ptr<Shared> shared_;
};

}  // namespace natgrad::session

#endif  // NATGRAD_SERVER_SESSION_CHECKPOINT_STORE_H_
