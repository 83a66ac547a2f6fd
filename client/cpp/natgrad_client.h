// C++ client of natgrad.v1.OptimizerService: session management and a Step
// stream that survives dropped connections. A retried step carries the same
// number, so the server replays its cached response instead of applying it
// twice (docs/architecture.md): at-least-once sending, exactly-once effect.
//
// Steps acknowledged but not yet durable on the server survive a server
// crash too: each response carries the session's durable_step, the stream
// keeps the requests (and the normalized response) of the steps after it,
// and after a reconnect to a session that is behind it sends them again in
// order, checking each response is bit-identical to the first. A session
// that is gone is NOT_FOUND saying so; one behind by more steps than are
// kept, or answering a replayed step differently, is DATA_LOSS.
//
// Replicas (docs/replicas.md): every call carries `natgrad-session-key` (the
// session id) and, once known, `natgrad-replica` (from Session.replica or a
// redirect) for the router. A SessionMoved redirect (FAILED_PRECONDITION with
// the detail) switches the replica header, or, with
// connect_to_redirect_address (no router), the connection, and the call or
// stream goes on there; the moved session carries its replies and durable
// step, so the replay above covers the switch. UNAVAILABLE is retried with
// backoff for at most max_retry_time.
#ifndef NATGRAD_CLIENT_CPP_NATGRAD_CLIENT_H_
#define NATGRAD_CLIENT_CPP_NATGRAD_CLIENT_H_

#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "grpcpp/grpcpp.h"
#include "natgrad/v1/admin_service.pb.h"
#include "natgrad/v1/optimizer_service.grpc.pb.h"

namespace natgrad::client {

struct ClientOptions {
  std::string target = "127.0.0.1:50051";
  // Insecure when null (localhost mode).
  std::shared_ptr<grpc::ChannelCredentials> credentials;
  // Sent as "authorization: Bearer <token>" when set.
  std::string bearer_token;
  int64_t max_message_bytes = int64_t{256} << 20;
  // Reconnect attempts for one step before giving up, and the first backoff
  // (doubled each attempt, with jitter).
  int max_retries = 8;
  absl::Duration initial_backoff = absl::Milliseconds(20);
  // Blocks per stream message when a step is split.
  int max_blocks_per_message = 64;
  // Most non-durable steps a SessionStream keeps to send again after a
  // server restart (0: none). A server with --checkpoint_every_steps=N needs
  // N - 1; each kept step costs its requests plus its response's bytes, at
  // most max_replay_bytes in all.
  int64_t max_replay_steps = 1000;
  int64_t max_replay_bytes = int64_t{1} << 30;
  // Without a router: follow a SessionMoved redirect by connecting to its
  // address. Behind a router (false): keep the target and send the new
  // replica in natgrad-replica.
  bool connect_to_redirect_address = false;
  // Total time a call or a step keeps retrying UNAVAILABLE (with jittered
  // exponential backoff, at most max_backoff apart); also bounded by
  // max_retries for a step.
  absl::Duration max_retry_time = absl::Seconds(30);
  absl::Duration max_backoff = absl::Seconds(2);
  // Redirects followed in a row by one call before giving up.
  int max_redirects = 8;
};

// The SessionMoved detail of a redirect, if `status` is one.
std::optional<natgrad::v1::SessionMoved> SessionMovedFrom(const absl::Status& status);

class SessionStream;

class Client {
 public:
  explicit Client(ClientOptions options);

  absl::StatusOr<natgrad::v1::Session> CreateSession(
      const natgrad::v1::SessionConfig& config, const std::string& session_id = "");
  absl::StatusOr<natgrad::v1::Session> GetSession(const std::string& name);
  // Every page.
  absl::StatusOr<std::vector<natgrad::v1::Session>> ListSessions();
  absl::Status DeleteSession(const std::string& name);
  absl::StatusOr<natgrad::v1::SessionSnapshot> ExportSession(const std::string& name);
  absl::StatusOr<natgrad::v1::Session> ImportSession(
      const natgrad::v1::SessionSnapshot& snapshot, const std::string& session_id = "");

  // Steps of an existing session, continuing after its last applied step.
  absl::StatusOr<std::unique_ptr<SessionStream>> OpenStream(const std::string& name);

  natgrad::v1::OptimizerService::Stub& stub() { return *stub_; }
  const ClientOptions& options() const { return options_; }
  // Authorization only.
  void PrepareContext(grpc::ClientContext& context) const;
  // Authorization plus the routing headers of session `name` ("sessions/ID"
  // or a bare id; empty: none).
  void PrepareContext(grpc::ClientContext& context, const std::string& name) const;
  // The stub that reaches session `name` (its redirect address, when
  // connect_to_redirect_address, else the target's).
  natgrad::v1::OptimizerService::Stub& StubFor(const std::string& name);
  // The channel StubFor(name) uses (for calls made without the generated
  // stub: SessionStream writes pre-encoded messages).
  std::shared_ptr<grpc::Channel> ChannelFor(const std::string& name);
  // Records where session `name` lives (from Session.replica or a redirect).
  void Learn(const std::string& name, const std::string& replica, const std::string& address);
  void Learn(const natgrad::v1::SessionMoved& moved);
  // The replica last learnt for `name` ("" when unknown).
  std::string ReplicaOf(const std::string& name) const;
  // Redirects followed so far (all calls and streams).
  int64_t redirects() const;
  void CountRedirect();
  // Before a retry: lets the target's channel connect (gRPC connects only
  // while something asks it to; a client whose threads all sleep in backoff
  // otherwise never leaves TRANSIENT_FAILURE). Returns at `until` at the
  // latest. Nothing to wait for when session `name`'s calls go to its
  // redirect address.
  void AwaitChannel(const std::string& name, absl::Time until);

  // Runs `call` (one attempt with a fresh context and the right stub) until
  // it is neither a redirect nor UNAVAILABLE, within the retry bounds.
  // `retried` is set when an attempt before the last one failed UNAVAILABLE.
  // A redirect that names no session (CreateSession of a server-chosen id on
  // a draining replica) applies to this call only; `redirected_to` gets it.
  absl::Status Call(const std::string& name,
                    const std::function<grpc::Status(grpc::ClientContext&,
                                                     natgrad::v1::OptimizerService::Stub&)>& call,
                    bool* retried = nullptr,
                    natgrad::v1::SessionMoved* redirected_to = nullptr);

 private:
  std::shared_ptr<grpc::Channel> MakeChannel(const std::string& target) const;
  natgrad::v1::OptimizerService::Stub& StubForAddress(const std::string& address)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  ClientOptions options_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<natgrad::v1::OptimizerService::Stub> stub_;
  mutable absl::Mutex mu_;
  std::map<std::string, std::string> replica_ ABSL_GUARDED_BY(mu_);   // id -> replica
  std::map<std::string, std::string> address_ ABSL_GUARDED_BY(mu_);   // id -> address
  std::map<std::string, std::unique_ptr<natgrad::v1::OptimizerService::Stub>> stubs_
      ABSL_GUARDED_BY(mu_);  // address -> stub
  std::map<std::string, std::shared_ptr<grpc::Channel>> channels_
      ABSL_GUARDED_BY(mu_);  // address -> the channel of stubs_[address]
  int64_t redirects_ ABSL_GUARDED_BY(mu_) = 0;
};

class SharedMemoryRegion;  // shared_memory.h

class SessionStream {
 public:
  // `durable_step`: the session's as GetSession reported it (0: unknown).
  SessionStream(Client* client, std::string name, int64_t next_step, int64_t durable_step = 0);
  ~SessionStream();

  // Sends the next step and returns its response, reconnecting and resending
  // the same step number after a dropped stream (first sending again the
  // acknowledged steps a restarted server lost; DATA_LOSS when it lost more
  // than are kept, NOT_FOUND when it lost the session). An error from the
  // server (bad input, ...) is returned and the step number does not advance.
  //
  // `blocks` is taken by value: pass it with std::move and its tensors go
  // into the stream's messages without a copy (an lvalue is copied once, as
  // the caller keeps it). Each message is encoded once, its tensor payloads
  // referenced rather than copied, and that encoding is what a retry or a
  // replay after a server restart sends again.
  absl::StatusOr<natgrad::v1::StepResponse> Step(
      std::vector<natgrad::v1::BlockStep> blocks,
      std::optional<double> loss = std::nullopt);
  // Sends a step with an explicit number (tests of ordering and replay).
  absl::StatusOr<natgrad::v1::StepResponse> StepNumbered(
      int64_t step, std::vector<natgrad::v1::BlockStep> blocks,
      std::optional<double> loss = std::nullopt);

  // Steps whose tensors lie in `region` (SharedMemoryArena; the server
  // needs --shared_memory): a step kept for replay keeps their bytes, not
  // the spans the next step overwrites, and a replayed answer is compared
  // by value. With `reply_buffer` (a span of `region`), every step asks the
  // server to write its reply's tensors there (TensorBytes reads them);
  // they stay valid until the next step. nullptr: back to plain messages.
  void UseSharedMemory(std::shared_ptr<SharedMemoryRegion> region,
                       std::optional<natgrad::v1::SharedMemorySpan> reply_buffer = std::nullopt);

  int64_t next_step() const { return next_step_; }
  const std::string& name() const { return name_; }
  // Reconnects made so far (dropped streams recovered).
  int reconnects() const { return reconnects_; }
  // The last step the server reported durable (-1: it keeps no checkpoints).
  int64_t durable_step() const { return durable_step_; }
  // Steps kept for replay, their bytes (requests + responses), and the steps
  // sent again so far after server restarts.
  int64_t kept_steps() const { return static_cast<int64_t>(kept_.size()); }
  int64_t kept_bytes() const { return kept_bytes_; }
  int64_t replayed_steps() const { return replayed_steps_; }

  // Half-closes the stream and waits for the server's status.
  absl::Status Close();
  // Cancels the current stream as a network cut would (tests, chaos).
  void DropStream();

 private:
  // Writes already-encoded StepRequests (EncodeStepRequest), reads typed
  // responses: the same method and bytes as the generated stub's Step.
  using Stream = grpc::ClientReaderWriter<grpc::ByteBuffer, natgrad::v1::StepResponse>;
  // An acknowledged step the server has not yet made durable.
  struct KeptStep {
    int64_t step = 0;
    std::vector<grpc::ByteBuffer> requests;  // as sent (they share the payloads)
    std::string response;  // Normalized(), for the bit-for-bit check
    int64_t bytes = 0;
  };
  absl::Status EnsureOpen();
  // After a drop: where is the server's session, and send again what it lost.
  absl::Status Reopen(int64_t step);
  // Writes `requests` and reads one response on the open stream.
  absl::StatusOr<natgrad::v1::StepResponse> Exchange(
      const std::vector<grpc::ByteBuffer>& requests);
  // One attempt on the current stream; UNAVAILABLE-like errors are retried.
  absl::StatusOr<natgrad::v1::StepResponse> Attempt(
      int64_t step, const std::vector<grpc::ByteBuffer>& requests);
  // The step's messages (max_blocks_per_message blocks each), encoded; the
  // blocks are moved into them.
  absl::StatusOr<std::vector<grpc::ByteBuffer>> Requests(
      int64_t step, std::vector<natgrad::v1::BlockStep> blocks,
      std::optional<double> loss) const;
  void Keep(int64_t step, std::vector<grpc::ByteBuffer> requests,
            natgrad::v1::StepResponse& response);
  // Normalized(), with the tensors in shared memory read by value.
  absl::StatusOr<std::string> NormalizedByValue(natgrad::v1::StepResponse& response) const;
  // `requests` with their spans replaced by the bytes (UseSharedMemory).
  absl::StatusOr<std::vector<grpc::ByteBuffer>> ByValue(
      std::vector<grpc::ByteBuffer> requests) const;
  // Drops kept steps that are durable, or beyond max_replay_steps.
  void Trim();
  absl::Status FinishStream();

  Client* const client_;
  const std::string name_;
  int64_t next_step_;
  int64_t durable_step_;
  int reconnects_ = 0;
  bool reopen_check_ = false;  // a stream was dropped: check the server on reopening
  std::shared_ptr<SharedMemoryRegion> shared_memory_;
  std::optional<natgrad::v1::SharedMemorySpan> reply_buffer_;
  std::deque<KeptStep> kept_;
  int64_t kept_bytes_ = 0;
  int64_t replayed_steps_ = 0;
  std::shared_ptr<grpc::Channel> channel_;  // the open stream's
  std::unique_ptr<grpc::ClientContext> context_;
  std::unique_ptr<Stream> stream_;
};

// `request` encoded as one Step stream message, its large bytes fields (the
// tensor payloads) not copied: the buffer's slices refer to them and hold a
// reference on `request`, which must not change afterwards. The bytes are
// exactly request.SerializeAsString().
absl::StatusOr<grpc::ByteBuffer> EncodeStepRequest(
    std::shared_ptr<const natgrad::v1::StepRequest> request);

// A response without what legitimately differs between the first answer to
// a step and a replay of it (timing, replayed, durable_step), serialized
// deterministically: equal bytes mean the same step math.
std::string Normalized(const natgrad::v1::StepResponse& response);

// Whether a failed step may be resent: the stream broke, or the server has
// not yet noticed the previous stream of this session is gone.
bool IsRetryable(const absl::Status& status);

}  // namespace natgrad::client

#endif  // NATGRAD_CLIENT_CPP_NATGRAD_CLIENT_H_
