// natgrad.v1.OptimizerService on gRPC's callback API. Unary calls are cheap and
// run on the callback thread; Step streams are reactors that hand the math to
// the StepExecutor (scripts/setup).
#ifndef NATGRAD_SERVER_SERVICE_OPTIMIZER_SERVICE_H_
#define NATGRAD_SERVER_SERVICE_OPTIMIZER_SERVICE_H_

#include <cstdint>
#include <memory>

#include "natgrad/v1/optimizer_service.grpc.pb.h"
#include "server/service/authenticator.h"
#include "server/service/checkpointer.h"
#include "server/service/step_executor.h"
#include "server/session/checkpoint_store.h"
#include "server/session/session_registry.h"

namespace natgrad::service {

class ServiceMetrics;

struct ServiceDependencies {
  session::SessionRegistry* registry = nullptr;
  StepExecutor* executor = nullptr;
  const Authenticator* authenticator = nullptr;
  // Optional: checkpoints after steps and on create, import and delete.
  Checkpointer* checkpoints = nullptr;
  int64_t checkpoint_every_steps = 0;
  // Optional.
  ServiceMetrics* metrics = nullptr;
};

class OptimizerService final : public natgrad::v1::OptimizerService::CallbackService {
 public:
  explicit OptimizerService(ServiceDependencies deps);

  grpc::ServerUnaryReactor* CreateSession(
      grpc::CallbackServerContext* context,
      const natgrad::v1::CreateSessionRequest* request,
      natgrad::v1::Session* response) override;
  grpc::ServerUnaryReactor* GetSession(grpc::CallbackServerContext* context,
                                       const natgrad::v1::GetSessionRequest* request,
                                       natgrad::v1::Session* response) override;
  grpc::ServerUnaryReactor* ListSessions(
      grpc::CallbackServerContext* context,
      const natgrad::v1::ListSessionsRequest* request,
      natgrad::v1::ListSessionsResponse* response) override;
  grpc::ServerUnaryReactor* DeleteSession(
      grpc::CallbackServerContext* context,
      const natgrad::v1::DeleteSessionRequest* request,
      google::protobuf::Empty* response) override;
  grpc::ServerBidiReactor<natgrad::v1::StepRequest, natgrad::v1::StepResponse>*
  Step(grpc::CallbackServerContext* context) override;
  grpc::ServerUnaryReactor* ExportSession(
      grpc::CallbackServerContext* context,
      const natgrad::v1::ExportSessionRequest* request,
      natgrad::v1::SessionSnapshot* response) override;
  grpc::ServerUnaryReactor* ImportSession(
      grpc::CallbackServerContext* context,
      const natgrad::v1::ImportSessionRequest* request,
      natgrad::v1::Session* response) override;

  const ServiceDependencies& deps() const { return deps_; }

 private:
  ServiceDependencies deps_;
};

}  // namespace natgrad::service

#endif  // NATGRAD_SERVER_SERVICE_OPTIMIZER_SERVICE_H_
