#include "server/service/rpc_logging.h"

#include <algorithm>
#include <string>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "grpcpp/server_context.h"
#include "server/common/log.h"

namespace natgrad::service {
namespace {

using grpc::experimental::InterceptionHookPoints;

constexpr absl::string_view kStepMethod = "/natgrad.v1.OptimizerService/Step";

std::string CodeName(absl::StatusCode code) {
  return absl::AsciiStrToUpper(absl::StatusCodeToString(code));
}

class RpcLoggingInterceptor final : public grpc::experimental::Interceptor {
 public:
  explicit RpcLoggingInterceptor(grpc::experimental::ServerRpcInfo* info) : info_(info) {}

  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    if (methods->QueryInterceptionHookPoint(InterceptionHookPoints::PRE_SEND_STATUS)) {
      const grpc::Status status = methods->GetSendStatus();
      if (!status.ok()) {
        // The routing headers (docs/replicas.md) say which replica the
        // client thought it was talking to: useful when a redirect loops.
        std::string routing;
        if (const auto* ctx = info_->server_context(); ctx != nullptr) {
          for (const char* h : {"natgrad-session-key", "natgrad-replica"}) {
            auto it = ctx->client_metadata().find(h);
            if (it != ctx->client_metadata().end()) {
              absl::StrAppend(&routing, " ", h, "=",
                              absl::string_view(it->second.data(),
                                                std::min<size_t>(it->second.size(), 64)));
            }
          }
        }
        NATGRAD_LOG(kDebug, "rpc ", info_->method(), " failed: code=",
                    CodeName(static_cast<absl::StatusCode>(status.error_code())), " peer=",
                    info_->server_context() != nullptr ? info_->server_context()->peer() : "?",
                    routing, ": ", status.error_message());
      }
    }
    methods->Proceed();
  }

 private:
  grpc::experimental::ServerRpcInfo* const info_;
};

class RpcLoggingInterceptorFactory final
    : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  grpc::experimental::Interceptor* CreateServerInterceptor(
      grpc::experimental::ServerRpcInfo* info) override {
    // nullptr: no interceptor on this call, so Step streams keep gRPC's
    // fast path (see the header).
    if (info->method() == nullptr || absl::string_view(info->method()) == kStepMethod) {
      return nullptr;
    }
    return new RpcLoggingInterceptor(info);
  }
};

}  // namespace

void LogFailedStep(const absl::Status& status, absl::string_view session, int64_t step,
                   absl::string_view peer) {
  NATGRAD_LOG(kWarning, "step failed: code=", CodeName(status.code()),
              " session=", session.empty() ? "?" : session,
              " step=", step == 0 ? std::string("?") : absl::StrCat(step), " peer=", peer, ": ",
              status.message());
}

std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>
MakeRpcLoggingInterceptorFactory() {
  return std::make_unique<RpcLoggingInterceptorFactory>();
}

}  // namespace natgrad::service
