#include "server/service/rpc_logging.h"

#include <cstdint>
#include <string>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "grpcpp/server_context.h"
#include "natgrad/v1/step.pb.h"
#include "server/common/log.h"

namespace natgrad::service {
namespace {

using grpc::experimental::InterceptionHookPoints;

constexpr absl::string_view kStepMethod = "/natgrad.v1.OptimizerService/Step";

std::string CodeName(grpc::StatusCode code) {
  return absl::AsciiStrToUpper(absl::StatusCodeToString(static_cast<absl::StatusCode>(code)));
}

class RpcLoggingInterceptor final : public grpc::experimental::Interceptor {
 public:
  explicit RpcLoggingInterceptor(grpc::experimental::ServerRpcInfo* info)
      : info_(info),
        step_stream_(info->method() != nullptr && absl::string_view(info->method()) == kStepMethod) {}

  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    if (step_stream_ &&
        methods->QueryInterceptionHookPoint(InterceptionHookPoints::POST_RECV_MESSAGE)) {
      // Already deserialized by gRPC; nullptr when the read failed.
      const auto* request = static_cast<const natgrad::v1::StepRequest*>(methods->GetRecvMessage());
      if (request != nullptr) {
        absl::MutexLock lock(&mu_);
        if (!request->session().empty()) session_ = request->session();
        if (request->step() != 0) step_ = request->step();
      }
    }
    if (methods->QueryInterceptionHookPoint(InterceptionHookPoints::PRE_SEND_STATUS)) {
      const grpc::Status status = methods->GetSendStatus();
      if (!status.ok()) Log(status);
    }
    methods->Proceed();
  }

 private:
  void Log(const grpc::Status& status) {
    const std::string peer = info_->server_context() != nullptr
                                 ? info_->server_context()->peer()
                                 : std::string("?");
    if (!step_stream_) {
      NATGRAD_LOG(kDebug, "rpc ", info_->method(), " failed: code=", CodeName(status.error_code()),
                  " peer=", peer, ": ", status.error_message());
      return;
    }
    std::string session, step;
    {
      absl::MutexLock lock(&mu_);
      session = session_.empty() ? "?" : session_;
      step = step_ == 0 ? "?" : absl::StrCat(step_);
    }
    // CANCELLED is the client going away mid-stream, not a step the server
    // rejected.
    if (status.error_code() == grpc::StatusCode::CANCELLED) {
      NATGRAD_LOG(kDebug, "step stream cancelled: session=", session, " received_step=", step,
                  " peer=", peer, ": ", status.error_message());
      return;
    }
    NATGRAD_LOG(kWarning, "step failed: code=", CodeName(status.error_code()),
                " session=", session, " received_step=", step, " peer=", peer, ": ",
                status.error_message());
  }

  grpc::experimental::ServerRpcInfo* const info_;
  const bool step_stream_;
  absl::Mutex mu_;
  std::string session_ ABSL_GUARDED_BY(mu_);
  int64_t step_ ABSL_GUARDED_BY(mu_) = 0;
};

class RpcLoggingInterceptorFactory final
    : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  grpc::experimental::Interceptor* CreateServerInterceptor(
      grpc::experimental::ServerRpcInfo* info) override {
    return new RpcLoggingInterceptor(info);
  }
};

}  // namespace

std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>
MakeRpcLoggingInterceptorFactory() {
  return std::make_unique<RpcLoggingInterceptorFactory>();
}

}  // namespace natgrad::service
