// A real optimisation through natgrad from C++: logistic regression on
// generated data, the weights kept by the client, updates from the server.
//   natgrad-logreg-demo --target=127.0.0.1:50051 --optimizer=kfac --steps=200
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "client/cpp/natgrad_client.h"
#include "client/cpp/tensor.h"

ABSL_FLAG(std::string, target, "127.0.0.1:50051", "natgrad-server address");
ABSL_FLAG(std::string, optimizer, "kfac", "kfac, adam or sgd");
ABSL_FLAG(int, steps, 200, "steps");
ABSL_FLAG(int, features, 20, "input features");
ABSL_FLAG(int, examples, 512, "training examples");

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  const int d = absl::GetFlag(FLAGS_features), n = absl::GetFlag(FLAGS_examples);
  const std::string opt = absl::GetFlag(FLAGS_optimizer);

  // Labels from a hidden linear rule with 5% label noise.
  std::mt19937 rng(7);
  std::normal_distribution<double> normal;
  std::vector<double> truth(d), x(n * d), y(n);
  for (auto& t : truth) t = normal(rng);
  for (int i = 0; i < n; ++i) {
    double z = 0;
    for (int j = 0; j < d; ++j) z += truth[j] * (x[i * d + j] = normal(rng));
    y[i] = (z > 0) != (std::uniform_real_distribution<>(0, 1)(rng) < 0.05);
  }

  natgrad::client::Client client({.target = absl::GetFlag(FLAGS_target)});
  natgrad::v1::SessionConfig config;
  config.set_state_dtype(natgrad::v1::FLOAT64);
  auto* block = config.add_blocks();
  block->set_name("w");
  if (opt == "kfac") {
    auto* k = block->mutable_kfac_dense();
    k->set_d_in(d);
    k->set_d_out(1);
    k->set_has_bias(true);
    k->mutable_learning_rate()->mutable_constant()->set_value(1.0);
    k->mutable_damping()->mutable_constant()->set_value(1e-3);
  } else if (opt == "adam") {
    block->add_shape(1);
    block->add_shape(d + 1);
    block->mutable_adam()->mutable_learning_rate()->mutable_constant()->set_value(0.05);
  } else {
    block->add_shape(1);
    block->add_shape(d + 1);
    block->mutable_sgd()->mutable_learning_rate()->mutable_constant()->set_value(0.5);
  }
  auto session = client.CreateSession(config);
  if (!session.ok()) {
    std::fprintf(stderr, "CreateSession: %s\n", session.status().ToString().c_str());
    return 1;
  }
  auto stream = client.OpenStream(session->name());
  if (!stream.ok()) {
    std::fprintf(stderr, "OpenStream: %s\n", stream.status().ToString().c_str());
    return 1;
  }
  std::printf("session %s, optimizer %s, %d examples x %d features\n",
              session->name().c_str(), opt.c_str(), n, d);

  std::vector<double> w(d + 1, 0.0);  // bias last
  const int steps = absl::GetFlag(FLAGS_steps);
  for (int step = 1; step <= steps; ++step) {
    // Mean cross-entropy, its gradient, and per-example statistics.
    std::vector<double> grad(d + 1, 0.0), g(n);
    double loss = 0;
    int correct = 0;
    for (int i = 0; i < n; ++i) {
      double z = w[d];
      for (int j = 0; j < d; ++j) z += w[j] * x[i * d + j];
      const double p = 1 / (1 + std::exp(-z));
      loss -= y[i] * std::log(p + 1e-12) + (1 - y[i]) * std::log(1 - p + 1e-12);
      correct += (p > 0.5) == (y[i] > 0.5);
      // Per-example output gradient sampled from the model's predictive
      // (true Fisher): d/dz of -log p(y_s | z) with y_s ~ Bernoulli(p).
      const double ys = std::uniform_real_distribution<>(0, 1)(rng) < p ? 1.0 : 0.0;
      g[i] = p - ys;
      for (int j = 0; j < d; ++j) grad[j] += (p - y[i]) * x[i * d + j] / n;
      grad[d] += (p - y[i]) / n;
    }
    loss /= n;
    natgrad::v1::BlockStep b;
    b.set_name("w");
    *b.mutable_gradient() = natgrad::client::MakeTensor(grad, {1, d + 1});
    if (opt == "kfac") {
      auto* raw = b.mutable_kfac()->mutable_raw();
      *raw->mutable_activations() = natgrad::client::MakeTensor(x, {n, d});
      *raw->mutable_output_gradients() = natgrad::client::MakeTensor(g, {n, 1});
    }
    auto response = (*stream)->Step({b}, loss);
    if (!response.ok()) {
      std::fprintf(stderr, "step %d: %s\n", step, response.status().ToString().c_str());
      return 1;
    }
    const std::vector<double> delta =
        natgrad::client::TensorValues(response->updates(0).delta());
    for (int j = 0; j <= d; ++j) w[j] += delta[j];
    if (step == 1 || step % 10 == 0 || step == steps) {
      std::printf("step %4d  loss %.4f  train accuracy %.3f  (%.2f ms on server)\n", step,
                  loss, double(correct) / n, response->timing().server_micros() / 1e3);
    }
  }
  (*stream)->Close().IgnoreError();
  client.DeleteSession(session->name()).IgnoreError();
  return 0;
}
