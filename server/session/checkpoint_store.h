// Session snapshots on a local directory (DESIGN.md §6): one file per session,
// written atomically (temp file, fsync, rename, fsync of the directory), so a
// crash leaves either the old or the new checkpoint, never a torn one.
#ifndef NATGRAD_SERVER_SESSION_CHECKPOINT_STORE_H_
#define NATGRAD_SERVER_SESSION_CHECKPOINT_STORE_H_

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "natgrad/v1/session.pb.h"

namespace natgrad::session {

struct LoadedCheckpoints {
  std::vector<natgrad::v1::SessionSnapshot> snapshots;
  // "path: reason" for each file that could not be read; never fatal.
  std::vector<std::string> skipped;
};

class CheckpointStore {
 public:
  // Creates `directory` if needed.
  static absl::StatusOr<CheckpointStore> Open(std::string directory);

  absl::Status Write(const natgrad::v1::SessionSnapshot& snapshot) const;
  absl::Status Remove(absl::string_view session_id) const;
  LoadedCheckpoints LoadAll() const;

  const std::string& directory() const { return directory_; }
  std::string PathFor(absl::string_view session_id) const;

 private:
  explicit CheckpointStore(std::string directory) : directory_(std::move(directory)) {}
  std::string directory_;
};

}  // namespace natgrad::session

#endif  // NATGRAD_SERVER_SESSION_CHECKPOINT_STORE_H_
