#include "server/service/optimizer_service.h"

#include <algorithm>
#include <new>

#include "absl/strings/numbers.h"
#include "grpcpp/impl/codegen/proto_utils.h"
#include "grpcpp/support/proto_buffer_reader.h"
#include "absl/strings/str_cat.h"
#include "server/common/log.h"
#include "server/service/service_metrics.h"
#include "server/service/session_moves.h"
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

// The redirect for a session this replica no longer holds, checked before
// the registry (during a move's last instant both may know it).
absl::Status CheckMoved(const ServiceDependencies& deps, const std::string& tenant,
                        const std::string& name) {
  if (deps.moves == nullptr) return absl::OkStatus();
  auto id = session::SessionRegistry::ParseName(name);
  if (!id.ok()) return absl::OkStatus();  // the registry reports the bad name
  return deps.moves->CheckNotMoved(tenant, *id);
}

// A draining replica sends new sessions to a peer; an id that was moved
// away is redirected to where it lives.
absl::Status CheckCreatable(const ServiceDependencies& deps, const std::string& tenant,
                            const std::string& id) {
  if (deps.moves == nullptr) return absl::OkStatus();
  if (!id.empty()) {
    if (absl::Status s = deps.moves->CheckNotMoved(tenant, id); !s.ok()) return s;
  }
  return deps.moves->RedirectNew(id);
}

}  // namespace

// A new or imported session is acknowledged only once it is durable. When
// its first write fails it is taken out again (the registry, then the files:
// a failed rename or directory fsync may have left some), so nothing of it
// remains and the client gets UNAVAILABLE.
absl::Status MakeDurableOrDrop(const ServiceDependencies& deps, session::Session& session,
                               const std::string& tenant) {
  if (deps.checkpoints == nullptr) return absl::OkStatus();
  absl::Status written = deps.checkpoints->Write(session);
  if (written.ok()) return written;
  if (absl::IsNotFound(written)) return absl::NotFoundError(
      absl::StrCat("session ", session.name(), " was deleted"));
  // Unless the client deleted it meanwhile (and its delete removed the files;
  // another session may hold the id by now).
  if (auto held = deps.registry->Get(session.name(), tenant);
      held.ok() && held->get() == &session) {
    deps.registry->Delete(session.name(), tenant).IgnoreError();  // marks it deleted
    deps.checkpoints->Remove(session).IgnoreError();
  }
  return absl::UnavailableError(absl::StrCat("checkpoint of ", session.name(),
                                             " failed: ", written.message(),
                                             "; the session is not created"));
}

// Session::Describe, with durable_step -1 when nothing is checkpointed
// (the proto's contract; the session does not know whether a store exists).
natgrad::v1::Session DescribeSession(const ServiceDependencies& deps, const session::Session& s) {
  natgrad::v1::Session out = s.Describe();
  if (deps.checkpoints == nullptr) out.set_durable_step(-1);
  out.set_replica(deps.replica_name);
  return out;
}

namespace {

natgrad::v1::Session Describe(const ServiceDependencies& deps, const session::Session& s) {
  return DescribeSession(deps, s);
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
    if (absl::Status s = CheckCreatable(deps_, tenant, request->session_id()); !s.ok()) return s;
    auto session = deps_.registry->Create(request->config(), tenant, request->session_id());
    if (!session.ok()) return session.status();
    // Durable at once, so a crash before its first checkpointed step still
    // leaves it restorable.
    absl::Status durable = MakeDurableOrDrop(deps_, **session, tenant);
    if (deps_.metrics) deps_.metrics->SetSessions(deps_.registry->size());
    if (!durable.ok()) return durable;
    *response = Describe(deps_, **session);
    NATGRAD_LOG(kInfo, "session ", (*session)->name(), " created: tenant=",
                tenant.empty() ? "-" : tenant, " blocks=", request->config().blocks_size());
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* OptimizerService::GetSession(grpc::CallbackServerContext* context,
    const Bytes* request_bytes, Bytes* response_bytes) {
  using Request = natgrad::v1::GetSessionRequest;
  using Response = natgrad::v1::Session;
  return RawUnary<Request, Response>(deps_, context, request_bytes, response_bytes,
      [&](const std::string& tenant, const Request* request, Response* response) -> absl::Status {
    if (absl::Status s = CheckMoved(deps_, tenant, request->name()); !s.ok()) return s;
    auto session = deps_.registry->Get(request->name(), tenant);
    if (!session.ok()) return session.status();
    *response = Describe(deps_, **session);
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
    for (const auto& s : page) *response->add_sessions() = Describe(deps_, *s);
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
    if (absl::Status s = CheckMoved(deps_, tenant, request->name()); !s.ok()) return s;
    auto session = deps_.registry->Get(request->name(), tenant);
    if (!session.ok()) return session.status();
    // Through the move gate: a session being moved is not deleted under the
    // move (the delete waits, then is redirected or goes ahead).
    if (deps_.moves != nullptr) {
      if (absl::Status s = deps_.moves->Enter(tenant, (*session)->id()); !s.ok()) return s;
    }
    absl::Status deleted = deps_.registry->Delete(request->name(), tenant);
    if (deps_.moves != nullptr) deps_.moves->Exit(tenant, (*session)->id());
    if (!deleted.ok()) return deleted;
    NATGRAD_LOG(kInfo, "session ", (*session)->name(), " deleted: tenant=",
                tenant.empty() ? "-" : tenant, " last_step=", (*session)->last_step());
    if (deps_.metrics) deps_.metrics->SetSessions(deps_.registry->size());
    if (deps_.checkpoints != nullptr) {
      // After the registry marked it deleted: no write of it can follow the
      // removal (Checkpointer). A removal that fails is not acknowledged as
      // a delete: the files would bring the session back at restart.
      absl::Status removed = deps_.checkpoints->Remove(**session);
      if (!removed.ok()) {
        return absl::InternalError(absl::StrCat(
            "session ", (*session)->name(), " is deleted from memory but its checkpoint "
            "could not be removed (", removed.message(), "); it may be restored at the next "
            "start"));
      }
    }
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* OptimizerService::ExportSession(grpc::CallbackServerContext* context,
    const Bytes* request_bytes, Bytes* response_bytes) {
  using Request = natgrad::v1::ExportSessionRequest;
  using Response = natgrad::v1::SessionSnapshot;
  return RawUnary<Request, Response>(deps_, context, request_bytes, response_bytes,
      [&](const std::string& tenant, const Request* request, Response* response) -> absl::Status {
    if (absl::Status s = CheckMoved(deps_, tenant, request->name()); !s.ok()) return s;
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
    std::string wanted = request->session_id();
    if (wanted.empty()) {
      if (auto id = session::SessionRegistry::ParseName(request->snapshot().name()); id.ok()) {
        wanted = *id;
      }
    }
    if (absl::Status s = CheckCreatable(deps_, tenant, wanted); !s.ok()) return s;
    auto session =
        deps_.registry->Import(request->snapshot(), tenant, request->session_id());
    if (!session.ok()) return session.status();
    absl::Status durable = MakeDurableOrDrop(deps_, **session, tenant);
    if (deps_.metrics) deps_.metrics->SetSessions(deps_.registry->size());
    if (!durable.ok()) return durable;
    *response = Describe(deps_, **session);
    NATGRAD_LOG(kInfo, "session ", (*session)->name(), " created (imported): tenant=",
                tenant.empty() ? "-" : tenant, " last_step=", (*session)->last_step());
    return absl::OkStatus();
  });
}

grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* OptimizerService::Step(grpc::CallbackServerContext* context) {
  return new StepReactor(deps_, context);
}

}  // namespace natgrad::service
