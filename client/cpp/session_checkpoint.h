// A full, portable checkpoint of a training job's optimizer state: the
// session's exported snapshot plus its name and step, as bytes a job writes
// next to its model weights. Restoring imports it into a server that does not
// have the session (an empty checkpoint directory, another replica), or
// verifies it against one that does; anything that does not match is an
// error, never a silent re-attach at the wrong step.
#ifndef NATGRAD_CLIENT_CPP_SESSION_CHECKPOINT_H_
#define NATGRAD_CLIENT_CPP_SESSION_CHECKPOINT_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "natgrad/v1/session.pb.h"

namespace natgrad::client {

class Client;

struct SessionCheckpoint {
  std::string session;  // "sessions/{id}"
  int64_t step = 0;     // the last applied step
  natgrad::v1::SessionSnapshot snapshot;

  // Self-describing bytes (a versioned natgrad.v1.SessionSnapshot).
  std::string Serialize() const;
  static absl::StatusOr<SessionCheckpoint> Parse(const std::string& bytes);
};

// Exports `session` (ExportSession) as a checkpoint.
absl::StatusOr<SessionCheckpoint> SaveCheckpoint(Client& client, const std::string& session);

// Imports the checkpoint when the server lacks the session; when it has it,
// checks that its step and config equal the checkpoint's
// (FAILED_PRECONDITION otherwise). Returns the session as the server holds it.
absl::StatusOr<natgrad::v1::Session> RestoreCheckpoint(Client& client,
                                                       const SessionCheckpoint& checkpoint);

}  // namespace natgrad::client

#endif  // NATGRAD_CLIENT_CPP_SESSION_CHECKPOINT_H_
