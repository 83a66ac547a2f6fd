#include "server/session/checkpoint_store.h"

#include <fcntl.h>
#include <openssl/evp.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <set>
#include <sstream>

#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"

namespace natgrad::session {
namespace {

constexpr absl::string_view kMagic("\x89NGCKPT\n", 8);
constexpr uint32_t kFrameVersion = 1;
constexpr size_t kHeaderBytes = 8 + 4 + 8;
constexpr size_t kDigestBytes = 32;
constexpr absl::string_view kSuffix = ".ngckpt";
constexpr absl::string_view kPrevSuffix = ".ngckpt.prev";
constexpr absl::string_view kTmpSuffix = ".ngckpt.tmp";
constexpr absl::string_view kLegacySuffix = ".ckpt";

std::string Sha256(absl::string_view bytes) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  EVP_Digest(bytes.data(), bytes.size(), md, &len, EVP_sha256(), nullptr);
  return std::string(reinterpret_cast<const char*>(md), len);
}

void PutLe(std::string* out, uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i) out->push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}

uint64_t GetLe(absl::string_view in, int bytes) {
  uint64_t v = 0;
  for (int i = 0; i < bytes; ++i) {
    v |= static_cast<uint64_t>(static_cast<unsigned char>(in[i])) << (8 * i);
  }
  return v;
}

std::string TenantKey(absl::string_view tenant) {
  return absl::BytesToHexString(Sha256(tenant).substr(0, 16));
}

std::string BareId(absl::string_view name) {
  absl::ConsumePrefix(&name, "sessions/");
  return std::string(name);
}

absl::Status ErrnoError(absl::string_view what, const std::string& path) {
  return absl::InternalError(absl::StrCat(what, " ", path, ": ", std::strerror(errno)));
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

absl::StatusOr<std::string> ReadWhole(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open"));
  std::stringstream buffer;
  buffer << in.rdbuf();
  if (in.bad()) return absl::DataLossError(absl::StrCat(path, ": read error"));
  return buffer.str();
}

absl::Status CheckRequiredFields(const natgrad::v1::SessionSnapshot& snap) {
  if (snap.name().empty() || snap.format_version() == 0) {
    return absl::DataLossError("incomplete snapshot (no name or format_version)");
  }
  return absl::OkStatus();
}

}  // namespace

std::string EncodeCheckpoint(const natgrad::v1::SessionSnapshot& snapshot) {
  std::string payload;
  snapshot.SerializeToString(&payload);
  std::string out(kMagic);
  out.reserve(kHeaderBytes + payload.size() + kDigestBytes);
  PutLe(&out, kFrameVersion, 4);
  PutLe(&out, payload.size(), 8);
  out += payload;
  out += Sha256(out);
  return out;
}

absl::StatusOr<natgrad::v1::SessionSnapshot> DecodeCheckpoint(absl::string_view bytes) {
  if (bytes.size() < kMagic.size() || bytes.substr(0, kMagic.size()) != kMagic) {
    return absl::InvalidArgumentError("not a natgrad checkpoint (bad magic)");
  }
  if (bytes.size() < kHeaderBytes) {
    return absl::DataLossError(
        absl::StrCat("truncated: ", bytes.size(), " bytes, shorter than the header"));
  }
  const uint32_t version = static_cast<uint32_t>(GetLe(bytes.substr(8), 4));
  if (version != kFrameVersion) {
    return absl::UnimplementedError(
        absl::StrCat("checkpoint frame version ", version, " is not supported (this server "
                     "reads version ", kFrameVersion, ")"));
  }
  const uint64_t length = GetLe(bytes.substr(12), 8);
  const uint64_t body = bytes.size() - kHeaderBytes;
  if (body < kDigestBytes || length > body - kDigestBytes) {
    return absl::DataLossError(absl::StrCat("truncated: ", bytes.size(), " bytes, the header "
                                            "announces a ", length, "-byte snapshot"));
  }
  if (length != body - kDigestBytes) {
    return absl::DataLossError(absl::StrCat("trailing bytes: ", bytes.size(),
                                            " bytes for a ", length, "-byte snapshot"));
  }
  const absl::string_view framed = bytes.substr(0, kHeaderBytes + length);
  if (Sha256(framed) != bytes.substr(kHeaderBytes + length)) {
    return absl::DataLossError("SHA-256 mismatch (the file is damaged)");
  }
  natgrad::v1::SessionSnapshot snap;
  if (!snap.ParseFromArray(bytes.data() + kHeaderBytes, static_cast<int>(length))) {
    return absl::DataLossError("digest matches but the payload is not a SessionSnapshot");
  }
  if (absl::Status s = CheckRequiredFields(snap); !s.ok()) return s;
  return snap;
}

absl::StatusOr<CheckpointStore> CheckpointStore::Open(std::string directory) {
  std::error_code ec;
  std::filesystem::create_directories(directory, ec);
  if (ec) {
    return absl::FailedPreconditionError(
        absl::StrCat("checkpoint directory ", directory, ": ", ec.message()));
  }
  return CheckpointStore(std::move(directory));
}

std::string CheckpointStore::PathFor(absl::string_view tenant,
                                     absl::string_view session_id) const {
  return absl::StrCat(directory_, "/", BareId(session_id), ".", TenantKey(tenant), kSuffix);
}

std::string CheckpointStore::PreviousPathFor(absl::string_view tenant,
                                             absl::string_view session_id) const {
  return absl::StrCat(directory_, "/", BareId(session_id), ".", TenantKey(tenant),
                      kPrevSuffix);
}

std::string CheckpointStore::LegacyPathFor(absl::string_view session_id) const {
  return absl::StrCat(directory_, "/", BareId(session_id), kLegacySuffix);
}

absl::Status CheckpointStore::SyncDirectory() const {
  const int dfd = ::open(directory_.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd < 0) return ErrnoError("open", directory_);
  absl::Status st;
  if (::fsync(dfd) != 0) st = ErrnoError("fsync", directory_);
  ::close(dfd);
  return st;
}

absl::Status CheckpointStore::Write(const natgrad::v1::SessionSnapshot& snapshot) const {
  return Write(snapshot, [] { return false; });
}

absl::Status CheckpointStore::Write(const natgrad::v1::SessionSnapshot& snapshot,
                                    absl::FunctionRef<bool()> deleted) const {
  const std::string id = BareId(snapshot.name());
  const std::string path = PathFor(snapshot.tenant(), id);
  const std::string prev = PreviousPathFor(snapshot.tenant(), id);
  const std::string tmp = path.substr(0, path.size() - kSuffix.size()) + std::string(kTmpSuffix);
  absl::MutexLock file_lock(
      &shared_->file_mu[std::hash<std::string>{}(path) % shared_->file_mu.size()]);
  if (deleted()) {
    return absl::NotFoundError(
        absl::StrCat("session ", snapshot.name(), " was deleted; its checkpoint is not written"));
  }
  {
    absl::MutexLock lock(&shared_->steps_mu);
    auto it = shared_->written_step.find(path);
    if (it != shared_->written_step.end() && snapshot.last_step() < it->second) {
      return absl::OkStatus();
    }
  }
  const std::string bytes = EncodeCheckpoint(snapshot);
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) return ErrnoError("open", tmp);
  absl::Status st = WriteAll(fd, bytes, tmp);
  if (st.ok() && ::fsync(fd) != 0) st = ErrnoError("fsync", tmp);
  if (::close(fd) != 0 && st.ok()) st = ErrnoError("close", tmp);
  if (!st.ok()) {
    ::unlink(tmp.c_str());
    return st;
  }
  // The new file is durable; only now does the current one become the
  // previous copy (replacing the older previous one).
  if (::rename(path.c_str(), prev.c_str()) != 0 && errno != ENOENT) {
    st = ErrnoError("rename", path);
    ::unlink(tmp.c_str());
    return st;
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) return ErrnoError("rename", tmp);
  if (absl::Status s = SyncDirectory(); !s.ok()) return s;
  absl::MutexLock lock(&shared_->steps_mu);
  shared_->written_step[path] = snapshot.last_step();
  return absl::OkStatus();
}

absl::Status CheckpointStore::Remove(absl::string_view tenant,
                                     absl::string_view session_id) const {
  const std::string path = PathFor(tenant, session_id);
  absl::MutexLock file_lock(
      &shared_->file_mu[std::hash<std::string>{}(path) % shared_->file_mu.size()]);
  absl::Status result;
  const std::string tmp = path.substr(0, path.size() - kSuffix.size()) + std::string(kTmpSuffix);
  for (const std::string& p : {path, PreviousPathFor(tenant, session_id), tmp}) {
    if (::unlink(p.c_str()) != 0 && errno != ENOENT) result.Update(ErrnoError("unlink", p));
  }
  // A pre-checksum file of this session that could not be migrated; it is
  // only this tenant's if it says so.
  const std::string legacy = LegacyPathFor(session_id);
  if (auto bytes = ReadWhole(legacy); bytes.ok()) {
    natgrad::v1::SessionSnapshot snap;
    if (snap.ParseFromString(*bytes) && snap.tenant() == tenant &&
        ::unlink(legacy.c_str()) != 0 && errno != ENOENT) {
      result.Update(ErrnoError("unlink", legacy));
    }
  }
  result.Update(SyncDirectory());
  absl::MutexLock lock(&shared_->steps_mu);
  shared_->written_step.erase(path);
  return result;
}

LoadedCheckpoints CheckpointStore::LoadAll() const {
  LoadedCheckpoints out;
  std::error_code ec;
  // Base paths (without .prev) of checksummed sessions, and legacy files.
  std::set<std::string> bases, legacy;
  for (const auto& entry : std::filesystem::directory_iterator(directory_, ec)) {
    const std::string path = entry.path().string();
    if (absl::EndsWith(path, kSuffix)) {
      bases.insert(path);
    } else if (absl::EndsWith(path, kPrevSuffix)) {
      bases.insert(path.substr(0, path.size() - 5));
    } else if (absl::EndsWith(path, kTmpSuffix)) {
      ::unlink(path.c_str());  // an unfinished write; its previous file is intact
    } else if (absl::EndsWith(path, kLegacySuffix)) {
      legacy.insert(path);
    }
  }
  if (ec) out.skipped.push_back(absl::StrCat(directory_, ": ", ec.message()));

  std::set<std::string> loaded_paths;
  // Checks that a decoded file is the session its name says.
  auto matches_name = [&](const natgrad::v1::SessionSnapshot& snap,
                          const std::string& base) -> absl::Status {
    const std::string want = PathFor(snap.tenant(), snap.name());
    if (want != base) {
      return absl::DataLossError(absl::StrCat("holds ", snap.name(),
                                              " of another tenant or id than its file name"));
    }
    return absl::OkStatus();
  };
  for (const std::string& base : bases) {
    bool done = false;
    for (const std::string& candidate : {base, base + ".prev"}) {
      auto bytes = ReadWhole(candidate);
      if (!bytes.ok()) {
        if (!absl::IsNotFound(bytes.status())) {
          out.skipped.push_back(absl::StrCat(candidate, ": ", bytes.status().message()));
        }
        continue;
      }
      auto snap = DecodeCheckpoint(*bytes);
      absl::Status st = snap.ok() ? matches_name(*snap, base) : snap.status();
      if (!st.ok()) {
        out.skipped.push_back(absl::StrCat(candidate, ": ", st.message()));
        continue;
      }
      if (candidate != base) out.from_previous.push_back(candidate);
      loaded_paths.insert(base);
      out.snapshots.push_back(*std::move(snap));
      done = true;
      break;
    }
    (void)done;
  }

  for (const std::string& path : legacy) {
    auto bytes = ReadWhole(path);
    natgrad::v1::SessionSnapshot snap;
    if (!bytes.ok()) {
      out.skipped.push_back(absl::StrCat(path, ": ", bytes.status().message()));
      continue;
    }
    if (!snap.ParseFromString(*bytes)) {
      out.skipped.push_back(
          absl::StrCat(path, ": not a SessionSnapshot (corrupt or truncated)"));
      continue;
    }
    if (absl::Status s = CheckRequiredFields(snap); !s.ok()) {
      out.skipped.push_back(absl::StrCat(path, ": ", s.message()));
      continue;
    }
    const std::string base = PathFor(snap.tenant(), snap.name());
    if (loaded_paths.contains(base)) {
      // Already migrated (a crash came between the new write and the unlink).
      ::unlink(path.c_str());
      continue;
    }
    out.legacy.push_back(path);
    // Migrate: the checksummed copy is durable before the old file goes.
    if (Write(snap).ok()) ::unlink(path.c_str());
    loaded_paths.insert(base);
    out.snapshots.push_back(std::move(snap));
  }
  return out;
}

}  // namespace natgrad::session
