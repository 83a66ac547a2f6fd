// absl::Status -> grpc::Status at the edge (docs/architecture.md: the only place).
#ifndef NATGRAD_SERVER_SERVICE_STATUS_CONVERSION_H_
#define NATGRAD_SERVER_SERVICE_STATUS_CONVERSION_H_

#include <string>

#include "absl/status/status.h"
#include "google/rpc/status.pb.h"
#include "grpcpp/support/status.h"

namespace natgrad::service {

inline grpc::Status ToGrpcStatus(const absl::Status& status) {
  // absl and gRPC share the canonical code numbering.
  const auto code = static_cast<grpc::StatusCode>(status.code());
  std::string message(status.message());
  // A SessionMoved redirect (session_moves.h) travels as the standard
  // google.rpc.Status in grpc-status-details-bin, its detail an Any.
  if (auto moved = status.GetPayload("type.googleapis.com/natgrad.v1.SessionMoved")) {
    google::rpc::Status details;
    details.set_code(static_cast<int>(code));
    details.set_message(message);
    google::protobuf::Any* any = details.add_details();
    any->set_type_url("type.googleapis.com/natgrad.v1.SessionMoved");
    any->set_value(std::string(*moved));
    return grpc::Status(code, message, details.SerializeAsString());
  }
  return grpc::Status(code, message);
}

}  // namespace natgrad::service

#endif  // NATGRAD_SERVER_SERVICE_STATUS_CONVERSION_H_
