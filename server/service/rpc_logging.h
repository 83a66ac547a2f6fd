// Log lines for failed calls. A failed step (which ends its Step stream with
// the error) is logged by the step path itself, with LogFailedStep, at
// warning; every other failed call at debug, by a gRPC server interceptor
// that sees the status the client gets. The interceptor skips Step streams:
// a call with interceptors pays an extra completion-queue round trip per
// message (measured: ~5 us on a 60 us loopback step).
#ifndef NATGRAD_SERVER_SERVICE_RPC_LOGGING_H_
#define NATGRAD_SERVER_SERVICE_RPC_LOGGING_H_

#include <cstdint>
#include <memory>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "grpcpp/support/server_interceptor.h"

namespace natgrad::service {

// "step failed: code=INVALID_ARGUMENT session=sessions/x step=3 peer=...:
// <message>" (the message names the block and field where one is at fault).
// `session` is what the stream named, "" when it named none; `step` 0 when
// unknown.
void LogFailedStep(const absl::Status& status, absl::string_view session, int64_t step,
                   absl::string_view peer);

std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>
MakeRpcLoggingInterceptorFactory();

}  // namespace natgrad::service

#endif  // NATGRAD_SERVER_SERVICE_RPC_LOGGING_H_
