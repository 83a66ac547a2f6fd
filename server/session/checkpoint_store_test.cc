#include "server/session/checkpoint_store.h"

#include <atomic>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace natgrad::session {
namespace {

using ::testing::Contains;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

std::string TempDir() {
  std::string tmpl = ::testing::TempDir() + "/ckptXXXXXX";
  return mkdtemp(tmpl.data());
}

natgrad::v1::SessionSnapshot Snap(const std::string& id, int64_t step,
                                  const std::string& tenant = "") {
  natgrad::v1::SessionSnapshot s;
  s.set_format_version(1);
  s.set_name("sessions/" + id);
  s.set_tenant(tenant);
  s.set_last_step(step);
  (*s.mutable_session_scalars())["a_ema"] = 0.25 * step;
  auto* b = s.add_blocks();
  b->set_name("w");
  (*b->mutable_scalars())["count"] = static_cast<double>(step);
  return s;
}

std::string Read(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream b;
  b << in.rdbuf();
  return b.str();
}

void Overwrite(const std::string& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary | std::ios::trunc) << bytes;
}

TEST(CheckpointStore, WritesAndLoadsEverySession) {
  auto store = CheckpointStore::Open(TempDir() + "/nested/dir");
  ASSERT_TRUE(store.ok());
  ASSERT_TRUE(store->Write(Snap("aaaa", 3)).ok());
  ASSERT_TRUE(store->Write(Snap("bbbb", 5)).ok());
  ASSERT_TRUE(store->Write(Snap("aaaa", 4)).ok());  // replaces atomically
  LoadedCheckpoints loaded = store->LoadAll();
  EXPECT_THAT(loaded.skipped, IsEmpty());
  EXPECT_THAT(loaded.from_previous, IsEmpty());
  ASSERT_EQ(loaded.snapshots.size(), 2u);
  for (const auto& s : loaded.snapshots) {
    EXPECT_EQ(s.last_step(), s.name() == "sessions/aaaa" ? 4 : 5);
  }
  // No temporary files are left behind; aaaa keeps its previous copy.
  int prev = 0;
  for (const auto& e : std::filesystem::directory_iterator(store->directory())) {
    EXPECT_THAT(e.path().string(), ::testing::Not(HasSubstr(".tmp")));
    prev += absl::EndsWith(e.path().string(), ".prev");
  }
  EXPECT_EQ(prev, 1);
  ASSERT_TRUE(store->Remove("", "aaaa").ok());
  ASSERT_TRUE(store->Remove("", "aaaa").ok());  // idempotent
  EXPECT_FALSE(std::filesystem::exists(store->PathFor("", "aaaa")));
  EXPECT_FALSE(std::filesystem::exists(store->PreviousPathFor("", "aaaa")));
  EXPECT_EQ(store->LoadAll().snapshots.size(), 1u);
}

TEST(CheckpointFormat, EveryFlippedByteIsDetected) {
  const std::string bytes = EncodeCheckpoint(Snap("flip", 7));
  ASSERT_TRUE(DecodeCheckpoint(bytes).ok());
  for (size_t i = 0; i < bytes.size(); ++i) {
    for (unsigned char mask : {0x01, 0x80, 0xff}) {
      std::string bad = bytes;
      bad[i] = static_cast<char>(bad[i] ^ mask);
      EXPECT_FALSE(DecodeCheckpoint(bad).ok()) << "byte " << i << " mask " << int(mask);
    }
  }
}

TEST(CheckpointFormat, EveryTruncationAndExtensionIsDetected) {
  const natgrad::v1::SessionSnapshot snap = Snap("trunc", 9);
  const std::string bytes = EncodeCheckpoint(snap);
  // Includes the cuts on protobuf field boundaries (a bare SessionSnapshot
  // cut there still parses, which is how damage used to load silently).
  for (size_t n = 0; n < bytes.size(); ++n) {
    auto got = DecodeCheckpoint(bytes.substr(0, n));
    EXPECT_FALSE(got.ok()) << "prefix of " << n << " bytes";
  }
  EXPECT_FALSE(DecodeCheckpoint(bytes + std::string(1, '\0')).ok());
  auto ok = DecodeCheckpoint(bytes);
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ(ok->SerializeAsString(), snap.SerializeAsString());
}

TEST(CheckpointFormat, UnknownFrameVersionIsRefusedClearly) {
  std::string bytes = EncodeCheckpoint(Snap("vers", 1));
  bytes[8] = 2;
  auto got = DecodeCheckpoint(bytes);
  EXPECT_EQ(got.status().code(), absl::StatusCode::kUnimplemented);
  EXPECT_THAT(got.status().message(), HasSubstr("version 2"));
}

TEST(CheckpointStore, DamagedCurrentFileFallsBackToPreviousCopy) {
  auto store = CheckpointStore::Open(TempDir());
  ASSERT_TRUE(store.ok());
  ASSERT_TRUE(store->Write(Snap("sess", 3)).ok());
  ASSERT_TRUE(store->Write(Snap("sess", 4)).ok());
  const std::string cur = store->PathFor("", "sess");
  std::string bytes = Read(cur);
  bytes[bytes.size() / 2] ^= 0x10;  // one flipped byte in the middle
  Overwrite(cur, bytes);
  LoadedCheckpoints loaded = store->LoadAll();
  ASSERT_EQ(loaded.snapshots.size(), 1u);
  EXPECT_EQ(loaded.snapshots[0].last_step(), 3);
  EXPECT_EQ(loaded.snapshots[0].SerializeAsString(), Snap("sess", 3).SerializeAsString());
  ASSERT_EQ(loaded.skipped.size(), 1u);
  EXPECT_THAT(loaded.skipped[0], HasSubstr("SHA-256 mismatch"));
  EXPECT_THAT(loaded.from_previous, Contains(store->PreviousPathFor("", "sess")));
}

TEST(CheckpointStore, TruncatedCurrentFileFallsBackToPreviousCopy) {
  auto store = CheckpointStore::Open(TempDir());
  ASSERT_TRUE(store.ok());
  ASSERT_TRUE(store->Write(Snap("sess", 3)).ok());
  ASSERT_TRUE(store->Write(Snap("sess", 4)).ok());
  const std::string cur = store->PathFor("", "sess");
  const std::string bytes = Read(cur);
  Overwrite(cur, bytes.substr(0, bytes.size() - 32));  // exactly the digest cut off
  LoadedCheckpoints loaded = store->LoadAll();
  ASSERT_EQ(loaded.snapshots.size(), 1u);
  EXPECT_EQ(loaded.snapshots[0].last_step(), 3);
  ASSERT_EQ(loaded.skipped.size(), 1u);
  EXPECT_THAT(loaded.skipped[0], HasSubstr("truncated"));
}

TEST(CheckpointStore, BothCopiesDamagedSkipsTheSession) {
  auto store = CheckpointStore::Open(TempDir());
  ASSERT_TRUE(store.ok());
  ASSERT_TRUE(store->Write(Snap("sess", 3)).ok());
  ASSERT_TRUE(store->Write(Snap("sess", 4)).ok());
  ASSERT_TRUE(store->Write(Snap("good", 1)).ok());
  for (const std::string& p : {store->PathFor("", "sess"), store->PreviousPathFor("", "sess")}) {
    std::string bytes = Read(p);
    bytes[30] ^= 0x01;
    Overwrite(p, bytes);
  }
  LoadedCheckpoints loaded = store->LoadAll();
  ASSERT_EQ(loaded.snapshots.size(), 1u);
  EXPECT_EQ(loaded.snapshots[0].name(), "sessions/good");
  EXPECT_EQ(loaded.skipped.size(), 2u);
  EXPECT_THAT(loaded.from_previous, IsEmpty());
}

TEST(CheckpointStore, CrashBetweenRotationStepsLeavesAnIntactCopy) {
  // The state after "current -> previous" and before "tmp -> current": no
  // current file, the previous copy and a temporary file on disk.
  auto store = CheckpointStore::Open(TempDir());
  ASSERT_TRUE(store.ok());
  ASSERT_TRUE(store->Write(Snap("sess", 3)).ok());
  const std::string cur = store->PathFor("", "sess");
  std::filesystem::rename(cur, store->PreviousPathFor("", "sess"));
  const std::string tmp = cur.substr(0, cur.size() - 7) + ".ngckpt.tmp";
  Overwrite(tmp, EncodeCheckpoint(Snap("sess", 4)).substr(0, 40));
  LoadedCheckpoints loaded = store->LoadAll();
  ASSERT_EQ(loaded.snapshots.size(), 1u);
  EXPECT_EQ(loaded.snapshots[0].last_step(), 3);
  EXPECT_THAT(loaded.skipped, IsEmpty());
  EXPECT_FALSE(std::filesystem::exists(tmp));
}

TEST(CheckpointStore, OlderSnapshotDoesNotReplaceNewerOne) {
  auto store = CheckpointStore::Open(TempDir());
  ASSERT_TRUE(store.ok());
  ASSERT_TRUE(store->Write(Snap("sess", 5)).ok());
  ASSERT_TRUE(store->Write(Snap("sess", 4)).ok());  // a late periodic write
  LoadedCheckpoints loaded = store->LoadAll();
  ASSERT_EQ(loaded.snapshots.size(), 1u);
  EXPECT_EQ(loaded.snapshots[0].last_step(), 5);
}

TEST(CheckpointStore, TenantsMayHoldTheSameId) {
  auto store = CheckpointStore::Open(TempDir());
  ASSERT_TRUE(store.ok());
  ASSERT_TRUE(store->Write(Snap("same", 1, "alice")).ok());
  ASSERT_TRUE(store->Write(Snap("same", 2, "bob")).ok());
  EXPECT_NE(store->PathFor("alice", "same"), store->PathFor("bob", "same"));
  LoadedCheckpoints loaded = store->LoadAll();
  ASSERT_EQ(loaded.snapshots.size(), 2u);
  ASSERT_TRUE(store->Remove("alice", "same").ok());
  loaded = store->LoadAll();
  ASSERT_EQ(loaded.snapshots.size(), 1u);
  EXPECT_EQ(loaded.snapshots[0].tenant(), "bob");
}

TEST(CheckpointStore, FileOfAnotherSessionUnderThisNameIsSkipped) {
  auto store = CheckpointStore::Open(TempDir());
  ASSERT_TRUE(store.ok());
  ASSERT_TRUE(store->Write(Snap("mine", 1, "alice")).ok());
  // An operator copies bob's file over alice's name: intact, but not hers.
  Overwrite(store->PathFor("alice", "mine"), EncodeCheckpoint(Snap("mine", 9, "bob")));
  ::unlink(store->PreviousPathFor("alice", "mine").c_str());
  LoadedCheckpoints loaded = store->LoadAll();
  EXPECT_THAT(loaded.snapshots, IsEmpty());
  ASSERT_EQ(loaded.skipped.size(), 1u);
  EXPECT_THAT(loaded.skipped[0], HasSubstr("another tenant"));
}

TEST(CheckpointStore, PreChecksumFilesAreLoadedAndMigrated) {
  auto store = CheckpointStore::Open(TempDir());
  ASSERT_TRUE(store.ok());
  const natgrad::v1::SessionSnapshot old = Snap("oldie", 6, "alice");
  Overwrite(store->LegacyPathFor("oldie"), old.SerializeAsString());
  Overwrite(store->LegacyPathFor("junk"), "\xff\xff\xff not a proto");
  LoadedCheckpoints loaded = store->LoadAll();
  ASSERT_EQ(loaded.snapshots.size(), 1u);
  EXPECT_EQ(loaded.snapshots[0].SerializeAsString(), old.SerializeAsString());
  EXPECT_THAT(loaded.legacy, Contains(store->LegacyPathFor("oldie")));
  EXPECT_THAT(loaded.skipped, Contains(HasSubstr("junk.ckpt")));
  // Now in the checksummed format under alice's name, the old file gone.
  EXPECT_FALSE(std::filesystem::exists(store->LegacyPathFor("oldie")));
  auto migrated = DecodeCheckpoint(Read(store->PathFor("alice", "oldie")));
  ASSERT_TRUE(migrated.ok()) << migrated.status();
  EXPECT_EQ(migrated->last_step(), 6);
  loaded = store->LoadAll();
  EXPECT_EQ(loaded.snapshots.size(), 1u);
  EXPECT_THAT(loaded.legacy, IsEmpty());
}

TEST(CheckpointStore, UnwritableDirectoryIsAnError) {
  auto store = CheckpointStore::Open("/proc/definitely/not/writable");
  EXPECT_FALSE(store.ok());
}

TEST(CheckpointStore, DeletedSessionIsNotWritten) {
  const std::string dir = TempDir();
  auto store = CheckpointStore::Open(dir);
  ASSERT_TRUE(store.ok());
  absl::Status st = store->Write(Snap("gone", 1), [] { return true; });
  EXPECT_TRUE(absl::IsNotFound(st)) << st;
  EXPECT_THAT(st.message(), HasSubstr("sessions/gone was deleted"));
  EXPECT_TRUE(std::filesystem::is_empty(dir));
}

// The invariant behind "deletes are durable": writers racing a delete (mark
// deleted, then Remove) never leave a file behind, whichever interleaving
// the scheduler picks. Before the deleted check under the file lock, a write
// that had passed its caller's check could land after Remove.
TEST(CheckpointStore, NoWriteLandsAfterMarkDeletedAndRemove) {
  const std::string dir = TempDir();
  auto store = CheckpointStore::Open(dir);
  ASSERT_TRUE(store.ok());
  for (int round = 0; round < 20; ++round) {
    const std::string id = "race" + std::to_string(round);
    std::atomic<bool> deleted{false};
    std::atomic<int> written{0};
    std::vector<std::thread> writers;
    for (int w = 0; w < 3; ++w) {
      writers.emplace_back([&, w] {
        for (int step = 1; step <= 200; ++step) {
          absl::Status st = store->Write(Snap(id, 3 * step + w), [&] { return deleted.load(); });
          if (st.ok()) written.fetch_add(1);
          if (absl::IsNotFound(st)) return;
        }
      });
    }
    // Delete once some writes went through, with the writers still going.
    for (int spin = 0; spin < 1000000 && written.load() < 3; ++spin) std::this_thread::yield();
    deleted.store(true);
    ASSERT_TRUE(store->Remove("", "sessions/" + id).ok());
    for (auto& t : writers) t.join();
    EXPECT_TRUE(std::filesystem::is_empty(dir)) << "round " << round;
  }
}

}  // namespace
}  // namespace natgrad::session
