// Golden wire vectors, C++ side (README.md beside this file): the files parse,
// re-encode to the same bytes, equal the messages built here from the
// documented values with the C++ client's helpers, and the server accepts
// the request pair.
#include <fstream>
#include <sstream>

#include "client/cpp/natgrad_client.h"
#include "client/cpp/tensor.h"
#include "google/protobuf/io/coded_stream.h"
#include "google/protobuf/io/zero_copy_stream_impl_lite.h"
#include "gtest/gtest.h"
#include "natgrad/v1/optimizer_service.pb.h"
#include "server/service/natgrad_server.h"

namespace natgrad::testing {
namespace {

std::string ReadFile(const std::string& name) {
  std::ifstream in(std::string(NATGRAD_WIRE_DIR) + "/" + name, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

std::string Deterministic(const google::protobuf::Message& m) {
  std::string out;
  google::protobuf::io::StringOutputStream raw(&out);
  google::protobuf::io::CodedOutputStream coded(&raw);
  coded.SetSerializationDeterministic(true);
  m.SerializeToCodedStream(&coded);
  coded.Trim();
  return out;
}

v1::Schedule Constant(double v) {
  v1::Schedule s;
  s.mutable_constant()->set_value(v);
  return s;
}

v1::CreateSessionRequest BuildCreate() {
  v1::CreateSessionRequest r;
  r.set_session_id("wire-golden-0001");
  auto* c = r.mutable_config();
  c->set_display_name("wire golden");
  c->set_state_dtype(v1::FLOAT64);
  c->mutable_kl_clip()->set_enabled(true);
  c->mutable_kl_clip()->set_kappa(0.001);
  auto* fc = c->add_blocks();
  fc->set_name("fc1");
  fc->add_shape(2);
  fc->add_shape(4);
  auto* k = fc->mutable_kfac_dense();
  k->set_d_in(3);
  k->set_d_out(2);
  k->set_has_bias(true);
  *k->mutable_learning_rate() = Constant(0.25);
  auto* joined = k->mutable_damping()->mutable_joined();
  auto* warm = joined->add_schedules()->mutable_log_linear_warmup();
  warm->set_start(1e-4);
  warm->set_end(0.1);
  warm->set_steps(10);
  auto* cosine = joined->add_schedules()->mutable_cosine_decay();
  cosine->set_init(0.1);
  cosine->set_steps(100);
  cosine->set_alpha(0.01);
  joined->add_boundaries(10);
  *k->mutable_momentum() = Constant(0.9);
  k->set_damping_mode(v1::EIGEN_EXACT);
  k->set_ema_decay(0.95);
  k->set_inverse_period(5);
  auto* bn = c->add_blocks();
  bn->set_name("bn.weight");
  bn->add_shape(2);
  auto* adam = bn->mutable_adam();
  *adam->mutable_learning_rate() = Constant(0.001);
  adam->set_beta1(0.9);
  adam->set_beta2(0.999);
  adam->set_epsilon(1e-8);
  *adam->mutable_weight_decay() = Constant(0.01);
  adam->set_decoupled_weight_decay(true);
  return r;
}

v1::StepRequest BuildStep() {
  v1::StepRequest r;
  r.set_session("sessions/wire-golden-0001");
  r.set_step(1);
  r.set_last(true);
  r.set_loss(2.5);
  auto* fc = r.add_blocks();
  fc->set_name("fc1");
  *fc->mutable_gradient() = client::MakeTensor(
      std::vector<float>{0.5f, -1.0f, 0.25f, 2.0f, -0.125f, 1.5f, 3.0f, -4.0f}, {2, 4});
  *fc->mutable_kfac()->mutable_raw()->mutable_activations() =
      client::MakeTensor(std::vector<float>{1, 2, 3, -1, 0.5f, 0}, {2, 3});
  *fc->mutable_kfac()->mutable_raw()->mutable_output_gradients() =
      client::MakeTensor(std::vector<float>{0.1f, -0.2f, 0.3f, 0.4f}, {2, 2});
  auto* bn = r.add_blocks();
  bn->set_name("bn.weight");
  *bn->mutable_gradient() = client::MakeTensor(std::vector<float>{0.75f, -0.5f}, {2});
  *bn->mutable_params() = client::MakeTensor(std::vector<float>{1, 1}, {2});
  return r;
}

v1::StepResponse BuildResponse() {
  v1::StepResponse r;
  r.set_session("sessions/wire-golden-0001");
  r.set_step(1);
  r.set_kl_clip_scale(0.5);
  r.mutable_timing()->set_server_micros(1234);
  r.mutable_timing()->set_compute_micros(1000);
  r.mutable_timing()->set_inversion_micros(250);
  auto* fc = r.add_updates();
  fc->set_name("fc1");
  *fc->mutable_delta() = client::MakeTensor(
      std::vector<float>{-0.0625f, 0.125f, -0.03125f, -0.25f, 0.015625f, -0.1875f, -0.375f, 0.5f},
      {2, 4});
  auto& h = *fc->mutable_hyperparameters();
  h["damping"] = 1e-4;
  h["learning_rate"] = 0.25;
  h["momentum"] = 0.9;
  h["weight_decay"] = 0;
  auto* bn = r.add_updates();
  bn->set_name("bn.weight");
  *bn->mutable_delta() = client::MakeTensor(std::vector<float>{-0.001f, 0.001f}, {2});
  (*bn->mutable_hyperparameters())["learning_rate"] = 0.001;
  (*bn->mutable_hyperparameters())["weight_decay"] = 0.01;
  return r;
}

template <typename M>
void CheckVector(const std::string& file, const M& built) {
  const std::string golden = ReadFile(file);
  ASSERT_FALSE(golden.empty()) << file;
  M parsed;
  ASSERT_TRUE(parsed.ParseFromString(golden)) << file;
  EXPECT_EQ(Deterministic(parsed), golden) << file << ": re-encoding differs";
  EXPECT_EQ(Deterministic(built), golden) << file << ": built from the README values differs";
}

TEST(WireVectors, CreateSessionRequest) {
  CheckVector("create_session_request.pb", BuildCreate());
}
TEST(WireVectors, StepRequest) { CheckVector("step_request.pb", BuildStep()); }
TEST(WireVectors, StepResponse) { CheckVector("step_response.pb", BuildResponse()); }

TEST(WireVectors, TheServerAcceptsTheGoldenRequests) {
  service::ServerOptions o;
  o.address = "127.0.0.1:0";
  o.engine.backend = "cpu";
  auto server = service::NatgradServer::Start(o);
  ASSERT_TRUE(server.ok());
  client::ClientOptions co;
  co.target = "127.0.0.1:" + std::to_string((*server)->port());
  client::Client client(co);
  v1::CreateSessionRequest create;
  ASSERT_TRUE(create.ParseFromString(ReadFile("create_session_request.pb")));
  auto session = client.CreateSession(create.config(), create.session_id());
  ASSERT_TRUE(session.ok()) << session.status();
  v1::StepRequest step;
  ASSERT_TRUE(step.ParseFromString(ReadFile("step_request.pb")));
  auto stream = client.OpenStream(session->name());
  auto r = (*stream)->Step({step.blocks().begin(), step.blocks().end()}, step.loss());
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->updates(0).name(), "fc1");
  EXPECT_EQ(r->updates(0).delta().shape_size(), 2);
  EXPECT_EQ(r->updates(0).delta().dtype(), v1::FLOAT32);
}

}  // namespace
}  // namespace natgrad::testing
