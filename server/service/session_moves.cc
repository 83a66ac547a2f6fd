#include "server/service/session_moves.h"

#include <fcntl.h>
#include <openssl/evp.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "server/common/log.h"

namespace natgrad::service {
namespace {

constexpr absl::string_view kSuffix = ".moved";

std::string HexSha256(absl::string_view bytes) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  EVP_Digest(bytes.data(), bytes.size(), md, &len, EVP_sha256(), nullptr);
  return absl::BytesToHexString(
      absl::string_view(reinterpret_cast<const char*>(md), len).substr(0, 16));
}

absl::Status ErrnoError(absl::string_view what, const std::string& path) {
  return absl::UnavailableError(absl::StrCat(what, " ", path, ": ", std::strerror(errno)));
}

absl::Status SyncDir(const std::string& dir) {
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd < 0) return ErrnoError("open", dir);
  absl::Status st;
  if (::fsync(dfd) != 0) st = ErrnoError("fsync", dir);
  ::close(dfd);
  return st;
}

uint64_t Fnv1a(absl::string_view s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) {
    h ^= c;
    h *= 1099511628211ull;
  }
  return h;
}

}  // namespace

absl::Status MovedError(const natgrad::v1::SessionMoved& moved) {
  absl::Status status = absl::FailedPreconditionError(
      absl::StrCat("session \"", moved.session(), "\" moved to replica \"", moved.replica(),
                   "\""));
  status.SetPayload(kSessionMovedTypeUrl, absl::Cord(moved.SerializeAsString()));
  return status;
}

absl::StatusOr<std::unique_ptr<SessionMoves>> SessionMoves::Open(SessionMovesOptions options,
                                                                 prometheus::Registry* metrics) {
  std::unique_ptr<SessionMoves> moves(new SessionMoves(std::move(options)));
  if (metrics != nullptr) {
    moves->redirects_ = &prometheus::BuildCounter()
                             .Name("natgrad_redirects_total")
                             .Help("Calls answered with a SessionMoved redirect (a moved "
                                   "session, or CreateSession on a draining replica)")
                             .Register(*metrics)
                             .Add({});
  }
  if (!moves->options_.checkpoint_dir.empty()) {
    // Created with the first tombstone: a replica that never moved a
    // session leaves its checkpoint directory as it was.
    moves->directory_ = moves->options_.checkpoint_dir + "/moved";
    moves->LoadFiles();
  }
  return moves;
}

std::string SessionMoves::PathFor(const Key& key) const {
  return absl::StrCat(directory_, "/", key.second, ".", HexSha256(key.first), kSuffix);
}

absl::Status SessionMoves::WriteFile(const Key& key, const Tombstone& t) const {
  natgrad::v1::MovedSessionRecord record;
  record.set_tenant(key.first);
  record.set_session_id(key.second);
  *record.mutable_moved() = t.moved;
  record.set_moved_unix_seconds(absl::ToUnixSeconds(t.when));
  std::error_code ec;
  std::filesystem::create_directories(directory_, ec);
  if (ec) {
    return absl::UnavailableError(
        absl::StrCat("cannot create ", directory_, ": ", ec.message()));
  }
  const std::string path = PathFor(key);
  const std::string tmp = path + ".tmp";
  const std::string bytes = record.SerializeAsString();
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) return ErrnoError("open", tmp);
  absl::Status st;
  for (size_t done = 0; done < bytes.size() && st.ok();) {
    const ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      st = ErrnoError("write", tmp);
    } else {
      done += static_cast<size_t>(n);
    }
  }
  if (st.ok() && ::fsync(fd) != 0) st = ErrnoError("fsync", tmp);
  if (::close(fd) != 0 && st.ok()) st = ErrnoError("close", tmp);
  if (st.ok() && ::rename(tmp.c_str(), path.c_str()) != 0) st = ErrnoError("rename", tmp);
  if (!st.ok()) {
    ::unlink(tmp.c_str());
    return st;
  }
  if (absl::Status s = SyncDir(directory_); !s.ok()) return s;
  // The directory's own entry, in case it was just created.
  return SyncDir(options_.checkpoint_dir);
}

void SessionMoves::RemoveFile(const Key& key) const {
  if (directory_.empty()) return;
  const std::string path = PathFor(key);
  if (::unlink(path.c_str()) != 0 && errno != ENOENT) {
    NATGRAD_LOG(kWarning, "cannot remove tombstone ", path, ": ", std::strerror(errno));
  }
}

void SessionMoves::LoadFiles() {
  std::error_code ec;
  const absl::Time now = absl::Now();
  absl::MutexLock lock(&mu_);
  for (const auto& entry : std::filesystem::directory_iterator(directory_, ec)) {
    const std::string path = entry.path().string();
    if (!absl::EndsWith(path, kSuffix)) continue;
    std::ifstream in(path, std::ios::binary);
    std::stringstream buffer;
    buffer << in.rdbuf();
    natgrad::v1::MovedSessionRecord record;
    if (!in || !record.ParseFromString(buffer.str()) || record.session_id().empty()) {
      NATGRAD_LOG(kWarning, "skipping unreadable tombstone ", path);
      continue;
    }
    Tombstone t{record.moved(), absl::FromUnixSeconds(record.moved_unix_seconds())};
    if (options_.ttl > absl::ZeroDuration() && now - t.when > options_.ttl) {
      ::unlink(path.c_str());
      continue;
    }
    tombstones_[Key(record.tenant(), record.session_id())] = std::move(t);
  }
}

absl::Status SessionMoves::RedirectLocked(const Key& key) {
  auto it = tombstones_.find(key);
  if (it == tombstones_.end()) return absl::OkStatus();
  if (redirects_ != nullptr) redirects_->Increment();
  return MovedError(it->second.moved);
}

absl::Status SessionMoves::CheckNotMoved(absl::string_view tenant, absl::string_view id) {
  absl::MutexLock lock(&mu_);
  return RedirectLocked(Key(tenant, id));
}

bool SessionMoves::IsMoved(absl::string_view tenant, absl::string_view id) const {
  absl::MutexLock lock(&mu_);
  return tombstones_.contains(Key(tenant, id));
}

absl::Status SessionMoves::Record(absl::string_view tenant, absl::string_view id,
                                  const natgrad::v1::SessionMoved& moved) {
  const Key key(tenant, id);
  Tombstone t{moved, absl::Now()};
  absl::Status written;
  if (!directory_.empty()) written = WriteFile(key, t);
  absl::MutexLock lock(&mu_);
  tombstones_[key] = std::move(t);
  auto g = gates_.find(key);
  if (g != gates_.end() && g->second.active == 0) gates_.erase(g);
  changed_.SignalAll();
  return written;
}

void SessionMoves::Forget(absl::string_view tenant, absl::string_view id) {
  const Key key(tenant, id);
  {
    absl::MutexLock lock(&mu_);
    if (tombstones_.erase(key) == 0) return;
  }
  RemoveFile(key);
}

int SessionMoves::ExpireOld(absl::Time now) {
  if (options_.ttl <= absl::ZeroDuration()) return 0;
  std::vector<Key> gone;
  {
    absl::MutexLock lock(&mu_);
    for (auto it = tombstones_.begin(); it != tombstones_.end();) {
      if (now - it->second.when > options_.ttl) {
        gone.push_back(it->first);
        it = tombstones_.erase(it);
      } else {
        ++it;
      }
    }
  }
  for (const Key& key : gone) RemoveFile(key);
  return static_cast<int>(gone.size());
}

int64_t SessionMoves::size() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int64_t>(tombstones_.size());
}

absl::Status SessionMoves::Enter(absl::string_view tenant, absl::string_view id) {
  const Key key(tenant, id);
  const absl::Time deadline = absl::Now() + options_.freeze_wait;
  absl::MutexLock lock(&mu_);
  for (;;) {
    if (absl::Status moved = RedirectLocked(key); !moved.ok()) return moved;
    Gate& g = gates_[key];
    if (!g.frozen) {
      ++g.active;
      return absl::OkStatus();
    }
    if (changed_.WaitWithDeadline(&mu_, deadline) && absl::Now() >= deadline) {
      auto again = gates_.find(key);
      if (tombstones_.contains(key) || again == gates_.end() || !again->second.frozen) continue;
      return absl::UnavailableError(absl::StrCat(
          "session sessions/", id, " is being moved to another replica; nothing was applied, "
          "retry"));
    }
  }
}

void SessionMoves::Exit(absl::string_view tenant, absl::string_view id) {
  const Key key(tenant, id);
  absl::MutexLock lock(&mu_);
  auto it = gates_.find(key);
  if (it == gates_.end()) return;
  if (--it->second.active == 0) {
    if (!it->second.frozen) gates_.erase(it);
    changed_.SignalAll();
  }
}

absl::Status SessionMoves::Freeze(absl::string_view tenant, absl::string_view id,
                                  absl::Duration wait) {
  const Key key(tenant, id);
  const absl::Time deadline = absl::Now() + wait;
  absl::MutexLock lock(&mu_);
  if (tombstones_.contains(key)) {
    return absl::FailedPreconditionError(absl::StrCat("session sessions/", id, " was moved"));
  }
  Gate& g = gates_[key];
  if (g.frozen) {
    return absl::FailedPreconditionError(
        absl::StrCat("session sessions/", id, " is already being moved"));
  }
  g.frozen = true;
  while (gates_[key].active > 0) {
    if (changed_.WaitWithDeadline(&mu_, deadline) && absl::Now() >= deadline &&
        gates_[key].active > 0) {
      gates_[key].frozen = false;
      changed_.SignalAll();
      return absl::UnavailableError(absl::StrCat(
          "session sessions/", id, ": a step in progress did not finish within ",
          absl::FormatDuration(wait)));
    }
  }
  return absl::OkStatus();
}

void SessionMoves::Unfreeze(absl::string_view tenant, absl::string_view id) {
  const Key key(tenant, id);
  absl::MutexLock lock(&mu_);
  auto it = gates_.find(key);
  if (it == gates_.end()) return;
  it->second.frozen = false;
  if (it->second.active == 0) gates_.erase(it);
  changed_.SignalAll();
}

void SessionMoves::SetDraining(std::vector<natgrad::v1::Peer> peers) {
  absl::MutexLock lock(&mu_);
  draining_ = true;
  drain_peers_ = std::move(peers);
}

bool SessionMoves::draining() const {
  absl::MutexLock lock(&mu_);
  return draining_;
}

std::optional<natgrad::v1::Peer> SessionMoves::PeerFor(absl::string_view id) const {
  absl::MutexLock lock(&mu_);
  if (drain_peers_.empty()) return std::nullopt;
  return drain_peers_[Fnv1a(id) % drain_peers_.size()];
}

absl::Status SessionMoves::RedirectNew(absl::string_view id) {
  absl::MutexLock lock(&mu_);
  if (!draining_) return absl::OkStatus();
  if (drain_peers_.empty()) return absl::UnavailableError("this replica is draining");
  const natgrad::v1::Peer& peer = drain_peers_[Fnv1a(id) % drain_peers_.size()];
  natgrad::v1::SessionMoved moved;
  moved.set_session(id.empty() ? "" : absl::StrCat("sessions/", id));
  moved.set_replica(peer.replica());
  moved.set_address(peer.address());
  if (redirects_ != nullptr) redirects_->Increment();
  return MovedError(moved);
}

}  // namespace natgrad::service
