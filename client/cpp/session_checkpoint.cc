#include "client/cpp/session_checkpoint.h"

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "client/cpp/natgrad_client.h"
#include "google/protobuf/util/message_differencer.h"

namespace natgrad::client {
namespace {

constexpr absl::string_view kPrefix = "sessions/";

}  // namespace

std::string SessionCheckpoint::Serialize() const {
  // The snapshot already names the session and its last step.
  return snapshot.SerializeAsString();
}

absl::StatusOr<SessionCheckpoint> SessionCheckpoint::Parse(const std::string& bytes) {
  SessionCheckpoint c;
  if (!c.snapshot.ParseFromString(bytes) || !absl::StartsWith(c.snapshot.name(), kPrefix) ||
      c.snapshot.name().size() == kPrefix.size() || c.snapshot.last_step() < 0) {
    return absl::InvalidArgumentError(
        "checkpoint: not a natgrad session checkpoint (unparsable or without a session name)");
  }
  c.session = c.snapshot.name();
  c.step = c.snapshot.last_step();
  return c;
}

absl::StatusOr<SessionCheckpoint> SaveCheckpoint(Client& client, const std::string& session) {
  auto snapshot = client.ExportSession(session);
  if (!snapshot.ok()) return snapshot.status();
  SessionCheckpoint c;
  c.session = snapshot->name();
  c.step = snapshot->last_step();
  c.snapshot = *std::move(snapshot);
  return c;
}

absl::StatusOr<natgrad::v1::Session> RestoreCheckpoint(Client& client,
                                                       const SessionCheckpoint& checkpoint) {
  auto existing = client.GetSession(checkpoint.session);
  if (existing.ok()) {
    if (existing->last_step() != checkpoint.step) {
      return absl::FailedPreconditionError(absl::StrCat(
          "checkpoint: ", checkpoint.session, " is at step ", existing->last_step(),
          " on the server but the checkpoint is of step ", checkpoint.step,
          "; refusing to attach model weights to optimizer state of another step"));
    }
    if (!google::protobuf::util::MessageDifferencer::Equals(existing->config(),
                                                            checkpoint.snapshot.config())) {
      return absl::FailedPreconditionError(absl::StrCat(
          "checkpoint: ", checkpoint.session, " exists on the server with another config"));
    }
    return existing;
  }
  if (existing.status().code() != absl::StatusCode::kNotFound) return existing.status();
  return client.ImportSession(checkpoint.snapshot,
                              checkpoint.session.substr(kPrefix.size()));
}

}  // namespace natgrad::client
