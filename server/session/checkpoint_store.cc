#include "server/session/checkpoint_store.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace natgrad::session {
namespace {

constexpr absl::string_view kSuffix = ".ckpt";

absl::Status ErrnoError(absl::string_view what, const std::string& path) {
  return absl::InternalError(
      absl::StrCat(what, " ", path, ": ", std::strerror(errno)));
}

absl::Status WriteAll(int fd, const std::string& bytes, const std::string& path) {
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoError("write", path);
    }
    done += n;
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<CheckpointStore> CheckpointStore::Open(std::string directory) {
  std::error_code ec;
  std::filesystem::create_directories(directory, ec);
  if (ec) {
    return absl::FailedPreconditionError(absl::StrCat(
        "checkpoint directory ", directory, ": ", ec.message()));
  }
  return CheckpointStore(std::move(directory));
}

std::string CheckpointStore::PathFor(absl::string_view session_id) const {
  return absl::StrCat(directory_, "/", session_id, kSuffix);
}

absl::Status CheckpointStore::Write(
    const natgrad::v1::SessionSnapshot& snapshot) const {
  std::string id(snapshot.name());
  if (absl::StartsWith(id, "sessions/")) id = id.substr(9);
  const std::string path = PathFor(id);
  const std::string tmp = path + ".tmp";
  std::string bytes;
  if (!snapshot.SerializeToString(&bytes)) {
    return absl::InternalError("checkpoint: cannot serialize " + id);
  }
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) return ErrnoError("open", tmp);
  absl::Status st = WriteAll(fd, bytes, tmp);
  if (st.ok() && ::fsync(fd) != 0) st = ErrnoError("fsync", tmp);
  ::close(fd);
  if (!st.ok()) {
    ::unlink(tmp.c_str());
    return st;
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) return ErrnoError("rename", tmp);
  // The rename itself must survive a power cut: sync the directory entry.
  const int dfd = ::open(directory_.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
  return absl::OkStatus();
}

absl::Status CheckpointStore::Remove(absl::string_view session_id) const {
  const std::string path = PathFor(session_id);
  if (::unlink(path.c_str()) != 0 && errno != ENOENT) return ErrnoError("unlink", path);
  return absl::OkStatus();
}

LoadedCheckpoints CheckpointStore::LoadAll() const {
  LoadedCheckpoints out;
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(directory_, ec)) {
    const std::string path = entry.path().string();
    if (!absl::EndsWith(path, kSuffix)) continue;  // skips *.tmp leftovers
    std::ifstream in(path, std::ios::binary);
    std::stringstream buffer;
    buffer << in.rdbuf();
    natgrad::v1::SessionSnapshot snap;
    if (!in.good() && !in.eof()) {
      out.skipped.push_back(absl::StrCat(path, ": unreadable"));
      continue;
    }
    if (!snap.ParseFromString(buffer.str())) {
      out.skipped.push_back(absl::StrCat(path, ": not a SessionSnapshot (corrupt or truncated)"));
      continue;
    }
    if (snap.name().empty() || snap.format_version() == 0) {
      out.skipped.push_back(absl::StrCat(path, ": incomplete snapshot"));
      continue;
    }
    out.snapshots.push_back(std::move(snap));
  }
  if (ec) out.skipped.push_back(absl::StrCat(directory_, ": ", ec.message()));
  return out;
}

}  // namespace natgrad::session
