#include "server/session/checkpoint_store.h"

#include <filesystem>
#include <fstream>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace natgrad::session {
namespace {

std::string TempDir() {
  std::string tmpl = ::testing::TempDir() + "/ckptXXXXXX";
  return mkdtemp(tmpl.data());
}

natgrad::v1::SessionSnapshot Snap(const std::string& id, int64_t step) {
  natgrad::v1::SessionSnapshot s;
  s.set_format_version(1);
  s.set_name("sessions/" + id);
  s.set_last_step(step);
  return s;
}

TEST(CheckpointStore, WritesAndLoadsEverySession) {
  auto store = CheckpointStore::Open(TempDir() + "/nested/dir");
  ASSERT_TRUE(store.ok());
  ASSERT_TRUE(store->Write(Snap("aaaa", 3)).ok());
  ASSERT_TRUE(store->Write(Snap("bbbb", 5)).ok());
  ASSERT_TRUE(store->Write(Snap("aaaa", 4)).ok());  // replaces atomically
  LoadedCheckpoints loaded = store->LoadAll();
  EXPECT_TRUE(loaded.skipped.empty());
  ASSERT_EQ(loaded.snapshots.size(), 2u);
  for (const auto& s : loaded.snapshots) {
    EXPECT_EQ(s.last_step(), s.name() == "sessions/aaaa" ? 4 : 5);
  }
  // No temporary files are left behind.
  for (const auto& e : std::filesystem::directory_iterator(store->directory())) {
    EXPECT_EQ(e.path().extension(), ".ckpt");
  }
  ASSERT_TRUE(store->Remove("aaaa").ok());
  ASSERT_TRUE(store->Remove("aaaa").ok());  // idempotent
  EXPECT_EQ(store->LoadAll().snapshots.size(), 1u);
}

TEST(CheckpointStore, CorruptAndTruncatedFilesAreSkippedNotFatal) {
  auto store = CheckpointStore::Open(TempDir());
  ASSERT_TRUE(store.ok());
  natgrad::v1::SessionSnapshot big = Snap("good", 7);
  (*big.mutable_session_scalars())["x"] = 1.0;
  ASSERT_TRUE(store->Write(big).ok());
  ASSERT_TRUE(store->Write(Snap("trunc", 9)).ok());
  // Truncate one file mid-message and fill another with garbage.
  std::string bytes = big.SerializeAsString();
  std::ofstream(store->PathFor("trunc"), std::ios::binary) << bytes.substr(0, bytes.size() / 2);
  std::ofstream(store->PathFor("junk"), std::ios::binary) << "\xff\xff\xff not a proto";
  std::ofstream(store->PathFor("leftover") + ".tmp") << "half-written";
  LoadedCheckpoints loaded = store->LoadAll();
  ASSERT_EQ(loaded.snapshots.size(), 1u);
  EXPECT_EQ(loaded.snapshots[0].name(), "sessions/good");
  EXPECT_EQ(loaded.skipped.size(), 2u);
  EXPECT_THAT(loaded.skipped, ::testing::Contains(::testing::HasSubstr("junk.ckpt")));
}

TEST(CheckpointStore, UnwritableDirectoryIsAnError) {
  auto store = CheckpointStore::Open("/proc/definitely/not/writable");
  EXPECT_FALSE(store.ok());
}

}  // namespace
}  // namespace natgrad::session
