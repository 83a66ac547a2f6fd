// Export a session from one server and import it into another: the moved
// session continues exactly as if it had never moved (issue 7).
#include "google/protobuf/util/message_differencer.h"
#include "gmock/gmock.h"
#include "tests/service/server_fixture.h"

namespace natgrad::testing {
namespace {

natgrad::v1::SessionConfig Config() {
  natgrad::v1::SessionConfig c;
  c.set_state_dtype(natgrad::v1::FLOAT64);
  auto* k = c.add_blocks();
  k->set_name("fc");
  auto* kd = k->mutable_kfac_dense();
  kd->set_d_in(4);
  kd->set_d_out(2);
  kd->set_inverse_period(2);
  *kd->mutable_momentum() = Constant(0.5);
  auto* a = c.add_blocks();
  a->set_name("b");
  a->add_shape(2);
  a->mutable_adam();
  return c;
}

std::vector<natgrad::v1::BlockStep> Inputs(int t) {
  std::mt19937 rng(t);
  natgrad::v1::BlockStep fc, b;
  fc.set_name("fc");
  *fc.mutable_gradient() = client::MakeTensor(RandomVector(rng, 8), {2, 4});
  *fc.mutable_kfac()->mutable_raw()->mutable_activations() =
      client::MakeTensor(RandomVector(rng, 24), {6, 4});
  *fc.mutable_kfac()->mutable_raw()->mutable_output_gradients() =
      client::MakeTensor(RandomVector(rng, 12), {6, 2});
  b.set_name("b");
  *b.mutable_gradient() = client::MakeTensor(RandomVector(rng, 2), {2});
  return {fc, b};
}

TEST(SessionMigration, ExportImportContinuesExactly) {
  auto a = StartServer();
  auto b = StartServer();
  client::Client ca(ClientFor(*a)), cb(ClientFor(*b));
  auto reference = ca.CreateSession(Config());
  auto moving = ca.CreateSession(Config());
  auto ref_stream = *ca.OpenStream(reference->name());
  auto mov_stream = *ca.OpenStream(moving->name());
  for (int t = 1; t <= 5; ++t) {
    ASSERT_TRUE(ref_stream->Step(Inputs(t)).ok());
    ASSERT_TRUE(mov_stream->Step(Inputs(t)).ok());
  }
  mov_stream->Close().IgnoreError();
  auto snapshot = ca.ExportSession(moving->name());
  ASSERT_TRUE(snapshot.ok());
  auto imported = cb.ImportSession(*snapshot);
  ASSERT_TRUE(imported.ok()) << imported.status();
  EXPECT_EQ(imported->name(), moving->name());
  EXPECT_EQ(imported->last_step(), 5);
  ASSERT_TRUE(ca.DeleteSession(moving->name()).ok());
  auto moved = *cb.OpenStream(moving->name());
  EXPECT_EQ(moved->next_step(), 6);
  for (int t = 6; t <= 10; ++t) {
    auto want = ref_stream->Step(Inputs(t));
    auto got = moved->Step(Inputs(t));
    ASSERT_TRUE(got.ok()) << got.status();
    for (int i = 0; i < 2; ++i) {
      EXPECT_EQ(client::TensorValues(got->updates(i).delta()),
                client::TensorValues(want->updates(i).delta()))
          << "step " << t;
    }
  }
  // Importing twice under the same id is refused; a new id is accepted.
  EXPECT_EQ(cb.ImportSession(*snapshot).status().code(), absl::StatusCode::kAlreadyExists);
  EXPECT_TRUE(cb.ImportSession(*snapshot, "copy-of-it").ok());
}

TEST(SessionMigration, BrokenSnapshotsAreRejected) {
  auto a = StartServer();
  client::Client c(ClientFor(*a));
  auto s = c.CreateSession(Config());
  auto stream = *c.OpenStream(s->name());
  ASSERT_TRUE(stream->Step(Inputs(1)).ok());
  auto snap = *c.ExportSession(s->name());
  auto bad_version = snap;
  bad_version.set_format_version(99);
  EXPECT_EQ(c.ImportSession(bad_version, "v99-copy").status().code(),
            absl::StatusCode::kInvalidArgument);
  auto bad_tensor = snap;
  auto& tensors = *bad_tensor.mutable_blocks(0)->mutable_tensors();
  tensors.begin()->second.mutable_data()->resize(3);
  auto r = c.ImportSession(bad_tensor, "torn-copy");
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(r.status().message(), ::testing::HasSubstr("snapshot.blocks[0].tensors"));
  auto renamed = snap;
  renamed.mutable_blocks(0)->set_name("other");
  EXPECT_EQ(c.ImportSession(renamed, "renamed-copy").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(c.ListSessions()->size(), 1u);
}

}  // namespace
}  // namespace natgrad::testing
