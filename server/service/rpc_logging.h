// One log line per failed RPC, from a gRPC server interceptor: failed steps
// (a failed step ends its Step stream with the error) at warning, with the
// session and step the stream named, the code and the message (which names
// the block and field where one is to blame); other failed calls at debug.
// An interceptor sees exactly the status the client gets, whichever part of
// the service produced it, without the step path having to know about logs.
#ifndef NATGRAD_SERVER_SERVICE_RPC_LOGGING_H_
#define NATGRAD_SERVER_SERVICE_RPC_LOGGING_H_

#include <memory>

#include "grpcpp/support/server_interceptor.h"

namespace natgrad::service {

std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>
MakeRpcLoggingInterceptorFactory();

}  // namespace natgrad::service

#endif  // NATGRAD_SERVER_SERVICE_RPC_LOGGING_H_
