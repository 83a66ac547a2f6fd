// natgrad.v1.OptimizerService on gRPC's callback API. Unary calls are cheap and
// run on the callback thread; Step streams are reactors that hand the math to
// the StepExecutor (scripts/setup).
#ifndef NATGRAD_SERVER_SERVICE_OPTIMIZER_SERVICE_H_
#define NATGRAD_SERVER_SERVICE_OPTIMIZER_SERVICE_H_

#include <cstdint>
#include <memory>
#include <string>

#include "natgrad/v1/optimizer_service.grpc.pb.h"
#include "server/service/authenticator.h"
#include "server/service/checkpointer.h"
#include "server/service/step_executor.h"
#include "server/session/checkpoint_store.h"
#include "server/session/session_registry.h"

namespace natgrad::service {

class ServiceMetrics;
class SessionMoves;

struct ServiceDependencies {
  session::SessionRegistry* registry = nullptr;
  StepExecutor* executor = nullptr;
  const Authenticator* authenticator = nullptr;
  // Optional: checkpoints after steps and on create, import and delete.
  Checkpointer* checkpoints = nullptr;
  int64_t checkpoint_every_steps = 0;
  // Optional.
  ServiceMetrics* metrics = nullptr;
  // A stream holding part of a step with no message for this long ends.
  absl::Duration partial_step_timeout = absl::Seconds(60);
  // Steps may name tensors and a reply buffer in /dev/shm (--shared_memory).
  bool shared_memory = false;
  // This replica's name (Session.replica; docs/replicas.md).
  std::string replica_name;
  // Optional: tombstones of sessions drained away and the move gate.
  SessionMoves* moves = nullptr;
};

// A new or imported session is acknowledged only once it is durable; when
// its first write fails it is taken out again and the result is UNAVAILABLE.
absl::Status MakeDurableOrDrop(const ServiceDependencies& deps, session::Session& session,
                               const std::string& tenant);
// Session::Describe with the service's view: durable_step -1 without
// checkpoints, and the replica name.
natgrad::v1::Session DescribeSession(const ServiceDependencies& deps,
                                     const session::Session& session);

// The generated service with every method taken raw (bytes in, bytes
// out): the service decodes each request itself, so an undecodable one gets
// INVALID_ARGUMENT with a message, where gRPC's typed handlers answer
// UNIMPLEMENTED with none (unary) or report a half-close (Step).
namespace generated = natgrad::v1;
using OptimizerServiceBase = generated::OptimizerService::WithRawCallbackMethod_CreateSession<
    generated::OptimizerService::WithRawCallbackMethod_GetSession<
        generated::OptimizerService::WithRawCallbackMethod_ListSessions<
            generated::OptimizerService::WithRawCallbackMethod_DeleteSession<
                generated::OptimizerService::WithRawCallbackMethod_Step<
                    generated::OptimizerService::WithRawCallbackMethod_ExportSession<
                        generated::OptimizerService::WithRawCallbackMethod_ImportSession<
                            generated::OptimizerService::Service>>>>>>>;

class OptimizerService final : public OptimizerServiceBase {
 public:
  explicit OptimizerService(ServiceDependencies deps);

  using Bytes = grpc::ByteBuffer;
  grpc::ServerUnaryReactor* CreateSession(grpc::CallbackServerContext* context,
                                          const Bytes* request, Bytes* response) override;
  grpc::ServerUnaryReactor* GetSession(grpc::CallbackServerContext* context,
                                       const Bytes* request, Bytes* response) override;
  grpc::ServerUnaryReactor* ListSessions(grpc::CallbackServerContext* context,
                                         const Bytes* request, Bytes* response) override;
  grpc::ServerUnaryReactor* DeleteSession(grpc::CallbackServerContext* context,
                                          const Bytes* request, Bytes* response) override;
  grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* Step(
      grpc::CallbackServerContext* context) override;
  grpc::ServerUnaryReactor* ExportSession(grpc::CallbackServerContext* context,
                                          const Bytes* request, Bytes* response) override;
  grpc::ServerUnaryReactor* ImportSession(grpc::CallbackServerContext* context,
                                          const Bytes* request, Bytes* response) override;

  const ServiceDependencies& deps() const { return deps_; }

 private:
  ServiceDependencies deps_;
};

}  // namespace natgrad::service

#endif  // NATGRAD_SERVER_SERVICE_OPTIMIZER_SERVICE_H_
