// The C API (natgrad_c_static) against an in-process server: the same
// updates as the C++ client it wraps, bit for bit; the simple spec builds the
// SessionConfig it documents; every error path gives the documented code and
// a message.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <limits>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "client/c/natgrad.h"
#include "gmock/gmock.h"
#include "google/protobuf/util/message_differencer.h"
#include "tests/service/server_fixture.h"

extern "C" int natgrad_c_smoke(const char* target, char* message, size_t message_size);

namespace natgrad::testing {
namespace {

using ::testing::HasSubstr;
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

std::string Target(const service::NatgradServer& server) {
  return "127.0.0.1:" + std::to_string(server.port());
}

// Owning wrappers so a failed ASSERT does not leak handles (valgrind runs).
struct ClientHandle {
  natgrad_client* p = nullptr;
  ~ClientHandle() { natgrad_client_free(p); }
};
struct SessionHandle {
  natgrad_session* p = nullptr;
  ~SessionHandle() { natgrad_session_free(p); }
};

natgrad_client_options FastOptions(int retries = 8) {
  natgrad_client_options o;
  natgrad_client_options_init(&o);
  o.max_retries = retries;
  o.initial_backoff_ms = 1;
  return o;
}

// A session of blocks given as parallel arrays, as C and Julia callers do.
struct Spec {
  std::vector<std::string> names, kinds;
  std::vector<std::vector<int64_t>> shapes;
  std::vector<std::string> keys;
  std::vector<double> values;

  std::vector<const char*> Ptrs(const std::vector<std::string>& v) const {
    std::vector<const char*> out;
    for (const auto& s : v) out.push_back(s.c_str());
    return out;
  }
  std::vector<int32_t> NDims() const {
    std::vector<int32_t> out;
    for (const auto& s : shapes) out.push_back(static_cast<int32_t>(s.size()));
    return out;
  }
  std::vector<int64_t> Dims() const {
    std::vector<int64_t> out;
    for (const auto& s : shapes) out.insert(out.end(), s.begin(), s.end());
    return out;
  }
  natgrad_status Create(natgrad_client* client, natgrad_session** out,
                        const char* id = nullptr) const {
    auto n = Ptrs(names), k = Ptrs(kinds), hk = Ptrs(keys);
    auto nd = NDims();
    auto d = Dims();
    return natgrad_session_create_simple(client, names.size(), n.data(), k.data(), nd.data(),
                                         d.data(), keys.size(), hk.data(), values.data(), id,
                                         out);
  }
};

// sgd (momentum, nesterov, weight decay) + adamw, f32 state.
Spec FirstOrderSpec() {
  Spec s;
  s.names = {"w", "b"};
  s.kinds = {"sgd", "adam"};
  s.shapes = {{3, 4}, {5}};
  s.keys = {"learning_rate", "momentum", "nesterov", "weight_decay",
            "b:learning_rate", "beta1", "decoupled_weight_decay", "b:weight_decay"};
  s.values = {0.1, 0.9, 1, 0.01, 0.003, 0.8, 1, 0.02};
  return s;
}

// What FirstOrderSpec must become.
natgrad::v1::SessionConfig FirstOrderConfig() {
  natgrad::v1::SessionConfig c;
  auto* w = c.add_blocks();
  w->set_name("w");
  w->add_shape(3);
  w->add_shape(4);
  auto* sgd = w->mutable_sgd();
  *sgd->mutable_learning_rate() = Constant(0.1);
  *sgd->mutable_momentum() = Constant(0.9);
  sgd->set_nesterov(true);
  *sgd->mutable_weight_decay() = Constant(0.01);
  auto* b = c.add_blocks();
  b->set_name("b");
  b->add_shape(5);
  auto* adam = b->mutable_adam();
  *adam->mutable_learning_rate() = Constant(0.003);
  adam->set_beta1(0.8);
  adam->set_decoupled_weight_decay(true);
  *adam->mutable_weight_decay() = Constant(0.02);
  return c;
}

template <typename T>
std::vector<T> Random(std::mt19937& rng, size_t n) {
  std::vector<T> out;
  for (double v : RandomVector(rng, n)) out.push_back(static_cast<T>(v));
  return out;
}

template <typename T>
natgrad_status CStep(natgrad_session* s, const Spec& spec, std::vector<std::vector<T>>& g,
                     std::vector<std::vector<T>>& p, std::vector<std::vector<T>>& d,
                     double loss = kNaN) {
  auto names = spec.Ptrs(spec.names);
  auto nd = spec.NDims();
  auto dims = spec.Dims();
  std::vector<const T*> gp, pp;
  std::vector<T*> dp;
  for (size_t i = 0; i < g.size(); ++i) {
    gp.push_back(g[i].data());
    pp.push_back(p[i].data());
    d[i].assign(g[i].size(), T(-999));
    dp.push_back(d[i].data());
  }
  if constexpr (std::is_same_v<T, float>) {
    return natgrad_session_step(s, g.size(), names.data(), nd.data(), dims.data(), gp.data(),
                                pp.data(), nullptr, nullptr, nullptr, loss, dp.data());
  } else {
    return natgrad_session_step_f64(s, g.size(), names.data(), nd.data(), dims.data(),
                                    gp.data(), pp.data(), nullptr, nullptr, nullptr, loss,
                                    dp.data());
  }
}

class CApiTest : public ::testing::Test {
 protected:
  void SetUp() override {
    server_ = StartServer();
    ASSERT_NE(server_, nullptr);
    auto o = FastOptions();
    ASSERT_EQ(natgrad_client_new_with_options(Target(*server_).c_str(), nullptr, &o, &client_.p),
              NATGRAD_OK)
        << natgrad_last_error();
  }
  void TearDown() override {
    // Handles first: they hold streams to the server.
    natgrad_client_free(client_.p);
    client_.p = nullptr;
    if (server_) server_->Shutdown(absl::Seconds(1));
  }

  natgrad::v1::Session Get(const std::string& name) {
    client::Client cpp(ClientFor(*server_));
    auto s = cpp.GetSession(name);
    EXPECT_TRUE(s.ok()) << s.status();
    return s.ok() ? *s : natgrad::v1::Session();
  }

  std::unique_ptr<service::NatgradServer> server_;
  ClientHandle client_;
};

TEST_F(CApiTest, C99SmokeProgram) {
  char message[1024];
  EXPECT_EQ(natgrad_c_smoke(Target(*server_).c_str(), message, sizeof(message)), 0) << message;
}

TEST_F(CApiTest, SimpleSpecBuildsTheDocumentedConfig) {
  SessionHandle s;
  ASSERT_EQ(FirstOrderSpec().Create(client_.p, &s.p, "c-api-spec"), NATGRAD_OK)
      << natgrad_last_error();
  EXPECT_STREQ(natgrad_session_name(s.p), "sessions/c-api-spec");
  const auto got = Get("sessions/c-api-spec").config();
  std::string diff;
  google::protobuf::util::MessageDifferencer d;
  d.ReportDifferencesToString(&diff);
  EXPECT_TRUE(d.Compare(FirstOrderConfig(), got)) << diff;

  // Session-wide keys.
  Spec f64;
  f64.names = {"x"};
  f64.kinds = {"sgd"};
  f64.shapes = {{2}};
  f64.keys = {"state_float64"};
  f64.values = {1};
  SessionHandle s2;
  ASSERT_EQ(f64.Create(client_.p, &s2.p), NATGRAD_OK) << natgrad_last_error();
  EXPECT_EQ(Get(natgrad_session_name(s2.p)).config().state_dtype(), natgrad::v1::FLOAT64);
}

// The C API and the C++ client, fed the same steps on two identical
// sessions, return the same deltas bit for bit (f32 and f64 tensors).
template <typename T>
void ExpectSameAsCpp(service::NatgradServer& server, natgrad_client* c_client,
                     const Spec& spec = FirstOrderSpec(),
                     const natgrad::v1::SessionConfig& config = FirstOrderConfig()) {
  const size_t n_blocks = spec.names.size();
  SessionHandle cs;
  ASSERT_EQ(spec.Create(c_client, &cs.p), NATGRAD_OK) << natgrad_last_error();
  client::Client cpp(ClientFor(server));
  auto session = cpp.CreateSession(config);
  ASSERT_TRUE(session.ok()) << session.status();
  auto stream = cpp.OpenStream(session->name());
  ASSERT_TRUE(stream.ok()) << stream.status();

  std::mt19937 rng(7);
  for (int t = 1; t <= 25; ++t) {
    std::vector<std::vector<T>> g, p, d(n_blocks);
    std::vector<natgrad::v1::BlockStep> blocks;
    for (size_t i = 0; i < n_blocks; ++i) {
      const auto& shape = spec.shapes[i];
      size_t n = 1;
      for (int64_t dim : shape) n *= static_cast<size_t>(dim);
      g.push_back(Random<T>(rng, n));
      p.push_back(Random<T>(rng, n));
      natgrad::v1::BlockStep b;
      b.set_name(spec.names[i]);
      *b.mutable_gradient() = client::MakeTensor(g[i], shape);
      *b.mutable_params() = client::MakeTensor(p[i], shape);
      blocks.push_back(b);
    }
    const double loss = 1.0 / t;
    ASSERT_EQ(CStep<T>(cs.p, spec, g, p, d, loss), NATGRAD_OK) << natgrad_last_error();
    auto response = (*stream)->Step(blocks, loss);
    ASSERT_TRUE(response.ok()) << response.status();
    ASSERT_EQ(response->updates_size(), static_cast<int>(n_blocks));
    for (const auto& u : response->updates()) {
      const size_t i = std::find(spec.names.begin(), spec.names.end(), u.name()) -
                       spec.names.begin();
      ASSERT_LT(i, n_blocks);
      const auto want = client::TensorValues(u.delta());
      ASSERT_EQ(want.size(), d[i].size());
      for (size_t j = 0; j < want.size(); ++j) {
        ASSERT_EQ(static_cast<T>(want[j]), d[i][j]) << "step " << t << " " << u.name() << j;
      }
    }
    int64_t last = 0;
    ASSERT_EQ(natgrad_session_last_step(cs.p, &last), NATGRAD_OK);
    ASSERT_EQ(last, t);
  }
}

TEST_F(CApiTest, SameDeltasAsCppClientFloat32) { ExpectSameAsCpp<float>(*server_, client_.p); }
// soap and shampoo blocks from the simple spec: the documented config, and
// the same deltas as the C++ client (soap's refresh at step 4 included).
Spec PreconditionedSpec() {
  Spec s;
  s.names = {"w", "v", "b"};
  s.kinds = {"soap", "shampoo", "soap"};
  s.shapes = {{4, 3}, {3, 5}, {4}};
  s.keys = {"learning_rate", "weight_decay", "beta1", "shampoo_beta", "precondition_frequency",
            "max_precond_dim", "eigh_refresh", "bias_correction", "v:learning_rate",
            "start_preconditioning_step", "max_preconditioner_dim", "b:eigh_refresh"};
  s.values = {0.02, 0.01, 0.9, 0.8, 3, 8, 1, 0, 0.05, 2, 4, 0};
  return s;
}

natgrad::v1::SessionConfig PreconditionedConfig() {
  natgrad::v1::SessionConfig c;
  auto soap = [](natgrad::v1::SoapConfig* s, bool eigh) {
    *s->mutable_learning_rate() = Constant(0.02);
    *s->mutable_weight_decay() = Constant(0.01);
    s->set_beta1(0.9);
    s->set_shampoo_beta(0.8);
    s->set_precondition_frequency(3);
    s->set_max_precond_dim(8);
    s->set_bias_correction(false);
    s->set_refresh(eigh ? natgrad::v1::SOAP_REFRESH_EIGH : natgrad::v1::SOAP_REFRESH_POWER_QR);
  };
  auto* w = c.add_blocks();
  w->set_name("w");
  w->add_shape(4);
  w->add_shape(3);
  soap(w->mutable_soap(), true);
  auto* v = c.add_blocks();
  v->set_name("v");
  v->add_shape(3);
  v->add_shape(5);
  auto* sh = v->mutable_shampoo();
  *sh->mutable_learning_rate() = Constant(0.05);
  *sh->mutable_weight_decay() = Constant(0.01);
  sh->set_beta1(0.9);
  sh->set_precondition_frequency(3);
  sh->set_bias_correction(false);
  sh->set_start_preconditioning_step(2);
  sh->set_max_preconditioner_dim(4);
  auto* b = c.add_blocks();
  b->set_name("b");
  b->add_shape(4);
  soap(b->mutable_soap(), false);
  return c;
}

TEST_F(CApiTest, SoapAndShampooSimpleSpecs) {
  SessionHandle s;
  ASSERT_EQ(PreconditionedSpec().Create(client_.p, &s.p, "c-api-soap"), NATGRAD_OK)
      << natgrad_last_error();
  std::string diff;
  google::protobuf::util::MessageDifferencer d;
  d.ReportDifferencesToString(&diff);
  EXPECT_TRUE(d.Compare(PreconditionedConfig(), Get("sessions/c-api-soap").config())) << diff;
  ExpectSameAsCpp<float>(*server_, client_.p, PreconditionedSpec(), PreconditionedConfig());

  Spec bad = PreconditionedSpec();
  bad.keys.push_back("w:precondition_frequency");
  bad.values.push_back(2.5);
  SessionHandle s2;
  EXPECT_EQ(bad.Create(client_.p, &s2.p), NATGRAD_INVALID_ARGUMENT);
  EXPECT_THAT(natgrad_last_error(), ::testing::HasSubstr("precondition_frequency"));
}

TEST_F(CApiTest, SameDeltasAsCppClientFloat64) { ExpectSameAsCpp<double>(*server_, client_.p); }

TEST_F(CApiTest, SerializedConfigAndOpen) {
  const std::string bytes = FirstOrderConfig().SerializeAsString();
  SessionHandle s;
  ASSERT_EQ(natgrad_session_create(client_.p, bytes.data(), bytes.size(), "c-api-bytes", &s.p),
            NATGRAD_OK)
      << natgrad_last_error();
  std::string diff;
  google::protobuf::util::MessageDifferencer d;
  d.ReportDifferencesToString(&diff);
  EXPECT_TRUE(d.Compare(FirstOrderConfig(), Get("sessions/c-api-bytes").config())) << diff;

  const Spec spec = FirstOrderSpec();
  std::mt19937 rng(1);
  std::vector<std::vector<float>> g = {Random<float>(rng, 12), Random<float>(rng, 5)};
  std::vector<std::vector<float>> p = g, d1(2), d2(2);
  ASSERT_EQ(CStep<float>(s.p, spec, g, p, d1), NATGRAD_OK) << natgrad_last_error();
  // A second handle while the first still holds the stream: the server says
  // FAILED_PRECONDITION; the client retries max_retries times, then reports.
  {
    ClientHandle impatient;
    auto o = FastOptions(/*retries=*/1);
    ASSERT_EQ(natgrad_client_new_with_options(Target(*server_).c_str(), nullptr, &o,
                                              &impatient.p),
              NATGRAD_OK);
    SessionHandle second;
    ASSERT_EQ(natgrad_session_open(impatient.p, "sessions/c-api-bytes", &second.p), NATGRAD_OK);
    EXPECT_EQ(CStep<float>(second.p, spec, g, p, d2), NATGRAD_FAILED_PRECONDITION);
    EXPECT_THAT(natgrad_last_error(), HasSubstr("stream"));
  }
  natgrad_session_free(s.p);
  s.p = nullptr;
  ASSERT_EQ(natgrad_session_open(client_.p, "sessions/c-api-bytes", &s.p), NATGRAD_OK);
  int64_t last = -1;
  ASSERT_EQ(natgrad_session_last_step(s.p, &last), NATGRAD_OK);
  EXPECT_EQ(last, 1);
  ASSERT_EQ(CStep<float>(s.p, spec, g, p, d2), NATGRAD_OK) << natgrad_last_error();
  EXPECT_EQ(Get("sessions/c-api-bytes").last_step(), 2);
}

TEST_F(CApiTest, ClientMayBeFreedBeforeItsSessions) {
  SessionHandle s;
  ASSERT_EQ(FirstOrderSpec().Create(client_.p, &s.p), NATGRAD_OK);
  natgrad_client_free(client_.p);
  client_.p = nullptr;
  std::vector<std::vector<float>> g = {std::vector<float>(12, 1.f), std::vector<float>(5, 1.f)};
  std::vector<std::vector<float>> p = g, d(2);
  EXPECT_EQ(CStep<float>(s.p, FirstOrderSpec(), g, p, d), NATGRAD_OK) << natgrad_last_error();
}

TEST_F(CApiTest, RejectedStepsSayWhyAndChangeNothing) {
  const Spec spec = FirstOrderSpec();
  SessionHandle s;
  ASSERT_EQ(spec.Create(client_.p, &s.p), NATGRAD_OK);
  auto names = spec.Ptrs(spec.names);
  auto nd = spec.NDims();
  auto dims = spec.Dims();
  std::vector<float> gw(12, 1.f), gb(5, 1.f), dw(12, 7.f), db(5, 7.f);
  const float* grads[] = {gw.data(), gb.data()};
  float* deltas[] = {dw.data(), db.data()};
  auto step = [&](const char* const* n, const int32_t* ndims, const int64_t* d,
                  const float* const* g, float* const* out) {
    // Parameters too: w has weight decay.
    return natgrad_session_step(s.p, 2, n, ndims, d, g, g, nullptr, nullptr, nullptr, kNaN,
                                out);
  };

  // Shape the server does not expect: [4, 3] for a [3, 4] block.
  const int64_t swapped[] = {4, 3, 5};
  EXPECT_EQ(step(names.data(), nd.data(), swapped, grads, deltas), NATGRAD_INVALID_ARGUMENT);
  EXPECT_THAT(natgrad_last_error(), HasSubstr("shape"));
  // Unknown block.
  const char* unknown[] = {"w", "nope"};
  EXPECT_EQ(step(unknown, nd.data(), dims.data(), grads, deltas), NATGRAD_INVALID_ARGUMENT);
  EXPECT_THAT(natgrad_last_error(), HasSubstr("nope"));
  // NaN gradient.
  gw[3] = std::nanf("");
  EXPECT_EQ(step(names.data(), nd.data(), dims.data(), grads, deltas), NATGRAD_INVALID_ARGUMENT);
  EXPECT_THAT(natgrad_last_error(), HasSubstr("NaN"));
  gw[3] = 1.f;
  // Weight decay without parameter values.
  EXPECT_EQ(natgrad_session_step(s.p, 2, names.data(), nd.data(), dims.data(), grads, nullptr,
                                 nullptr, nullptr, nullptr, kNaN, deltas),
            NATGRAD_INVALID_ARGUMENT);
  EXPECT_THAT(natgrad_last_error(), HasSubstr("params"));
  // Caught here, before the wire.
  const int64_t negative[] = {-3, 4, 5};
  EXPECT_EQ(step(names.data(), nd.data(), negative, grads, deltas), NATGRAD_INVALID_ARGUMENT);
  EXPECT_THAT(natgrad_last_error(), HasSubstr("bad shape"));
  const int32_t too_many[] = {40, 1};
  EXPECT_EQ(step(names.data(), too_many, dims.data(), grads, deltas), NATGRAD_INVALID_ARGUMENT);
  const char* twice[] = {"w", "w"};
  EXPECT_EQ(step(twice, nd.data(), dims.data(), grads, deltas), NATGRAD_INVALID_ARGUMENT);
  EXPECT_THAT(natgrad_last_error(), HasSubstr("twice"));
  const int64_t rows[] = {4, 0};
  EXPECT_EQ(natgrad_session_step(s.p, 2, names.data(), nd.data(), dims.data(), grads, grads,
                                 rows, nullptr, nullptr, kNaN, deltas),
            NATGRAD_INVALID_ARGUMENT);
  EXPECT_THAT(natgrad_last_error(), HasSubstr("not kfac_dense"));

  // NULLs.
  EXPECT_EQ(step(nullptr, nd.data(), dims.data(), grads, deltas), NATGRAD_INVALID_ARGUMENT);
  EXPECT_EQ(step(names.data(), nullptr, dims.data(), grads, deltas), NATGRAD_INVALID_ARGUMENT);
  EXPECT_EQ(step(names.data(), nd.data(), nullptr, grads, deltas), NATGRAD_INVALID_ARGUMENT);
  EXPECT_EQ(step(names.data(), nd.data(), dims.data(), nullptr, deltas), NATGRAD_INVALID_ARGUMENT);
  EXPECT_EQ(step(names.data(), nd.data(), dims.data(), grads, nullptr), NATGRAD_INVALID_ARGUMENT);
  const char* null_name[] = {"w", nullptr};
  EXPECT_EQ(step(null_name, nd.data(), dims.data(), grads, deltas), NATGRAD_INVALID_ARGUMENT);
  const float* null_grad[] = {gw.data(), nullptr};
  EXPECT_EQ(step(names.data(), nd.data(), dims.data(), null_grad, deltas),
            NATGRAD_INVALID_ARGUMENT);
  float* null_delta[] = {dw.data(), nullptr};
  EXPECT_EQ(step(names.data(), nd.data(), dims.data(), grads, null_delta),
            NATGRAD_INVALID_ARGUMENT);
  EXPECT_THAT(natgrad_last_error(), HasSubstr("NULL"));

  // Nothing was written and nothing was applied.
  EXPECT_EQ(dw, std::vector<float>(12, 7.f));
  EXPECT_EQ(db, std::vector<float>(5, 7.f));
  int64_t last = -1;
  ASSERT_EQ(natgrad_session_last_step(s.p, &last), NATGRAD_OK);
  EXPECT_EQ(last, 0);
  EXPECT_EQ(Get(natgrad_session_name(s.p)).last_step(), 0);
  // And the session still works.
  EXPECT_EQ(step(names.data(), nd.data(), dims.data(), grads, deltas), NATGRAD_OK)
      << natgrad_last_error();
  EXPECT_STREQ(natgrad_last_error(), "");
}

TEST_F(CApiTest, BadSimpleSpecs) {
  auto expect_invalid = [&](Spec spec, const std::string& why) {
    SessionHandle s;
    EXPECT_EQ(spec.Create(client_.p, &s.p), NATGRAD_INVALID_ARGUMENT) << why;
    EXPECT_THAT(natgrad_last_error(), HasSubstr(why));
    EXPECT_EQ(s.p, nullptr);
  };
  Spec base;
  base.names = {"w"};
  base.kinds = {"sgd"};
  base.shapes = {{2, 2}};
  Spec s = base;
  s.kinds = {"lbfgs"};
  expect_invalid(s, "unknown kind");
  s = base;
  s.keys = {"learning_rte"};
  s.values = {0.1};
  expect_invalid(s, "applies to none");
  s = base;
  s.keys = {"beta1"};  // an adam key, no adam block
  s.values = {0.5};
  expect_invalid(s, "applies to none");
  s = base;
  s.keys = {"v:learning_rate"};
  s.values = {0.1};
  expect_invalid(s, "no block named");
  s = base;
  s.keys = {"w:damping"};
  s.values = {0.1};
  expect_invalid(s, "has no damping");
  s = base;
  s.keys = {"nesterov"};
  s.values = {0.5};
  expect_invalid(s, "0 or 1");
  s = base;
  s.keys = {"learning_rate"};
  s.values = {std::numeric_limits<double>::infinity()};
  expect_invalid(s, "not finite");
  s = base;
  s.kinds = {"kfac_dense"};
  s.shapes = {{6}};
  expect_invalid(s, "2-D");
  s = base;
  s.shapes = {{2, -1}};
  expect_invalid(s, "bad shape");
  // Two blocks with one name: the server's check.
  s = base;
  s.names = {"w", "w"};
  s.kinds = {"sgd", "sgd"};
  s.shapes = {{2}, {2}};
  expect_invalid(s, "duplicate");

  SessionHandle out;
  const char* names[] = {"w"};
  const char* kinds[] = {"sgd"};
  const int32_t nd[] = {1};
  const int64_t dims[] = {2};
  EXPECT_EQ(natgrad_session_create_simple(client_.p, 0, names, kinds, nd, dims, 0, nullptr,
                                          nullptr, nullptr, &out.p),
            NATGRAD_INVALID_ARGUMENT);
  EXPECT_EQ(natgrad_session_create_simple(nullptr, 1, names, kinds, nd, dims, 0, nullptr,
                                          nullptr, nullptr, &out.p),
            NATGRAD_INVALID_ARGUMENT);
  EXPECT_EQ(natgrad_session_create_simple(client_.p, 1, names, kinds, nd, dims, 0, nullptr,
                                          nullptr, nullptr, nullptr),
            NATGRAD_INVALID_ARGUMENT);
  EXPECT_EQ(natgrad_session_create_simple(client_.p, 1, nullptr, kinds, nd, dims, 0, nullptr,
                                          nullptr, nullptr, &out.p),
            NATGRAD_INVALID_ARGUMENT);
  EXPECT_EQ(natgrad_session_create_simple(client_.p, 1, names, kinds, nullptr, dims, 0, nullptr,
                                          nullptr, nullptr, &out.p),
            NATGRAD_INVALID_ARGUMENT);
  EXPECT_EQ(natgrad_session_create_simple(client_.p, 1, names, kinds, nd, dims, 1, nullptr,
                                          nullptr, nullptr, &out.p),
            NATGRAD_INVALID_ARGUMENT);
  // Bad session id: the server's check.
  EXPECT_EQ(natgrad_session_create_simple(client_.p, 1, names, kinds, nd, dims, 0, nullptr,
                                          nullptr, "NO", &out.p),
            NATGRAD_INVALID_ARGUMENT);
  EXPECT_EQ(out.p, nullptr);
}

TEST_F(CApiTest, OtherErrors) {
  SessionHandle s;
  EXPECT_EQ(natgrad_session_open(client_.p, "sessions/does-not-exist", &s.p), NATGRAD_NOT_FOUND);
  EXPECT_THAT(natgrad_last_error(), HasSubstr("does-not-exist"));
  EXPECT_EQ(natgrad_session_open(client_.p, nullptr, &s.p), NATGRAD_INVALID_ARGUMENT);
  EXPECT_EQ(natgrad_session_open(nullptr, "sessions/x", &s.p), NATGRAD_INVALID_ARGUMENT);
  EXPECT_EQ(natgrad_session_open(client_.p, "sessions/x", nullptr), NATGRAD_INVALID_ARGUMENT);
  EXPECT_EQ(s.p, nullptr);

  const char garbage[] = "\xff\xff\xff\xff";
  EXPECT_EQ(natgrad_session_create(client_.p, garbage, 4, nullptr, &s.p),
            NATGRAD_INVALID_ARGUMENT);
  EXPECT_THAT(natgrad_last_error(), HasSubstr("SessionConfig"));
  EXPECT_EQ(natgrad_session_create(client_.p, nullptr, 3, nullptr, &s.p),
            NATGRAD_INVALID_ARGUMENT);
  // An empty config parses; the server wants a block.
  EXPECT_EQ(natgrad_session_create(client_.p, nullptr, 0, nullptr, &s.p),
            NATGRAD_INVALID_ARGUMENT);
  EXPECT_THAT(natgrad_last_error(), HasSubstr("block"));
  // Same id twice.
  const std::string bytes = FirstOrderConfig().SerializeAsString();
  SessionHandle a, b;
  ASSERT_EQ(natgrad_session_create(client_.p, bytes.data(), bytes.size(), "twice", &a.p),
            NATGRAD_OK);
  EXPECT_EQ(natgrad_session_create(client_.p, bytes.data(), bytes.size(), "twice", &b.p),
            NATGRAD_ALREADY_EXISTS);

  ClientHandle c;
  EXPECT_EQ(natgrad_client_new(nullptr, nullptr, &c.p), NATGRAD_INVALID_ARGUMENT);
  EXPECT_EQ(natgrad_client_new("", nullptr, &c.p), NATGRAD_INVALID_ARGUMENT);
  EXPECT_EQ(natgrad_client_new("127.0.0.1:1", nullptr, nullptr), NATGRAD_INVALID_ARGUMENT);
  natgrad_client_options o = FastOptions();
  o.max_retries = -1;
  EXPECT_EQ(natgrad_client_new_with_options("127.0.0.1:1", nullptr, &o, &c.p),
            NATGRAD_INVALID_ARGUMENT);
  EXPECT_EQ(c.p, nullptr);

  int64_t last;
  EXPECT_EQ(natgrad_session_last_step(nullptr, &last), NATGRAD_INVALID_ARGUMENT);
  EXPECT_EQ(natgrad_session_last_step(a.p, nullptr), NATGRAD_INVALID_ARGUMENT);
  EXPECT_EQ(natgrad_session_delete(nullptr), NATGRAD_INVALID_ARGUMENT);
  EXPECT_EQ(natgrad_session_name(nullptr), nullptr);
  natgrad_session_free(nullptr);
  natgrad_client_free(nullptr);
  natgrad_client_options_init(nullptr);

  ASSERT_EQ(natgrad_session_delete(a.p), NATGRAD_OK);
  EXPECT_EQ(natgrad_session_delete(a.p), NATGRAD_NOT_FOUND);

  EXPECT_STREQ(natgrad_status_name(NATGRAD_UNAVAILABLE), "UNAVAILABLE");
  EXPECT_STREQ(natgrad_status_name(16), "UNAUTHENTICATED");
  EXPECT_STREQ(natgrad_status_name(99), "UNKNOWN");
  // The enum is gRPC's numbering.
  EXPECT_EQ(NATGRAD_NOT_FOUND, static_cast<int>(grpc::StatusCode::NOT_FOUND));
  EXPECT_EQ(NATGRAD_UNAUTHENTICATED, static_cast<int>(grpc::StatusCode::UNAUTHENTICATED));
  EXPECT_EQ(NATGRAD_DATA_LOSS, static_cast<int>(grpc::StatusCode::DATA_LOSS));
}

TEST_F(CApiTest, ErrorMessageIsPerThread) {
  SessionHandle s;
  EXPECT_EQ(natgrad_session_open(client_.p, "sessions/nobody-here", &s.p), NATGRAD_NOT_FOUND);
  std::string other;
  std::thread([&] { other = natgrad_last_error(); }).join();
  EXPECT_EQ(other, "");
  EXPECT_THAT(natgrad_last_error(), HasSubstr("nobody-here"));
}

TEST(CApiUnreachable, NothingListening) {
  // A port that was just bound and released: nothing listens there.
  int port;
  {
    auto server = StartServer();
    ASSERT_NE(server, nullptr);
    port = server->port();
    server->Shutdown(absl::Seconds(0));
  }
  const std::string target = "127.0.0.1:" + std::to_string(port);
  ClientHandle c;
  auto o = FastOptions(/*retries=*/2);
  ASSERT_EQ(natgrad_client_new_with_options(target.c_str(), nullptr, &o, &c.p), NATGRAD_OK);
  SessionHandle s;
  EXPECT_EQ(natgrad_session_open(c.p, "sessions/abcd", &s.p), NATGRAD_UNAVAILABLE);
  EXPECT_NE(std::string(natgrad_last_error()), "");
  EXPECT_EQ(FirstOrderSpec().Create(c.p, &s.p), NATGRAD_UNAVAILABLE);
  EXPECT_EQ(s.p, nullptr);
}

TEST(CApiUnreachable, ServerGoesAwayMidSession) {
  auto server = StartServer();
  ASSERT_NE(server, nullptr);
  ClientHandle c;
  auto o = FastOptions(/*retries=*/2);
  ASSERT_EQ(natgrad_client_new_with_options(Target(*server).c_str(), nullptr, &o, &c.p),
            NATGRAD_OK);
  SessionHandle s;
  const Spec spec = FirstOrderSpec();
  ASSERT_EQ(spec.Create(c.p, &s.p), NATGRAD_OK);
  std::vector<std::vector<float>> g = {std::vector<float>(12, 1.f), std::vector<float>(5, 1.f)};
  std::vector<std::vector<float>> p = g, d(2);
  ASSERT_EQ(CStep<float>(s.p, spec, g, p, d), NATGRAD_OK);
  server->Shutdown(absl::Seconds(0));
  server.reset();
  EXPECT_EQ(CStep<float>(s.p, spec, g, p, d), NATGRAD_UNAVAILABLE);
  EXPECT_NE(std::string(natgrad_last_error()), "");
  int64_t last = -1;
  ASSERT_EQ(natgrad_session_last_step(s.p, &last), NATGRAD_OK);
  EXPECT_EQ(last, 1);
}

TEST(CApiAuth, BearerToken) {
  const std::string path = ::testing::TempDir() + "/natgrad_c_tokens";
  std::ofstream(path) << "s3cret-token-0123456789 team-a\n";
  service::ServerOptions options;
  options.auth_tokens_file = path;
  auto server = StartServer(options);
  ASSERT_NE(server, nullptr);
  const std::string target = Target(*server);
  ClientHandle anonymous, wrong, right;
  auto o = FastOptions(/*retries=*/0);
  ASSERT_EQ(natgrad_client_new_with_options(target.c_str(), nullptr, &o, &anonymous.p),
            NATGRAD_OK);
  ASSERT_EQ(natgrad_client_new_with_options(target.c_str(), "guess", &o, &wrong.p), NATGRAD_OK);
  ASSERT_EQ(natgrad_client_new_with_options(target.c_str(), "s3cret-token-0123456789", &o,
                                            &right.p), NATGRAD_OK);
  SessionHandle s;
  EXPECT_EQ(FirstOrderSpec().Create(anonymous.p, &s.p), NATGRAD_UNAUTHENTICATED);
  EXPECT_EQ(FirstOrderSpec().Create(wrong.p, &s.p), NATGRAD_UNAUTHENTICATED);
  ASSERT_EQ(FirstOrderSpec().Create(right.p, &s.p), NATGRAD_OK) << natgrad_last_error();
  std::vector<std::vector<float>> g = {std::vector<float>(12, 1.f), std::vector<float>(5, 1.f)};
  std::vector<std::vector<float>> p = g, d(2);
  EXPECT_EQ(CStep<float>(s.p, FirstOrderSpec(), g, p, d), NATGRAD_OK) << natgrad_last_error();
  std::remove(path.c_str());
}

// K-FAC (and EKFAC, which takes the same raw statistics) through the C API
// against the C++ client. Runs where the server has the kind built in
// (NATGRAD_CORE_KINDS).
void ExpectRawStatisticsSameAsCpp(service::NatgradServer& server, natgrad_client* c_client,
                                  const std::string& kind) {
  constexpr int64_t kOut = 3, kIn = 4, kRows = 8;
  Spec spec;
  spec.names = {"dense"};
  spec.kinds = {kind};
  spec.shapes = {{kOut, kIn + 1}};
  spec.keys = {"has_bias", "learning_rate", "damping", "momentum", "inverse_period"};
  spec.values = {1, 0.05, 0.01, 0.5, 2};
  SessionHandle cs;
  const natgrad_status created = spec.Create(c_client, &cs.p);
  if (created == NATGRAD_UNIMPLEMENTED) {
    GTEST_SKIP() << "server built without " << kind << ": " << natgrad_last_error();
  }
  ASSERT_EQ(created, NATGRAD_OK) << natgrad_last_error();

  natgrad::v1::SessionConfig config;
  auto* b = config.add_blocks();
  b->set_name("dense");
  b->add_shape(kOut);
  b->add_shape(kIn + 1);
  auto fill = [&](auto* k) {
    k->set_d_in(kIn);
    k->set_d_out(kOut);
    k->set_has_bias(true);
    *k->mutable_learning_rate() = Constant(0.05);
    *k->mutable_damping() = Constant(0.01);
    *k->mutable_momentum() = Constant(0.5);
    k->set_inverse_period(2);
  };
  if (kind == "ekfac") {
    fill(b->mutable_ekfac());
  } else {
    fill(b->mutable_kfac_dense());
  }
  client::Client cpp(ClientFor(server));
  auto made = cpp.GetSession(natgrad_session_name(cs.p));
  ASSERT_TRUE(made.ok()) << made.status();
  std::string diff;
  google::protobuf::util::MessageDifferencer d;
  d.ReportDifferencesToString(&diff);
  EXPECT_TRUE(d.Compare(config, made->config())) << diff;

  auto session = cpp.CreateSession(config);
  ASSERT_TRUE(session.ok()) << session.status();
  auto stream = cpp.OpenStream(session->name());
  ASSERT_TRUE(stream.ok());
  std::mt19937 rng(3);
  auto names = spec.Ptrs(spec.names);
  auto nd = spec.NDims();
  auto dims = spec.Dims();
  for (int t = 1; t <= 6; ++t) {
    auto g = Random<float>(rng, kOut * (kIn + 1));
    auto a = Random<float>(rng, kRows * kIn);
    auto og = Random<float>(rng, kRows * kOut);
    std::vector<float> delta(g.size());
    const float* gp[] = {g.data()};
    const float* ap[] = {a.data()};
    const float* op[] = {og.data()};
    float* dp[] = {delta.data()};
    const int64_t rows[] = {kRows};
    ASSERT_EQ(natgrad_session_step(cs.p, 1, names.data(), nd.data(), dims.data(), gp, nullptr,
                                   rows, ap, op, kNaN, dp),
              NATGRAD_OK)
        << natgrad_last_error();
    natgrad::v1::BlockStep bs;
    bs.set_name("dense");
    *bs.mutable_gradient() = client::MakeTensor(g, {kOut, kIn + 1});
    *bs.mutable_kfac()->mutable_raw()->mutable_activations() = client::MakeTensor(a, {kRows, kIn});
    *bs.mutable_kfac()->mutable_raw()->mutable_output_gradients() =
        client::MakeTensor(og, {kRows, kOut});
    auto response = (*stream)->Step({bs});
    ASSERT_TRUE(response.ok()) << response.status();
    const auto want = client::TensorValues(response->updates(0).delta());
    ASSERT_EQ(want.size(), delta.size());
    for (size_t j = 0; j < want.size(); ++j) {
      ASSERT_EQ(static_cast<float>(want[j]), delta[j]) << "step " << t << " entry " << j;
    }
  }
}

TEST_F(CApiTest, KfacDenseSameAsCppClient) {
  ExpectRawStatisticsSameAsCpp(*server_, client_.p, "kfac_dense");
}

TEST_F(CApiTest, EkfacSameAsCppClient) {
  ExpectRawStatisticsSameAsCpp(*server_, client_.p, "ekfac");
}

}  // namespace
}  // namespace natgrad::testing
