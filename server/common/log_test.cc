#include "server/common/log.h"

#include <fcntl.h>
#include <unistd.h>

#include <fstream>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace natgrad::log {
namespace {

using ::testing::ElementsAre;
using ::testing::MatchesRegex;

// Redirects the logger to a temporary file for one test.
class LogTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/nglogXXXXXX";
    fd_ = mkstemp(tmpl);
    ASSERT_GE(fd_, 0);
    path_ = tmpl;
    SetFdForTesting(fd_);
    SetLevel(Level::kInfo);
  }
  void TearDown() override {
    SetFdForTesting(2);
    SetLevel(Level::kInfo);
    close(fd_);
    unlink(path_.c_str());
  }
  std::vector<std::string> Lines() {
    std::ifstream in(path_);
    std::vector<std::string> out;
    for (std::string l; std::getline(in, l);) out.push_back(l);
    return out;
  }
  int fd_ = -1;
  std::string path_;
};

TEST_F(LogTest, ParsesLevelNames) {
  EXPECT_EQ(*ParseLevel("debug"), Level::kDebug);
  EXPECT_EQ(*ParseLevel("INFO"), Level::kInfo);
  EXPECT_EQ(*ParseLevel("warning"), Level::kWarning);
  EXPECT_EQ(*ParseLevel("warn"), Level::kWarning);
  EXPECT_EQ(*ParseLevel("Error"), Level::kError);
  auto bad = ParseLevel("verbose");
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(bad.status().message()), ::testing::HasSubstr("verbose"));
}

TEST_F(LogTest, OneLineWithTimestampAndLevel) {
  NATGRAD_LOG(kWarning, "session ", "sessions/abc", " step ", 3);
  EXPECT_THAT(Lines(), ElementsAre(MatchesRegex(
                           "[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\\.[0-9]{6}Z "
                           "warning natgrad-server: session sessions/abc step 3")));
}

TEST_F(LogTest, DropsLinesBelowTheLevelWithoutEvaluatingThem) {
  SetLevel(Level::kWarning);
  int evaluated = 0;
  auto count = [&] { return ++evaluated; };
  NATGRAD_LOG(kDebug, "d", count());
  NATGRAD_LOG(kInfo, "i", count());
  NATGRAD_LOG(kWarning, "w", count());
  NATGRAD_LOG(kError, "e", count());
  EXPECT_EQ(evaluated, 2);
  auto lines = Lines();
  ASSERT_EQ(lines.size(), 2u);
  EXPECT_THAT(lines[0], ::testing::EndsWith("warning natgrad-server: w1"));
  EXPECT_THAT(lines[1], ::testing::EndsWith("error natgrad-server: e2"));
  SetLevel(Level::kDebug);
  NATGRAD_LOG(kDebug, "now");
  EXPECT_EQ(Lines().size(), 3u);
}

TEST_F(LogTest, EmbeddedNewlinesStayOnOneLine) {
  NATGRAD_LOG(kError, "first\nsecond\r\nthird");
  EXPECT_THAT(Lines(), ElementsAre(::testing::EndsWith("first second  third")));
}

TEST_F(LogTest, ConcurrentLinesNeverInterleave) {
  constexpr int kThreads = 8, kLines = 500;
  // Long lines, so an unlocked writer would split them.
  const std::string pad(3000, 'x');
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kLines; ++i) NATGRAD_LOG(kInfo, "t", t, " i", i, " ", pad, " end");
    });
  }
  for (auto& th : threads) th.join();
  auto lines = Lines();
  ASSERT_EQ(lines.size(), static_cast<size_t>(kThreads * kLines));
  std::set<std::string> seen;
  for (const auto& l : lines) {
    const size_t at = l.find("natgrad-server: t");
    ASSERT_NE(at, std::string::npos) << l.substr(0, 80);
    ASSERT_THAT(l, ::testing::EndsWith(pad + " end"));
    seen.insert(l.substr(at, l.find(' ', at + 20) - at));
  }
  EXPECT_EQ(seen.size(), static_cast<size_t>(kThreads * kLines));  // each line once
}

}  // namespace
}  // namespace natgrad::log
