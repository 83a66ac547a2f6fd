// absl::Status -> grpc::Status at the edge (docs/architecture.md: the only place).
#ifndef NATGRAD_SERVER_SERVICE_STATUS_CONVERSION_H_
#define NATGRAD_SERVER_SERVICE_STATUS_CONVERSION_H_

#include <string>

#include "absl/status/status.h"
#include "grpcpp/support/status.h"

namespace natgrad::service {

inline grpc::Status ToGrpcStatus(const absl::Status& status) {
  // absl and gRPC share the canonical code numbering.
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()),
                      std::string(status.message()));
}

}  // namespace natgrad::service

#endif  // NATGRAD_SERVER_SERVICE_STATUS_CONVERSION_H_
