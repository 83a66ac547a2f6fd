#include "client/cpp/natgrad_client.h"

#include <algorithm>
#include <climits>
#include <thread>

#include "absl/random/random.h"
#include "client/cpp/shared_memory.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "google/rpc/status.pb.h"
#include "google/protobuf/io/coded_stream.h"
#include "google/protobuf/io/zero_copy_stream.h"
#include "google/protobuf/io/zero_copy_stream_impl_lite.h"
#include "grpcpp/impl/codegen/proto_utils.h"
#include "grpcpp/support/proto_buffer_reader.h"
#include "grpcpp/support/slice.h"
#include "grpcpp/support/sync_stream.h"

namespace natgrad::client {
namespace {

constexpr char kSessionMovedTypeUrl[] = "type.googleapis.com/natgrad.v1.SessionMoved";

// A redirect's SessionMoved (grpc-status-details-bin) rides along as a
// payload, so callers see it through absl::Status (SessionMovedFrom).
absl::Status ToAbsl(const grpc::Status& s) {
  absl::Status out(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
  if (!s.ok() && !s.error_details().empty()) {
    google::rpc::Status details;
    if (details.ParseFromString(s.error_details())) {
      for (const auto& any : details.details()) {
        if (any.type_url() == kSessionMovedTypeUrl) {
          out.SetPayload(kSessionMovedTypeUrl, absl::Cord(any.value()));
        }
      }
    }
  }
  return out;
}

std::string BareId(const std::string& name) {
  absl::string_view id = name;
  absl::ConsumePrefix(&id, "sessions/");
  return std::string(id);
}

// Transparent gRPC retries (UNAVAILABLE, jittered backoff) for the calls
// that can be repeated blindly; the others are retried by Client::Call,
// which knows what a repeat means.
constexpr char kServiceConfig[] = R"({
  "methodConfig": [{
    "name": [
      {"service": "natgrad.v1.OptimizerService", "method": "GetSession"},
      {"service": "natgrad.v1.OptimizerService", "method": "ListSessions"},
      {"service": "natgrad.v1.OptimizerService", "method": "ExportSession"}
    ],
    "retryPolicy": {
      "maxAttempts": 4,
      "initialBackoff": "0.05s",
      "maxBackoff": "1s",
      "backoffMultiplier": 2,
      "retryableStatusCodes": ["UNAVAILABLE"]
    }
  }]
})";

// Gathers a serialization into gRPC slices: tags, lengths and small fields
// into blocks it allocates; an aliased write (a bytes field too large for the
// current block, with CodedOutputStream::EnableAliasing) becomes a slice that
// refers to the message's own string and holds a reference on the message,
// so a tensor payload reaches the socket without being copied in user space.
class SliceGatherStream final : public google::protobuf::io::ZeroCopyOutputStream {
 public:
  explicit SliceGatherStream(std::shared_ptr<const void> owner) : owner_(std::move(owner)) {}

  bool Next(void** data, int* size) override {
    CloseBlock();
    block_ = grpc::Slice(kBlockBytes);
    used_ = kBlockBytes;
    open_ = true;
    bytes_ += kBlockBytes;
    *data = const_cast<uint8_t*>(block_.begin());
    *size = static_cast<int>(kBlockBytes);
    return true;
  }
  void BackUp(int count) override {
    used_ -= static_cast<size_t>(count);
    bytes_ -= count;
  }
  int64_t ByteCount() const override { return bytes_; }
  bool AllowsAliasing() const override { return true; }
  bool WriteAliasedRaw(const void* data, int size) override {
    CloseBlock();
    if (size <= 0) return size == 0;
    slices_.emplace_back(const_cast<void*>(data), static_cast<size_t>(size), &DropOwner,
                         new std::shared_ptr<const void>(owner_));
    bytes_ += size;
    return true;
  }
  grpc::ByteBuffer Finish() {
    CloseBlock();
    return grpc::ByteBuffer(slices_.data(), slices_.size());
  }

 private:
  static constexpr size_t kBlockBytes = 8192;
  static void DropOwner(void* owner) { delete static_cast<std::shared_ptr<const void>*>(owner); }
  void CloseBlock() {
    if (!open_) return;
    open_ = false;
    if (used_ > 0) slices_.push_back(used_ == kBlockBytes ? block_ : block_.sub(0, used_));
    block_ = grpc::Slice();
  }

  std::shared_ptr<const void> owner_;
  std::vector<grpc::Slice> slices_;
  grpc::Slice block_;
  size_t used_ = 0;
  bool open_ = false;
  int64_t bytes_ = 0;
};

// The bytes Normalized() makes, without copying the response: the fields
// that may differ are taken out for the serialization and put back.
std::string NormalizedInPlace(natgrad::v1::StepResponse& r) {
  natgrad::v1::StepTiming* timing = r.release_timing();
  const bool replayed = r.replayed();
  const int64_t durable = r.durable_step();
  r.clear_replayed();
  r.clear_durable_step();
  std::string out;
  {
    google::protobuf::io::StringOutputStream sink(&out);
    google::protobuf::io::CodedOutputStream coded(&sink);
    coded.SetSerializationDeterministic(true);  // map order (hyperparameters)
    r.SerializeToCodedStream(&coded);
  }
  r.set_allocated_timing(timing);
  r.set_replayed(replayed);
  r.set_durable_step(durable);
  return out;
}

const grpc::internal::RpcMethod& StepMethod() {
  static const std::string* const name = new std::string(
      absl::StrCat("/", natgrad::v1::OptimizerService::service_full_name(), "/Step"));
  static const grpc::internal::RpcMethod* const method =
      new grpc::internal::RpcMethod(name->c_str(), grpc::internal::RpcMethod::BIDI_STREAMING);
  return *method;
}

}  // namespace

absl::StatusOr<grpc::ByteBuffer> EncodeStepRequest(
    std::shared_ptr<const natgrad::v1::StepRequest> request) {
  const size_t size = request->ByteSizeLong();
  if (size > static_cast<size_t>(INT_MAX)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "step ", request->step(), ": a message of ", size,
        " bytes is over protobuf's 2 GiB limit (lower max_blocks_per_message)"));
  }
  SliceGatherStream out(request);
  {
    google::protobuf::io::CodedOutputStream coded(&out);
    coded.EnableAliasing(true);
    request->SerializeWithCachedSizes(&coded);
    if (coded.HadError()) {
      return absl::InternalError(absl::StrCat("step ", request->step(), ": encoding failed"));
    }
  }
  if (out.ByteCount() != static_cast<int64_t>(size)) {
    return absl::InternalError(absl::StrCat("step ", request->step(), ": encoded ",
                                            out.ByteCount(), " bytes of ", size));
  }
  return out.Finish();
}

std::optional<natgrad::v1::SessionMoved> SessionMovedFrom(const absl::Status& status) {
  if (status.code() != absl::StatusCode::kFailedPrecondition) return std::nullopt;
  auto payload = status.GetPayload(kSessionMovedTypeUrl);
  if (!payload.has_value()) return std::nullopt;
  natgrad::v1::SessionMoved moved;
  if (!moved.ParseFromString(std::string(*payload))) return std::nullopt;
  return moved;
}

std::string Normalized(const natgrad::v1::StepResponse& response) {
  natgrad::v1::StepResponse r = response;
  return NormalizedInPlace(r);
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
    case absl::StatusCode::kInternal:
    case absl::StatusCode::kUnknown:
      // A proxy (nginx) resets the stream when its upstream replica dies
      // mid-call: a dropped stream, like the Python client's "drop".
      return absl::StrContains(status.message(), "RST_STREAM") ||
             absl::StrContains(status.message(), "Stream removed") ||
             absl::StrContains(status.message(), "GOAWAY") ||
             absl::StrContains(status.message(), "Socket closed");
    default:
      return false;
  }
}

Client::Client(ClientOptions options) : options_(std::move(options)) {
  channel_ = MakeChannel(options_.target);
  stub_ = natgrad::v1::OptimizerService::NewStub(channel_);
}

std::shared_ptr<grpc::Channel> Client::MakeChannel(const std::string& target) const {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(static_cast<int>(options_.max_message_bytes));
  args.SetMaxSendMessageSize(static_cast<int>(options_.max_message_bytes));
  args.SetServiceConfigJSON(kServiceConfig);
  // Reconnect backoff of a channel whose server went away (restart).
  const int max_ms =
      static_cast<int>(std::max<int64_t>(1, absl::ToInt64Milliseconds(options_.max_backoff)));
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, std::min(100, max_ms));
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, std::min(100, max_ms));
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, max_ms);
  auto creds = options_.credentials ? options_.credentials : grpc::InsecureChannelCredentials();
  return grpc::CreateCustomChannel(target, creds, args);
}

void Client::PrepareContext(grpc::ClientContext& context) const {
  if (!options_.bearer_token.empty()) {
    context.AddMetadata("authorization", "Bearer " + options_.bearer_token);
  }
}

void Client::PrepareContext(grpc::ClientContext& context, const std::string& name) const {
  PrepareContext(context);
  if (name.empty()) return;
  const std::string id = BareId(name);
  // Only what can be a session id ([a-z0-9-]{4,63}): the server refuses
  // anything else with a message, which an oversized header would prevent.
  if (id.size() < 4 || id.size() > 63 ||
      !std::all_of(id.begin(), id.end(), [](char ch) {
        return (ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') || ch == '-';
      })) {
    return;
  }
  context.AddMetadata("natgrad-session-key", id);
  absl::MutexLock lock(&mu_);
  auto it = replica_.find(id);
  if (it != replica_.end() && !it->second.empty()) {
    context.AddMetadata("natgrad-replica", it->second);
  }
}

natgrad::v1::OptimizerService::Stub& Client::StubFor(const std::string& name) {
  if (!options_.connect_to_redirect_address || name.empty()) return *stub_;
  absl::MutexLock lock(&mu_);
  auto it = address_.find(BareId(name));
  if (it == address_.end() || it->second.empty()) return *stub_;
  return StubForAddress(it->second);
}

std::shared_ptr<grpc::Channel> Client::ChannelFor(const std::string& name) {
  if (!options_.connect_to_redirect_address || name.empty()) return channel_;
  absl::MutexLock lock(&mu_);
  auto it = address_.find(BareId(name));
  if (it == address_.end() || it->second.empty()) return channel_;
  StubForAddress(it->second);
  return channels_[it->second];
}

natgrad::v1::OptimizerService::Stub& Client::StubForAddress(const std::string& address) {
  auto& stub = stubs_[address];
  if (stub == nullptr) {
    std::shared_ptr<grpc::Channel> channel = MakeChannel(address);
    channels_[address] = channel;
    stub = natgrad::v1::OptimizerService::NewStub(channel);
  }
  return *stub;
}

void Client::Learn(const std::string& name, const std::string& replica,
                   const std::string& address) {
  if (name.empty()) return;
  const std::string id = BareId(name);
  absl::MutexLock lock(&mu_);
  if (!replica.empty()) replica_[id] = replica;
  if (!address.empty()) address_[id] = address;
}

void Client::Learn(const natgrad::v1::SessionMoved& moved) {
  Learn(moved.session(), moved.replica(), moved.address());
}

std::string Client::ReplicaOf(const std::string& name) const {
  absl::MutexLock lock(&mu_);
  auto it = replica_.find(BareId(name));
  return it == replica_.end() ? std::string() : it->second;
}

int64_t Client::redirects() const {
  absl::MutexLock lock(&mu_);
  return redirects_;
}

void Client::AwaitChannel(const std::string& name, absl::Time until) {
  if (options_.connect_to_redirect_address && !name.empty()) {
    absl::MutexLock lock(&mu_);
    // Calls for this session go to its redirect address, not the target.
    if (address_.count(BareId(name)) != 0) return;
  }
  channel_->WaitForConnected(absl::ToChronoTime(until));
}

void Client::CountRedirect() {
  absl::MutexLock lock(&mu_);
  ++redirects_;
}

absl::Status Client::Call(
    const std::string& name,
    const std::function<grpc::Status(grpc::ClientContext&,
                                     natgrad::v1::OptimizerService::Stub&)>& call,
    bool* retried, natgrad::v1::SessionMoved* redirected_to) {
  const absl::Time give_up = absl::Now() + options_.max_retry_time;
  absl::Duration backoff = options_.initial_backoff;
  absl::BitGen gen;
  int redirects = 0;
  const std::string& key = name;
  std::optional<natgrad::v1::SessionMoved> this_call;  // a redirect naming no session
  for (;;) {
    grpc::ClientContext ctx;
    PrepareContext(ctx, key);

    natgrad::v1::OptimizerService::Stub* stub = &StubFor(key);
    if (this_call.has_value()) {
      ctx.AddMetadata("natgrad-replica", this_call->replica());
      if (options_.connect_to_redirect_address && !this_call->address().empty()) {
        absl::MutexLock lock(&mu_);
        stub = &StubForAddress(this_call->address());
      }
    }
    absl::Status status = ToAbsl(call(ctx, *stub));
    if (auto moved = SessionMovedFrom(status);
        moved.has_value() && redirects < options_.max_redirects) {
      ++redirects;
      CountRedirect();
      if (moved->session().empty() && !key.empty()) moved->set_session(key);
      if (moved->session().empty()) {
        this_call = *moved;
      } else {
        Learn(*moved);
      }
      if (redirected_to != nullptr) *redirected_to = *moved;
      continue;
    }
    if (status.code() == absl::StatusCode::kUnavailable && absl::Now() < give_up) {
      if (retried != nullptr) *retried = true;
      std::this_thread::sleep_for(
          absl::ToChronoMicroseconds(backoff * absl::Uniform(gen, 0.5, 1.5)));
      backoff = std::min(backoff * 2, options_.max_backoff);
      // The next attempt stays fail-fast (its status is the real one), but
      // first let the channel connect.
      AwaitChannel(key, std::min(give_up, absl::Now() + options_.max_backoff));
      continue;
    }
    return status;
  }
}

absl::StatusOr<natgrad::v1::Session> Client::CreateSession(
    const natgrad::v1::SessionConfig& config, const std::string& session_id) {
  natgrad::v1::CreateSessionRequest req;
  *req.mutable_config() = config;
  req.set_session_id(session_id);
  natgrad::v1::Session out;
  bool retried = false;
  natgrad::v1::SessionMoved redirected;
  absl::Status s = Call(
      session_id,
      [&](grpc::ClientContext& ctx, natgrad::v1::OptimizerService::Stub& stub) {
        return stub.CreateSession(&ctx, req, &out);
      },
      &retried, &redirected);
  if (s.code() == absl::StatusCode::kAlreadyExists && retried && !session_id.empty()) {
    // An earlier attempt may have created it before its answer was lost.
    auto held = GetSession(session_id);
    if (held.ok() && held->config().SerializeAsString() == config.SerializeAsString()) {
      return held;
    }
  }
  if (!s.ok()) return s;
  // Created where a redirect sent it: later calls go there too.
  Learn(out.name(), out.replica(), redirected.address());
  return out;
}

absl::StatusOr<natgrad::v1::Session> Client::GetSession(const std::string& name) {
  natgrad::v1::GetSessionRequest req;
  req.set_name(name);
  natgrad::v1::Session out;
  absl::Status s =
      Call(name, [&](grpc::ClientContext& ctx, natgrad::v1::OptimizerService::Stub& stub) {
        return stub.GetSession(&ctx, req, &out);
      });
  if (!s.ok()) return s;
  Learn(out.name(), out.replica(), "");
  return out;
}

absl::StatusOr<std::vector<natgrad::v1::Session>> Client::ListSessions() {
  std::vector<natgrad::v1::Session> all;
  std::string token;
  do {
    natgrad::v1::ListSessionsRequest req;
    req.set_page_token(token);
    natgrad::v1::ListSessionsResponse out;
    absl::Status s =
        Call("", [&](grpc::ClientContext& ctx, natgrad::v1::OptimizerService::Stub& stub) {
          return stub.ListSessions(&ctx, req, &out);
        });
    if (!s.ok()) return s;
    for (auto& session : *out.mutable_sessions()) all.push_back(std::move(session));
    token = out.next_page_token();
  } while (!token.empty());
  return all;
}

absl::Status Client::DeleteSession(const std::string& name) {
  natgrad::v1::DeleteSessionRequest req;
  req.set_name(name);
  google::protobuf::Empty out;
  bool retried = false;
  absl::Status s = Call(
      name,
      [&](grpc::ClientContext& ctx, natgrad::v1::OptimizerService::Stub& stub) {
        return stub.DeleteSession(&ctx, req, &out);
      },
      &retried);
  // An earlier attempt may have deleted it before its answer was lost.
  if (s.code() == absl::StatusCode::kNotFound && retried) return absl::OkStatus();
  return s;
}

absl::StatusOr<natgrad::v1::SessionSnapshot> Client::ExportSession(const std::string& name) {
  natgrad::v1::ExportSessionRequest req;
  req.set_name(name);
  natgrad::v1::SessionSnapshot out;
  absl::Status s =
      Call(name, [&](grpc::ClientContext& ctx, natgrad::v1::OptimizerService::Stub& stub) {
        return stub.ExportSession(&ctx, req, &out);
      });
  if (!s.ok()) return s;
  return out;
}

absl::StatusOr<natgrad::v1::Session> Client::ImportSession(
    const natgrad::v1::SessionSnapshot& snapshot, const std::string& session_id) {
  natgrad::v1::ImportSessionRequest req;
  *req.mutable_snapshot() = snapshot;
  req.set_session_id(session_id);
  natgrad::v1::Session out;
  const std::string key = session_id.empty() ? snapshot.name() : session_id;
  absl::Status s =
      Call(key, [&](grpc::ClientContext& ctx, natgrad::v1::OptimizerService::Stub& stub) {
        return stub.ImportSession(&ctx, req, &out);
      });
  if (!s.ok()) return s;
  Learn(out.name(), out.replica(), "");
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
  client_->PrepareContext(*context_, name_);
  channel_ = client_->ChannelFor(name_);
  // The generated stub's Step would serialize each StepRequest again on
  // every write; this stream writes the encoded messages the step keeps.
  stream_.reset(grpc::internal::ClientReaderWriterFactory<
                grpc::ByteBuffer, natgrad::v1::StepResponse>::Create(channel_.get(), StepMethod(),
                                                                     context_.get()));
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

absl::StatusOr<std::vector<grpc::ByteBuffer>> SessionStream::Requests(
    int64_t step, std::vector<natgrad::v1::BlockStep> blocks,
    std::optional<double> loss) const {
  const size_t per = static_cast<size_t>(std::max(1, client_->options().max_blocks_per_message));
  const size_t n = blocks.size();
  std::vector<grpc::ByteBuffer> out;
  for (size_t start = 0; start < n || start == 0; start += per) {
    auto req = std::make_shared<natgrad::v1::StepRequest>();
    req->set_session(name_);
    req->set_step(step);
    const size_t end = std::min(n, start + per);
    req->mutable_blocks()->Reserve(static_cast<int>(end - start));
    // Heap messages on both sides: a move is a swap, the tensors stay put.
    for (size_t i = start; i < end; ++i) *req->add_blocks() = std::move(blocks[i]);
    const bool last = start + per >= n;
    req->set_last(last);
    if (last && loss.has_value()) req->set_loss(*loss);
    if (last && reply_buffer_.has_value()) *req->mutable_reply_buffer() = *reply_buffer_;
    if (reply_buffer_.has_value()) {
      // A step kept for replay is read from its spans after the reply was
      // written: the reply must not land on them.
      if (absl::Status s = CheckDisjoint(*req, *reply_buffer_); !s.ok()) return s;
    }
    auto encoded = EncodeStepRequest(std::move(req));
    if (!encoded.ok()) return encoded.status();
    out.push_back(*std::move(encoded));
    if (last) break;
  }
  return out;
}

absl::StatusOr<natgrad::v1::StepResponse> SessionStream::Exchange(
    const std::vector<grpc::ByteBuffer>& requests) {
  if (absl::Status s = EnsureOpen(); !s.ok()) return s;
  for (const grpc::ByteBuffer& req : requests) {
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
    absl::StatusOr<std::string> normalized = NormalizedByValue(*response);
    if (!normalized.ok()) return normalized.status();
    if (response->step() != k.step || *normalized != k.response) {
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

void SessionStream::UseSharedMemory(std::shared_ptr<SharedMemoryRegion> region,
                                    std::optional<natgrad::v1::SharedMemorySpan> reply_buffer) {
  shared_memory_ = std::move(region);
  reply_buffer_ = shared_memory_ != nullptr ? std::move(reply_buffer) : std::nullopt;
}

absl::StatusOr<std::string> SessionStream::NormalizedByValue(
    natgrad::v1::StepResponse& response) const {
  if (shared_memory_ == nullptr) return NormalizedInPlace(response);
  natgrad::v1::StepResponse copy = response;
  if (absl::Status s = InlineSpans(&copy, *shared_memory_); !s.ok()) return s;
  return NormalizedInPlace(copy);
}

absl::StatusOr<std::vector<grpc::ByteBuffer>> SessionStream::ByValue(
    std::vector<grpc::ByteBuffer> requests) const {
  if (shared_memory_ == nullptr) return requests;
  std::vector<grpc::ByteBuffer> out;
  for (grpc::ByteBuffer& b : requests) {
    // Small: a spanned request carries no tensor bytes.
    auto req = std::make_shared<natgrad::v1::StepRequest>();
    grpc::Status parsed =
        grpc::GenericDeserialize<grpc::ProtoBufferReader, natgrad::v1::StepRequest>(&b, req.get());
    if (!parsed.ok()) return absl::InternalError("a sent request does not parse again");
    if (absl::Status s = InlineSpans(req.get(), *shared_memory_); !s.ok()) return s;
    auto encoded = EncodeStepRequest(std::move(req));
    if (!encoded.ok()) return encoded.status();
    out.push_back(*std::move(encoded));
  }
  return out;
}

void SessionStream::Keep(int64_t step, std::vector<grpc::ByteBuffer> requests,
                         natgrad::v1::StepResponse& response) {
  durable_step_ = response.durable_step();
  if (client_->options().max_replay_steps > 0 && durable_step_ >= 0 && step > durable_step_ &&
      (kept_.empty() || kept_.back().step == step - 1)) {
    // With shared memory, what is kept holds the bytes: the spans are
    // written again by the next step.
    absl::StatusOr<std::vector<grpc::ByteBuffer>> kept = ByValue(std::move(requests));
    absl::StatusOr<std::string> normalized = NormalizedByValue(response);
    if (!kept.ok() || !normalized.ok()) {
      // Not kept: a restart that loses this step is then DATA_LOSS.
      Trim();
      return;
    }
    requests = *std::move(kept);
    KeptStep& k = kept_.emplace_back();
    k.step = step;
    k.response = *std::move(normalized);
    k.bytes = static_cast<int64_t>(k.response.size());
    for (const auto& r : requests) k.bytes += static_cast<int64_t>(r.Length());
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
    int64_t step, const std::vector<grpc::ByteBuffer>& requests) {
  if (stream_ == nullptr && reopen_check_ && next_step_ > 1) {
    if (absl::Status s = Reopen(step); !s.ok()) return s;
  }
  if (absl::Status s = EnsureOpen(); !s.ok()) return s;
  reopen_check_ = false;
  return Exchange(requests);
}

absl::StatusOr<natgrad::v1::StepResponse> SessionStream::StepNumbered(
    int64_t step, std::vector<natgrad::v1::BlockStep> blocks, std::optional<double> loss) {
  absl::Duration backoff = client_->options().initial_backoff;
  absl::BitGen gen;
  const absl::Time give_up = absl::Now() + client_->options().max_retry_time;
  int redirects = 0;
  // Only the next step in order is kept for replay (explicit numbers are
  // retries or ordering tests).
  const bool next = step == next_step_;
  auto encoded = Requests(step, std::move(blocks), loss);
  if (!encoded.ok()) return encoded.status();
  std::vector<grpc::ByteBuffer> requests = *std::move(encoded);
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
    if (auto moved = SessionMovedFrom(response.status());
        moved.has_value() && redirects < client_->options().max_redirects) {
      // Drained away: reopen on the replica that holds it now (the stream
      // ended, so the reopen checks where the session is and replays).
      ++redirects;
      client_->CountRedirect();
      if (moved->session().empty()) moved->set_session(name_);
      client_->Learn(*moved);
      reopen_check_ = true;
      --attempt;  // a redirect is not a failed attempt
      continue;
    }
    if (!IsRetryable(response.status()) || attempt >= client_->options().max_retries ||
        absl::Now() >= give_up) {
      return response.status();
    }
    ++reconnects_;
    // Jittered exponential backoff so many clients do not retry in lockstep.
    std::this_thread::sleep_for(absl::ToChronoMicroseconds(
        backoff * absl::Uniform(gen, 0.5, 1.5)));
    backoff = std::min(backoff * 2, client_->options().max_backoff);
    client_->AwaitChannel(name_, std::min(give_up, absl::Now() + client_->options().max_backoff));
  }
}

absl::StatusOr<natgrad::v1::StepResponse> SessionStream::Step(
    std::vector<natgrad::v1::BlockStep> blocks, std::optional<double> loss) {
  return StepNumbered(next_step_, std::move(blocks), loss);
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
