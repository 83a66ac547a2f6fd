// libFuzzer harness over the checkpoint load path: the file framing and
// digest check (DecodeCheckpoint on the raw input), and, since random bytes
// almost never carry a valid SHA-256, the same input framed with a correct
// digest: the snapshot parse, its checks, and restoring it as the server does
// at start-up (SessionRegistry::Import -> Session::Restore on a real engine).
// A restored session's own snapshot must encode, decode and restore again.
#include <cstddef>
#include <cstdint>
#include <string>

#include "server/session/checkpoint_store.h"
#include "tests/fuzz/fuzz_common.h"

namespace {

void Restore(const natgrad::v1::SessionSnapshot& snap) {
  using natgrad::session::SessionRegistry;
  SessionRegistry registry(natgrad::fuzz::Limits(), natgrad::fuzz::Engine());
  auto session = registry.Import(snap, snap.tenant(), "");
  if (!session.ok()) return;
  const natgrad::v1::SessionSnapshot again = (*session)->Snapshot();
  auto decoded = natgrad::session::DecodeCheckpoint(natgrad::session::EncodeCheckpoint(again));
  NATGRAD_FUZZ_CHECK(decoded.ok(), "%s", decoded.status().ToString().c_str());
  SessionRegistry other(natgrad::fuzz::Limits(), natgrad::fuzz::Engine());
  auto reimported = other.Import(*decoded, decoded->tenant(), "");
  NATGRAD_FUZZ_CHECK(reimported.ok(), "a restored session's snapshot does not restore: %s",
                     reimported.status().ToString().c_str());
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string bytes(reinterpret_cast<const char*>(data), size);
  if (auto snap = natgrad::session::DecodeCheckpoint(bytes); snap.ok()) Restore(*snap);

  natgrad::v1::SessionSnapshot payload;
  if (!payload.ParseFromString(bytes)) return 0;
  auto framed = natgrad::session::DecodeCheckpoint(natgrad::session::EncodeCheckpoint(payload));
  if (framed.ok()) Restore(*framed);
  return 0;
}
