// router_load_client: steps sessions through a natgrad router (or one
// replica) and prints a digest of every update, so two runs -- one
// undisturbed, one with replicas killed and drained underneath -- can be
// compared bit for bit (the contract in docs/replicas.md, "Load clients").
//
//   router_load_client --target host:port --sessions N --first_index K
//       --steps T --out FILE [--token_file F] [--step_interval_ms M]
//       [--no_router]
//
// Session i (0 <= i < N) has id "rt-<K+i>" and this fixed model:
//   block "fc":  kfac_dense, d_in 4, d_out 3, inverse_period 2, momentum 0.5
//   block "b":   adam over a float32 vector of 3
//   state_dtype FLOAT64.
// Step t of session index x = K+i sends, from std::mt19937(1000003 * x + t)
// with normal(0, 1) draws in this order: the fc gradient [3, 4] (float64),
// fc raw activations [5, 4] and output gradients [5, 3] (float64), and the
// b gradient [3] (float32, each draw rounded to float).
//
// Each session runs in its own thread on its own stream. Redirects
// (SessionMoved) are followed -- by the natgrad-replica header behind a
// router, by connecting to the redirect address with --no_router -- and
// UNAVAILABLE is retried with jittered backoff for up to 120 s per step,
// replaying the steps a restarted replica lost (natgrad_client.h).
//
// Output: one line per session, in index order:
//   rt-<idx> <last step answered> <hex SHA-256 of the delta bytes of every
//   block of every step, in step order and block order>
// Exit status 0 when every session reached step T, else 1 (errors on stderr).
#include <openssl/evp.h>

#include <cstdio>
#include <fstream>
#include <iostream>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/escaping.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "client/cpp/natgrad_client.h"
#include "client/cpp/tensor.h"

namespace {

natgrad::v1::SessionConfig Config() {
  natgrad::v1::SessionConfig c;
  c.set_state_dtype(natgrad::v1::FLOAT64);
  auto* fc = c.add_blocks();
  fc->set_name("fc");
  auto* kd = fc->mutable_kfac_dense();
  kd->set_d_in(4);
  kd->set_d_out(3);
  kd->set_inverse_period(2);
  kd->mutable_momentum()->mutable_constant()->set_value(0.5);
  auto* b = c.add_blocks();
  b->set_name("b");
  b->add_shape(3);
  b->mutable_adam();
  return c;
}

std::vector<natgrad::v1::BlockStep> Inputs(int64_t index, int64_t t) {
  std::mt19937 rng(static_cast<uint32_t>(1000003 * index + t));
  std::normal_distribution<double> normal(0.0, 1.0);
  auto draw = [&](size_t n) {
    std::vector<double> v(n);
    for (auto& x : v) x = normal(rng);
    return v;
  };
  natgrad::v1::BlockStep fc, b;
  fc.set_name("fc");
  *fc.mutable_gradient() = natgrad::client::MakeTensor(draw(12), {3, 4});
  *fc.mutable_kfac()->mutable_raw()->mutable_activations() =
      natgrad::client::MakeTensor(draw(20), {5, 4});
  *fc.mutable_kfac()->mutable_raw()->mutable_output_gradients() =
      natgrad::client::MakeTensor(draw(15), {5, 3});
  b.set_name("b");
  std::vector<double> bd = draw(3);
  std::vector<float> bf(bd.begin(), bd.end());
  *b.mutable_gradient() = natgrad::client::MakeTensor(bf, {3});
  return {fc, b};
}

struct Result {
  int64_t step = 0;
  std::string digest;
  std::string error;
};

Result RunSession(natgrad::client::Client& client, int64_t index, int64_t steps,
                  int interval_ms) {
  Result r;
  const std::string id = absl::StrCat("rt-", index);
  auto created = client.CreateSession(Config(), id);
  if (!created.ok()) {
    r.error = absl::StrCat(id, ": create: ", created.status().ToString());
    return r;
  }
  auto stream = client.OpenStream(created->name());
  if (!stream.ok()) {
    r.error = absl::StrCat(id, ": open: ", stream.status().ToString());
    return r;
  }
  EVP_MD_CTX* sha = EVP_MD_CTX_new();
  EVP_DigestInit_ex(sha, EVP_sha256(), nullptr);
  for (int64_t t = 1; t <= steps; ++t) {
    auto resp = (*stream)->Step(Inputs(index, t));
    if (!resp.ok()) {
      r.error = absl::StrCat(id, ": step ", t, ": ", resp.status().ToString());
      break;
    }
    if (resp->step() != t) {
      r.error = absl::StrCat(id, ": step ", t, " answered as step ", resp->step());
      break;
    }
    for (const auto& u : resp->updates()) {
      EVP_DigestUpdate(sha, u.delta().data().data(), u.delta().data().size());
    }
    r.step = t;
    if (interval_ms > 0 && t < steps) {
      std::this_thread::sleep_for(std::chrono::milliseconds(interval_ms));
    }
  }
  (*stream)->Close().IgnoreError();
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  EVP_DigestFinal_ex(sha, md, &len);
  EVP_MD_CTX_free(sha);
  r.digest = absl::BytesToHexString(absl::string_view(reinterpret_cast<char*>(md), len));
  return r;
}

int Usage(const std::string& why) {
  std::cerr << "router_load_client: " << why
            << "\nusage: router_load_client --target host:port --sessions N --first_index K "
               "--steps T --out FILE [--token_file F] [--step_interval_ms M] [--no_router]\n";
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  std::string target, out, token_file;
  int64_t sessions = -1, first = -1, steps = -1, interval = 0;
  bool no_router = false;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    std::string value;
    const size_t eq = arg.find('=');
    if (eq != std::string::npos) {
      value = arg.substr(eq + 1);
      arg = arg.substr(0, eq);
    } else if (arg != "--no_router") {
      if (i + 1 >= argc) return Usage(arg + " needs a value");
      value = argv[++i];
    }
    auto number = [&](int64_t* v) { return absl::SimpleAtoi(value, v) && *v >= 0; };
    if (arg == "--target") {
      target = value;
    } else if (arg == "--out") {
      out = value;
    } else if (arg == "--token_file") {
      token_file = value;
    } else if (arg == "--no_router") {
      no_router = true;
    } else if (arg == "--sessions") {
      if (!number(&sessions)) return Usage("--sessions: want a count");
    } else if (arg == "--first_index") {
      if (!number(&first)) return Usage("--first_index: want a number");
    } else if (arg == "--steps") {
      if (!number(&steps)) return Usage("--steps: want a count");
    } else if (arg == "--step_interval_ms") {
      if (!number(&interval)) return Usage("--step_interval_ms: want milliseconds");
    } else {
      return Usage("unknown argument " + arg);
    }
  }
  if (target.empty() || out.empty() || sessions < 0 || first < 0 || steps < 0) {
    return Usage("--target, --sessions, --first_index, --steps and --out are required");
  }
  natgrad::client::ClientOptions options;
  options.target = target;
  options.connect_to_redirect_address = no_router;
  options.max_retries = 1 << 20;  // bounded by max_retry_time instead
  options.max_retry_time = absl::Seconds(120);
  options.initial_backoff = absl::Milliseconds(50);
  options.max_backoff = absl::Seconds(1);
  if (!token_file.empty()) {
    std::ifstream in(token_file);
    if (!(in >> options.bearer_token)) return Usage("--token_file: cannot read a token");
  }
  natgrad::client::Client client(options);
  std::vector<Result> results(sessions);
  std::vector<std::thread> threads;
  for (int64_t i = 0; i < sessions; ++i) {
    threads.emplace_back([&, i] {
      results[i] = RunSession(client, first + i, steps, static_cast<int>(interval));
    });
  }
  for (auto& t : threads) t.join();
  std::ofstream file(out);
  bool all = true;
  for (int64_t i = 0; i < sessions; ++i) {
    file << "rt-" << first + i << " " << results[i].step << " " << results[i].digest << "\n";
    if (!results[i].error.empty()) std::cerr << results[i].error << "\n";
    all = all && results[i].step == steps;
  }
  file.close();
  if (!file) {
    std::cerr << "router_load_client: cannot write " << out << "\n";
    return 1;
  }
  return all ? 0 : 1;
}
