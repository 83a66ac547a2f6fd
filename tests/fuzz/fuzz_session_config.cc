// libFuzzer harness over session-config validation: the input is a
// CreateSessionRequest (so the golden wire vector seeds it directly), and its
// config goes through what CreateSession does: ValidateSessionConfig, the
// registry limits and Session::Create on a real engine. A created session's
// snapshot must restore (an export that cannot be imported is a bug).
#include <cstddef>
#include <cstdint>

#include "natgrad/v1/optimizer_service.pb.h"
#include "server/session/checkpoint_store.h"
#include "tests/fuzz/fuzz_common.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  natgrad::v1::CreateSessionRequest request;
  if (!request.ParseFromArray(data, static_cast<int>(size))) return 0;
  natgrad::session::SessionRegistry registry(natgrad::fuzz::Limits(), natgrad::fuzz::Engine());
  auto session = registry.Create(request.config(), "tenant", request.session_id());
  if (!session.ok()) return 0;
  const natgrad::v1::SessionSnapshot snap = (*session)->Snapshot();
  auto decoded = natgrad::session::DecodeCheckpoint(natgrad::session::EncodeCheckpoint(snap));
  NATGRAD_FUZZ_CHECK(decoded.ok(), "%s", decoded.status().ToString().c_str());
  natgrad::session::SessionRegistry other(natgrad::fuzz::Limits(), natgrad::fuzz::Engine());
  auto restored = other.Import(*decoded, "tenant", "");
  NATGRAD_FUZZ_CHECK(restored.ok(), "a new session's snapshot does not restore: %s",
                     restored.status().ToString().c_str());
  return 0;
}
