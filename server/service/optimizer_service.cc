#include "server/service/optimizer_service.h"

#include <algorithm>
#include <new>

#include <iostream>
#include "absl/strings/numbers.h"
#include "grpcpp/impl/codegen/proto_utils.h"
#include "grpcpp/support/proto_buffer_reader.h"
#include "absl/strings/str_cat.h"
#include "server/common/log.h"
#include "server/service/service_metrics.h"
#include "server/service/status_conversion.h"
#include "server/service/step_reactor.h"

namespace natgrad::service {
namespace {

constexpr int kDefaultPageSize = 50;
constexpr int kMaxPageSize = 1000;

// Runs `body` with the caller's tenant and finishes the unary call with its
// status, counting errors.
template <typename Body>
grpc::ServerUnaryReactor* Unary(const ServiceDependencies& deps,
                                grpc::CallbackServerContext* context, Body body) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  absl::Status status;
  auto tenant = deps.authenticator->Authenticate(*context);
  if (!tenant.ok()) {
    status = tenant.status();
  } else {
    status = body(*tenant);
  }
  if (!status.ok() && deps.metrics) {
    deps.metrics->RpcError(static_cast<grpc::StatusCode>(status.code()));
  }
  reactor->Finish(ToGrpcStatus(status));
  return reactor;
}

// Unary() over raw bytes: after authentication, the request is decoded
// (INVALID_ARGUMENT naming the message type when it cannot be), `body` runs
// on the decoded request, and its response is encoded. A failed allocation
// anywhere in it is RESOURCE_EXHAUSTED, not a crash.
template <typename Request, typename Response, typename Body>
grpc::ServerUnaryReactor* RawUnary(const ServiceDependencies& deps,
                                   grpc::CallbackServerContext* context,
                                   const grpc::ByteBuffer* in, grpc::ByteBuffer* out,
                                   Body body) {
  return Unary(deps, context, [&](const std::string& tenant) -> absl::Status {
    try {
      Request request;
      Response response;
      grpc::ByteBuffer copy = *in;  // deserializing consumes the buffer
      const size_t bytes = copy.Length();
      if (!grpc::GenericDeserialize<grpc::ProtoBufferReader, Request>(&copy, &request).ok()) {
        return absl::InvalidArgumentError(absl::StrCat(
            "request: ", bytes, " bytes that are not a decodable ",
            Request::descriptor()->full_name()));
      }
      absl::Status status = body(tenant, &request, &response);
      if (!status.ok()) return status;
      bool own = false;
      grpc::Status encoded =
          grpc::SerializationTraits<Response>::Serialize(response, out, &own);
      if (!encoded.ok()) {
        return absl::InternalError(absl::StrCat("response: ", encoded.error_message()));
      }
      return absl::OkStatus();
    } catch (const std::bad_alloc&) {
      return absl::ResourceExhaustedError(
          "request: the server could not allocate memory for it");
    }
  });
}

}  // namespace

OptimizerService::OptimizerService(ServiceDependencies deps) : deps_(deps) {}

grpc::ServerUnaryReactor* OptimizerService::CreateSession(grpc::CallbackServerContext* context,
    const Bytes* request_bytes, Bytes* response_bytes) {
  using Request = natgrad::v1::CreateSessionRequest;
  using Response = natgrad::v1::Session;
  return RawUnary<Request, Response>(deps_, context, request_bytes, response_bytes,
      [&](const std::string& tenant, const Request* request, Response* response) -> absl::Status {
    auto session = deps_.registry->Create(request->config(), tenant, request->session_id());
    if (!session.ok()) return session.status();
    *response = (*session)->Describe();
    NATGRAD_LOG(kInfo, "session ", (*session)->name(), " created: tenant=",
                tenant.empty() ? "-" : tenant, " blocks=", request->config().blocks_size());
    if (deps_.metrics) deps_.metrics->SetSessions(deps_.registry->size());
    if (deps_.checkpoints != nullptr) {
      // A new session is durable at once, so a crash before its first
      // checkpointed step still leaves it restorable.
      absl::Status written = deps_.checkpoints->Write((*session)->Snapshot());
      if (!written.ok()) std::cerr << "natgrad-server: error: " << "checkpoint: " << written << std::endl;
    }
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* OptimizerService::GetSession(grpc::CallbackServerContext* context,
    const Bytes* request_bytes, Bytes* response_bytes) {
  using Request = natgrad::v1::GetSessionRequest;
  using Response = natgrad::v1::Session;
  return RawUnary<Request, Response>(deps_, context, request_bytes, response_bytes,
      [&](const std::string& tenant, const Request* request, Response* response) -> absl::Status {
    auto session = deps_.registry->Get(request->name(), tenant);
    if (!session.ok()) return session.status();
    *response = (*session)->Describe();
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* OptimizerService::ListSessions(grpc::CallbackServerContext* context,
    const Bytes* request_bytes, Bytes* response_bytes) {
  using Request = natgrad::v1::ListSessionsRequest;
  using Response = natgrad::v1::ListSessionsResponse;
  return RawUnary<Request, Response>(deps_, context, request_bytes, response_bytes,
      [&](const std::string& tenant, const Request* request, Response* response) -> absl::Status {
    if (request->page_size() < 0) {
      return absl::InvalidArgumentError("page_size: must be >= 0");
    }
    const int size = request->page_size() == 0
                         ? kDefaultPageSize
                         : std::min(request->page_size(), kMaxPageSize);
    // The page token is the last id of the previous page: stable under
    // concurrent creates and deletes.
    std::string after = request->page_token();
    if (!after.empty()) {
      auto id = session::SessionRegistry::ParseName(after);
      if (!id.ok()) return absl::InvalidArgumentError("page_token: invalid");
      after = *id;
    }
    auto page = deps_.registry->List(tenant, after, size + 1);
    const bool more = static_cast<int>(page.size()) > size;
    if (more) page.pop_back();
    for (const auto& s : page) *response->add_sessions() = s->Describe();
    if (more) response->set_next_page_token(page.back()->id());
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* OptimizerService::DeleteSession(grpc::CallbackServerContext* context,
    const Bytes* request_bytes, Bytes* response_bytes) {
  using Request = natgrad::v1::DeleteSessionRequest;
  using Response = google::protobuf::Empty;
  return RawUnary<Request, Response>(deps_, context, request_bytes, response_bytes,
      [&](const std::string& tenant, const Request* request, Response* /*empty*/) -> absl::Status {
    auto session = deps_.registry->Get(request->name(), tenant);
    if (!session.ok()) return session.status();
    if (absl::Status s = deps_.registry->Delete(request->name(), tenant); !s.ok()) return s;
    NATGRAD_LOG(kInfo, "session ", (*session)->name(), " deleted: tenant=",
                tenant.empty() ? "-" : tenant, " last_step=", (*session)->last_step());
    if (deps_.checkpoints != nullptr) {
      absl::Status removed = deps_.checkpoints->Remove(tenant, (*session)->id());
      if (!removed.ok()) std::cerr << "natgrad-server: error: " << "checkpoint: " << removed << std::endl;
    }
    if (deps_.metrics) deps_.metrics->SetSessions(deps_.registry->size());
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* OptimizerService::ExportSession(grpc::CallbackServerContext* context,
    const Bytes* request_bytes, Bytes* response_bytes) {
  using Request = natgrad::v1::ExportSessionRequest;
  using Response = natgrad::v1::SessionSnapshot;
  return RawUnary<Request, Response>(deps_, context, request_bytes, response_bytes,
      [&](const std::string& tenant, const Request* request, Response* response) -> absl::Status {
    auto session = deps_.registry->Get(request->name(), tenant);
    if (!session.ok()) return session.status();
    *response = (*session)->Snapshot();
    response->clear_tenant();  // the importing server assigns its own
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* OptimizerService::ImportSession(grpc::CallbackServerContext* context,
    const Bytes* request_bytes, Bytes* response_bytes) {
  using Request = natgrad::v1::ImportSessionRequest;
  using Response = natgrad::v1::Session;
  return RawUnary<Request, Response>(deps_, context, request_bytes, response_bytes,
      [&](const std::string& tenant, const Request* request, Response* response) -> absl::Status {
    auto session =
        deps_.registry->Import(request->snapshot(), tenant, request->session_id());
    if (!session.ok()) return session.status();
    *response = (*session)->Describe();
    NATGRAD_LOG(kInfo, "session ", (*session)->name(), " created (imported): tenant=",
                tenant.empty() ? "-" : tenant, " last_step=", (*session)->last_step());
    if (deps_.checkpoints != nullptr) {
      absl::Status written = deps_.checkpoints->Write((*session)->Snapshot());
      if (!written.ok()) std::cerr << "natgrad-server: error: " << "checkpoint: " << written << std::endl;
    }
    if (deps_.metrics) deps_.metrics->SetSessions(deps_.registry->size());
    return absl::OkStatus();
  });
}

grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* OptimizerService::Step(grpc::CallbackServerContext* context) {
  return new StepReactor(deps_, context);
}

}  // namespace natgrad::service
