#include "client/cpp/natgrad_client.h"

#include <thread>

#include "absl/random/random.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace natgrad::client {
namespace {

absl::Status ToAbsl(const grpc::Status& s) {
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
}

}  // namespace

bool IsRetryable(const absl::Status& status) {
  switch (status.code()) {
    case absl::StatusCode::kUnavailable:
    case absl::StatusCode::kCancelled:
    case absl::StatusCode::kAborted:
    case absl::StatusCode::kDeadlineExceeded:
      return true;
    case absl::StatusCode::kFailedPrecondition:
      // The server still holds our previous (dropped) stream for a moment.
      return absl::StrContains(status.message(), "stream already open");
    default:
      return false;
  }
}

Client::Client(ClientOptions options) : options_(std::move(options)) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(static_cast<int>(options_.max_message_bytes));
  args.SetMaxSendMessageSize(static_cast<int>(options_.max_message_bytes));
  auto creds = options_.credentials ? options_.credentials : grpc::InsecureChannelCredentials();
  channel_ = grpc::CreateCustomChannel(options_.target, creds, args);
  stub_ = natgrad::v1::OptimizerService::NewStub(channel_);
}

void Client::PrepareContext(grpc::ClientContext& context) const {
  if (!options_.bearer_token.empty()) {
    context.AddMetadata("authorization", "Bearer " + options_.bearer_token);
  }
}

absl::StatusOr<natgrad::v1::Session> Client::CreateSession(
    const natgrad::v1::SessionConfig& config, const std::string& session_id) {
  grpc::ClientContext ctx;
  PrepareContext(ctx);
  natgrad::v1::CreateSessionRequest req;
  *req.mutable_config() = config;
  req.set_session_id(session_id);
  natgrad::v1::Session out;
  grpc::Status s = stub_->CreateSession(&ctx, req, &out);
  if (!s.ok()) return ToAbsl(s);
  return out;
}

absl::StatusOr<natgrad::v1::Session> Client::GetSession(const std::string& name) {
  grpc::ClientContext ctx;
  PrepareContext(ctx);
  natgrad::v1::GetSessionRequest req;
  req.set_name(name);
  natgrad::v1::Session out;
  grpc::Status s = stub_->GetSession(&ctx, req, &out);
  if (!s.ok()) return ToAbsl(s);
  return out;
}

absl::StatusOr<std::vector<natgrad::v1::Session>> Client::ListSessions() {
  std::vector<natgrad::v1::Session> all;
  std::string token;
  do {
    grpc::ClientContext ctx;
    PrepareContext(ctx);
    natgrad::v1::ListSessionsRequest req;
    req.set_page_token(token);
    natgrad::v1::ListSessionsResponse out;
    grpc::Status s = stub_->ListSessions(&ctx, req, &out);
    if (!s.ok()) return ToAbsl(s);
    for (auto& session : *out.mutable_sessions()) all.push_back(std::move(session));
    token = out.next_page_token();
  } while (!token.empty());
  return all;
}

absl::Status Client::DeleteSession(const std::string& name) {
  grpc::ClientContext ctx;
  PrepareContext(ctx);
  natgrad::v1::DeleteSessionRequest req;
  req.set_name(name);
  google::protobuf::Empty out;
  return ToAbsl(stub_->DeleteSession(&ctx, req, &out));
}

absl::StatusOr<natgrad::v1::SessionSnapshot> Client::ExportSession(const std::string& name) {
  grpc::ClientContext ctx;
  PrepareContext(ctx);
  natgrad::v1::ExportSessionRequest req;
  req.set_name(name);
  natgrad::v1::SessionSnapshot out;
  grpc::Status s = stub_->ExportSession(&ctx, req, &out);
  if (!s.ok()) return ToAbsl(s);
  return out;
}

absl::StatusOr<natgrad::v1::Session> Client::ImportSession(
    const natgrad::v1::SessionSnapshot& snapshot, const std::string& session_id) {
  grpc::ClientContext ctx;
  PrepareContext(ctx);
  natgrad::v1::ImportSessionRequest req;
  *req.mutable_snapshot() = snapshot;
  req.set_session_id(session_id);
  natgrad::v1::Session out;
  grpc::Status s = stub_->ImportSession(&ctx, req, &out);
  if (!s.ok()) return ToAbsl(s);
  return out;
}

absl::StatusOr<std::unique_ptr<SessionStream>> Client::OpenStream(const std::string& name) {
  auto session = GetSession(name);
  if (!session.ok()) return session.status();
  return std::make_unique<SessionStream>(this, session->name(), session->last_step() + 1);
}

SessionStream::SessionStream(Client* client, std::string name, int64_t next_step)
    : client_(client), name_(std::move(name)), next_step_(next_step) {}

SessionStream::~SessionStream() {
  if (stream_ != nullptr) {
    context_->TryCancel();
    stream_->Finish().IgnoreError();
  }
}

absl::Status SessionStream::EnsureOpen() {
  if (stream_ != nullptr) return absl::OkStatus();
  context_ = std::make_unique<grpc::ClientContext>();
  client_->PrepareContext(*context_);
  stream_ = client_->stub().Step(context_.get());
  if (stream_ == nullptr) return absl::UnavailableError("cannot open Step stream");
  return absl::OkStatus();
}

absl::Status SessionStream::FinishStream() {
  if (stream_ == nullptr) return absl::OkStatus();
  grpc::Status s = stream_->Finish();
  stream_.reset();
  context_.reset();
  return ToAbsl(s);
}

absl::StatusOr<natgrad::v1::StepResponse> SessionStream::Attempt(
    int64_t step, const std::vector<natgrad::v1::BlockStep>& blocks,
    std::optional<double> loss) {
  if (absl::Status s = EnsureOpen(); !s.ok()) return s;
  const int per = std::max(1, client_->options().max_blocks_per_message);
  const size_t n = blocks.size();
  for (size_t start = 0; start < n || start == 0; start += per) {
    natgrad::v1::StepRequest req;
    req.set_session(name_);
    req.set_step(step);
    for (size_t i = start; i < std::min(n, start + per); ++i) *req.add_blocks() = blocks[i];
    const bool last = start + per >= n;
    req.set_last(last);
    if (last && loss.has_value()) req.set_loss(*loss);
    if (!stream_->Write(req)) {
      // The stream is broken; its status says why.
      absl::Status s = FinishStream();
      return s.ok() ? absl::UnavailableError("Step stream closed") : s;
    }
    if (last) break;
  }
  natgrad::v1::StepResponse response;
  if (!stream_->Read(&response)) {
    absl::Status s = FinishStream();
    return s.ok() ? absl::UnavailableError("Step stream closed before the response") : s;
  }
  return response;
}

absl::StatusOr<natgrad::v1::StepResponse> SessionStream::StepNumbered(
    int64_t step, const std::vector<natgrad::v1::BlockStep>& blocks,
    std::optional<double> loss) {
  absl::Duration backoff = client_->options().initial_backoff;
  absl::BitGen gen;
  for (int attempt = 0;; ++attempt) {
    auto response = Attempt(step, blocks, loss);
    if (response.ok()) {
      if (step >= next_step_) next_step_ = step + 1;
      return response;
    }
    if (!IsRetryable(response.status()) || attempt >= client_->options().max_retries) {
      return response.status();
    }
    ++reconnects_;
    // Jittered exponential backoff so many clients do not retry in lockstep.
    std::this_thread::sleep_for(absl::ToChronoMicroseconds(
        backoff * absl::Uniform(gen, 0.5, 1.5)));
    backoff = std::min(backoff * 2, absl::Seconds(2));
  }
}

absl::StatusOr<natgrad::v1::StepResponse> SessionStream::Step(
    const std::vector<natgrad::v1::BlockStep>& blocks, std::optional<double> loss) {
  return StepNumbered(next_step_, blocks, loss);
}

absl::Status SessionStream::Close() {
  if (stream_ == nullptr) return absl::OkStatus();
  stream_->WritesDone();
  return FinishStream();
}

void SessionStream::DropStream() {
  if (context_ != nullptr) context_->TryCancel();
  if (stream_ != nullptr) FinishStream().IgnoreError();
}

}  // namespace natgrad::client
