// Who is calling: maps a call to its tenant. Sessions belong to tenants; a
// session of another tenant is indistinguishable from a missing one.
#ifndef NATGRAD_SERVER_SERVICE_AUTHENTICATOR_H_
#define NATGRAD_SERVER_SERVICE_AUTHENTICATOR_H_

#include <string>

#include "absl/status/statusor.h"
#include "grpcpp/server_context.h"

namespace natgrad::service {

class Authenticator {
 public:
  virtual ~Authenticator() = default;
  // The caller's tenant, or UNAUTHENTICATED.
  virtual absl::StatusOr<std::string> Authenticate(
      const grpc::CallbackServerContext& context) const = 0;
};

// Insecure localhost mode (the default for the demo and tests): every caller
// is the anonymous tenant "".
class AnonymousAuthenticator final : public Authenticator {
 public:
  absl::StatusOr<std::string> Authenticate(
      const grpc::CallbackServerContext&) const override {
    return std::string();
  }
};

}  // namespace natgrad::service

#endif  // NATGRAD_SERVER_SERVICE_AUTHENTICATOR_H_
