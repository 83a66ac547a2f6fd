#include "client/cpp/natgrad_client.h"

#include <thread>

#include "absl/random/random.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "google/protobuf/io/coded_stream.h"
#include "google/protobuf/io/zero_copy_stream_impl_lite.h"

namespace natgrad::client {
namespace {

absl::Status ToAbsl(const grpc::Status& s) {
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
}

}  // namespace

std::string Normalized(const natgrad::v1::StepResponse& response) {
  natgrad::v1::StepResponse r = response;
  r.clear_timing();
  r.clear_replayed();
  r.clear_durable_step();
  std::string out;
  {
    google::protobuf::io::StringOutputStream sink(&out);
    google::protobuf::io::CodedOutputStream coded(&sink);
    coded.SetSerializationDeterministic(true);  // map order (hyperparameters)
    r.SerializeToCodedStream(&coded);
  }
  return out;
}

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
  return std::make_unique<SessionStream>(this, session->name(), session->last_step() + 1,
                                         session->durable_step());
}

SessionStream::SessionStream(Client* client, std::string name, int64_t next_step,
                             int64_t durable_step)
    : client_(client), name_(std::move(name)), next_step_(next_step),
      durable_step_(durable_step) {}

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
  reopen_check_ = true;
  grpc::Status s = stream_->Finish();
  stream_.reset();
  context_.reset();
  return ToAbsl(s);
}

std::vector<natgrad::v1::StepRequest> SessionStream::Requests(
    int64_t step, const std::vector<natgrad::v1::BlockStep>& blocks,
    std::optional<double> loss) const {
  const int per = std::max(1, client_->options().max_blocks_per_message);
  const size_t n = blocks.size();
  std::vector<natgrad::v1::StepRequest> out;
  for (size_t start = 0; start < n || start == 0; start += per) {
    natgrad::v1::StepRequest& req = out.emplace_back();
    req.set_session(name_);
    req.set_step(step);
    for (size_t i = start; i < std::min(n, start + per); ++i) *req.add_blocks() = blocks[i];
    const bool last = start + per >= n;
    req.set_last(last);
    if (last && loss.has_value()) req.set_loss(*loss);
    if (last) break;
  }
  return out;
}

absl::StatusOr<natgrad::v1::StepResponse> SessionStream::Exchange(
    const std::vector<natgrad::v1::StepRequest>& requests) {
  if (absl::Status s = EnsureOpen(); !s.ok()) return s;
  for (const natgrad::v1::StepRequest& req : requests) {
    if (!stream_->Write(req)) {
      // The stream is broken; its status says why.
      absl::Status s = FinishStream();
      return s.ok() ? absl::UnavailableError("Step stream closed") : s;
    }
  }
  natgrad::v1::StepResponse response;
  if (!stream_->Read(&response)) {
    absl::Status s = FinishStream();
    return s.ok() ? absl::UnavailableError("Step stream closed before the response") : s;
  }
  return response;
}

absl::Status SessionStream::Reopen(int64_t step) {
  const int64_t acked = next_step_ - 1;
  auto info = client_->GetSession(name_);
  if (!info.ok()) {
    if (info.status().code() != absl::StatusCode::kNotFound) return info.status();
    return absl::NotFoundError(absl::StrCat(
        "Step ", name_, " step ", step,
        ": the session is gone from the server (restarted without its checkpoint, or deleted) "
        "after this client had step ", acked, " acknowledged; ",
        durable_step_ < 0 ? std::string("the server keeps no checkpoints (durable_step -1)")
                          : absl::StrCat("its last durable step was ", durable_step_),
        ". Nothing was attached: restore from your own checkpoint"));
  }
  const int64_t at = info->last_step();
  if (at >= acked) return absl::OkStatus();
  // kept_ holds consecutive steps; it must cover at+1 .. acked.
  if (kept_.empty() || kept_.front().step > at + 1 || kept_.back().step < acked) {
    const std::string held =
        kept_.empty() ? std::string("no steps")
                      : absl::StrCat("steps ", kept_.front().step, "..", kept_.back().step);
    return absl::DataLossError(absl::StrCat(
        "Step ", name_, " step ", step, ": the server's session is at step ", at,
        " (durable step ", info->durable_step(), ") but this client had step ", acked,
        " acknowledged and holds ", held, " to send again; the server lost ", acked - at,
        " acknowledged steps. Nothing was attached: restore from your own checkpoint (or raise "
        "max_replay_steps / checkpoint more often)"));
  }
  int64_t replayed = 0;
  for (const KeptStep& k : kept_) {
    if (k.step <= at) continue;
    auto response = Exchange(k.requests);
    if (!response.ok()) return response.status();  // a drop: retried, resumes from the server
    if (response->step() != k.step || Normalized(*response) != k.response) {
      DropStream();
      return absl::DataLossError(absl::StrCat(
          "Step ", name_, ": step ", k.step, " sent again after a server restart answered "
          "differently than the first time (response for step ", response->step(),
          "); the server's state no longer matches this client's: restore from your own "
          "checkpoint"));
    }
    durable_step_ = response->durable_step();
    ++replayed;
  }
  replayed_steps_ += replayed;
  Trim();
  return absl::OkStatus();
}

void SessionStream::Keep(int64_t step, std::vector<natgrad::v1::StepRequest> requests,
                         const natgrad::v1::StepResponse& response) {
  durable_step_ = response.durable_step();
  if (client_->options().max_replay_steps > 0 && durable_step_ >= 0 && step > durable_step_ &&
      (kept_.empty() || kept_.back().step == step - 1)) {
    KeptStep& k = kept_.emplace_back();
    k.step = step;
    k.response = Normalized(response);
    k.bytes = static_cast<int64_t>(k.response.size());
    for (const auto& r : requests) k.bytes += static_cast<int64_t>(r.ByteSizeLong());
    k.requests = std::move(requests);
    kept_bytes_ += k.bytes;
  }
  Trim();
}

void SessionStream::Trim() {
  // Durable steps are safe on the server; beyond max_replay_steps or
  // max_replay_bytes the oldest go (a restart that loses them is DATA_LOSS).
  const int64_t max = client_->options().max_replay_steps;
  const int64_t max_bytes = client_->options().max_replay_bytes;
  while (!kept_.empty() && (durable_step_ < 0 || kept_.front().step <= durable_step_ ||
                            static_cast<int64_t>(kept_.size()) > max || kept_bytes_ > max_bytes)) {
    kept_bytes_ -= kept_.front().bytes;
    kept_.pop_front();
  }
}

absl::StatusOr<natgrad::v1::StepResponse> SessionStream::Attempt(
    int64_t step, const std::vector<natgrad::v1::StepRequest>& requests) {
  if (stream_ == nullptr && reopen_check_ && next_step_ > 1) {
    if (absl::Status s = Reopen(step); !s.ok()) return s;
  }
  if (absl::Status s = EnsureOpen(); !s.ok()) return s;
  reopen_check_ = false;
  return Exchange(requests);
}

absl::StatusOr<natgrad::v1::StepResponse> SessionStream::StepNumbered(
    int64_t step, const std::vector<natgrad::v1::BlockStep>& blocks,
    std::optional<double> loss) {
  absl::Duration backoff = client_->options().initial_backoff;
  absl::BitGen gen;
  // Only the next step in order is kept for replay (explicit numbers are
  // retries or ordering tests).
  const bool next = step == next_step_;
  std::vector<natgrad::v1::StepRequest> requests = Requests(step, blocks, loss);
  for (int attempt = 0;; ++attempt) {
    auto response = Attempt(step, requests);
    if (response.ok()) {
      if (next) {
        Keep(step, std::move(requests), *response);
      } else {
        durable_step_ = response->durable_step();
        Trim();
      }
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
