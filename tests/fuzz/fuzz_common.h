// Shared by the libFuzzer harnesses: one real inversion engine (CPU backend)
// and registry limits small enough that a legitimately large config is
// refused by the limit check instead of exhausting the fuzzer's memory.
#ifndef NATGRAD_TESTS_FUZZ_FUZZ_COMMON_H_
#define NATGRAD_TESTS_FUZZ_FUZZ_COMMON_H_

#include <cstdlib>
#include <cstdio>

#include "server/engine/engine_factory.h"
#include "server/session/session_registry.h"

namespace natgrad::fuzz {

inline engine::InversionEngine* Engine() {
  static engine::BatchingInversionEngine* engine = [] {
    engine::EngineOptions o;
    o.backend = "cpu";
    o.cpu_threads = 1;
    o.batch_window_us = 0;
    auto created = engine::CreateInversionEngine(o);
    if (!created.ok()) {
      std::fprintf(stderr, "fuzz: no engine: %s\n", created.status().ToString().c_str());
      std::abort();
    }
    return created->engine.release();
  }();
  return engine;
}

inline session::RegistryLimits Limits() {
  session::RegistryLimits l;
  l.max_sessions = 4;
  l.max_session_bytes = int64_t{64} << 20;
  return l;
}

// A failed invariant: libFuzzer reports it as a crash with the input.
#define NATGRAD_FUZZ_CHECK(cond, ...)                               \
  do {                                                              \
    if (!(cond)) {                                                  \
      std::fprintf(stderr, "invariant failed: %s: ", #cond);        \
      std::fprintf(stderr, __VA_ARGS__);                            \
      std::fprintf(stderr, "\n");                                   \
      std::abort();                                                 \
    }                                                               \
  } while (0)

}  // namespace natgrad::fuzz

#endif  // NATGRAD_TESTS_FUZZ_FUZZ_COMMON_H_
