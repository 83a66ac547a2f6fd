// A C++ program built against an installed natgrad (find_package(natgrad)):
// minimises 0.5 * |w - t|^2 with the server's SGD and checks each update
// against the closed form w_k - t = (1 - lr)^k (w_0 - t).
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include <natgrad/client/natgrad_client.h>
#include <natgrad/client/tensor.h>

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s host:port\n", argv[0]);
    return 2;
  }
  constexpr double kLr = 0.25;
  constexpr int kSteps = 5;
  const std::vector<double> target = {1.0, -2.0, 3.0};

  natgrad::client::ClientOptions options;
  options.target = argv[1];
  natgrad::client::Client client(options);

  natgrad::v1::SessionConfig config;
  natgrad::v1::BlockConfig* block = config.add_blocks();
  block->set_name("w");
  block->add_shape(3);
  block->mutable_sgd()->mutable_learning_rate()->mutable_constant()->set_value(kLr);
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

  std::vector<float> w = {0.0f, 0.0f, 0.0f};
  for (int k = 1; k <= kSteps; ++k) {
    std::vector<float> grad(3);
    for (int i = 0; i < 3; ++i) grad[i] = static_cast<float>(w[i] - target[i]);
    natgrad::v1::BlockStep step;
    step.set_name("w");
    *step.mutable_gradient() = natgrad::client::MakeTensor(grad, {3});
    auto response = (*stream)->Step({step});
    if (!response.ok()) {
      std::fprintf(stderr, "step %d: %s\n", k, response.status().ToString().c_str());
      return 1;
    }
    if (response->step() != k || response->updates_size() != 1 ||
        response->updates(0).name() != "w") {
      std::fprintf(stderr, "step %d: unexpected response %s\n", k,
                   response->ShortDebugString().c_str());
      return 1;
    }
    const std::vector<double> delta = natgrad::client::TensorValues(response->updates(0).delta());
    if (delta.size() != 3) return 1;
    for (int i = 0; i < 3; ++i) {
      w[i] += static_cast<float>(delta[i]);
      const double expected = target[i] + std::pow(1.0 - kLr, k) * (0.0 - target[i]);
      if (std::abs(w[i] - expected) > 1e-5) {
        std::fprintf(stderr, "step %d: w[%d] = %.8f, expected %.8f\n", k, i, w[i], expected);
        return 1;
      }
    }
  }
  if (absl::Status closed = (*stream)->Close(); !closed.ok()) {
    std::fprintf(stderr, "Close: %s\n", closed.ToString().c_str());
    return 1;
  }
  if (absl::Status deleted = client.DeleteSession(session->name()); !deleted.ok()) {
    std::fprintf(stderr, "DeleteSession: %s\n", deleted.ToString().c_str());
    return 1;
  }
  std::printf("cpp_consumer: %d steps ok on %s\n", kSteps, session->name().c_str());
  return 0;
}
