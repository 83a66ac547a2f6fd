#include "server/session/session_registry.h"

#include <sys/resource.h>

#include <fstream>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/engine/engine_factory.h"

namespace natgrad::session {
namespace {

size_t VirtualBytes() {
  std::ifstream in("/proc/self/status");
  std::string key;
  size_t kib = 0;
  while (in >> key) {
    if (key == "VmSize:") {
      in >> kib;
      break;
    }
  }
  return kib * 1024;
}

class Registry : public ::testing::Test {
 protected:
  void SetUp() override {
    engine::EngineOptions o;
    o.backend = "cpu";
    auto created = engine::CreateInversionEngine(o);
    ASSERT_TRUE(created.ok()) << created.status();
    engine_ = std::move(created->engine);
  }
  static natgrad::v1::SessionConfig Sgd() {
    natgrad::v1::SessionConfig c;
    auto* b = c.add_blocks();
    b->set_name("w");
    b->add_shape(2);
    b->mutable_sgd();
    return c;
  }
  std::unique_ptr<engine::BatchingInversionEngine> engine_;
};

TEST_F(Registry, IdsArePerTenant) {
  SessionRegistry r({}, engine_.get());
  ASSERT_TRUE(r.Create(Sgd(), "alice", "same").ok());
  // Another tenant's id is neither refused nor revealed.
  auto bob = r.Create(Sgd(), "bob", "same");
  ASSERT_TRUE(bob.ok()) << bob.status();
  EXPECT_EQ(r.Create(Sgd(), "alice", "same").status().code(),
            absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(r.Get("sessions/same", "alice").value()->tenant(), "alice");
  EXPECT_EQ(r.Get("sessions/same", "bob").value()->tenant(), "bob");
  EXPECT_EQ(r.Get("sessions/same", "carol").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(r.List("alice", "", 10).size(), 1u);
  ASSERT_TRUE(r.Delete("sessions/same", "bob").ok());
  EXPECT_TRUE(r.Get("sessions/same", "alice").ok());
  EXPECT_EQ(r.Delete("sessions/same", "bob").code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(r.size(), 1);
}

TEST_F(Registry, ListPagesWithinOneTenant) {
  SessionRegistry r({}, engine_.get());
  for (const char* id : {"aaaa", "bbbb", "cccc"}) ASSERT_TRUE(r.Create(Sgd(), "t1", id).ok());
  ASSERT_TRUE(r.Create(Sgd(), "t0", "zzzz").ok());
  ASSERT_TRUE(r.Create(Sgd(), "t2", "0000").ok());
  auto page = r.List("t1", "aaaa", 10);
  ASSERT_EQ(page.size(), 2u);
  EXPECT_EQ(page[0]->id(), "bbbb");
  EXPECT_EQ(page[1]->id(), "cccc");
  EXPECT_EQ(r.List("t1", "", 1).size(), 1u);
}

TEST_F(Registry, ExpireIdleRemovesSessionsIdleForLongerThanTheTtl) {
  SessionRegistry r({}, engine_.get());
  auto a = r.Create(Sgd(), "", "aaaa");
  ASSERT_TRUE(a.ok() && r.Create(Sgd(), "t", "bbbb").ok());
  EXPECT_TRUE(r.ExpireIdle(absl::Hours(1), absl::Now() + absl::Minutes(30)).empty());
  EXPECT_EQ(r.size(), 2);
  auto expired = r.ExpireIdle(absl::Hours(1), absl::Now() + absl::Minutes(61));
  EXPECT_EQ(expired.size(), 2u);
  EXPECT_EQ(r.size(), 0);
  EXPECT_EQ(r.Get("sessions/aaaa", "").status().code(), absl::StatusCode::kNotFound);
}

TEST_F(Registry, StepsCountAsActivity) {
  SessionRegistry r({}, engine_.get());
  auto s = r.Create(Sgd(), "", "step");
  ASSERT_TRUE(s.ok());
  const absl::Time t0 = absl::Now();
  StepData data;
  data.step = 1;
  BlockStepData b;
  b.name = "w";
  core::DenseStepInput in;
  in.gradient = Eigen::MatrixXd::Constant(2, 1, 1.0);
  b.input = in;
  data.blocks.push_back(b);
  ASSERT_TRUE((*s)->Step(data, [](const StepResult&) -> std::shared_ptr<const CachedReply> {
                      return std::make_shared<SerializedReply>("");
                    }).ok());
  // The sweep at t0 + 50 min sees the new step: active then.
  EXPECT_TRUE(r.ExpireIdle(absl::Hours(1), t0 + absl::Minutes(50)).empty());
  EXPECT_TRUE(r.ExpireIdle(absl::Hours(1), t0 + absl::Minutes(100)).empty());
  EXPECT_EQ(r.ExpireIdle(absl::Hours(1), t0 + absl::Minutes(111)).size(), 1u);
}

TEST_F(Registry, LimitIsCheckedBeforeTheConfigIsBuilt) {
  RegistryLimits limits;
  limits.max_session_bytes = 64 << 20;
  SessionRegistry r(limits, engine_.get());
  // Building this K-FAC block to validate it would allocate gigabytes.
  natgrad::v1::SessionConfig c;
  auto* b = c.add_blocks();
  b->set_name("fc");
  b->mutable_kfac_dense()->set_d_in(3);
  b->mutable_kfac_dense()->set_d_out(29694);
  // Address space capped at 1 GiB above today's: building the block first
  // would throw std::bad_alloc here instead of returning the error.
  rlimit old{};
  ASSERT_EQ(getrlimit(RLIMIT_AS, &old), 0);
  rlimit capped = old;
  capped.rlim_cur = VirtualBytes() + (size_t{1} << 30);
  ASSERT_EQ(setrlimit(RLIMIT_AS, &capped), 0);
  const absl::StatusCode code = r.Create(c, "", "").status().code();
  setrlimit(RLIMIT_AS, &old);
  EXPECT_EQ(code, absl::StatusCode::kResourceExhausted);
}

}  // namespace
}  // namespace natgrad::session
