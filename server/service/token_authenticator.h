// Bearer-token authentication: "authorization: Bearer <token>" metadata,
// tokens mapped to tenants by a file of "<token> <tenant>" lines ('#' starts
// a comment). Reload() swaps the table atomically (SIGHUP).
//
// Lookup time does not depend on the presented token: the table holds
// SHA-256 digests of the tokens, and a call compares the digest of the
// presented token with every entry using a constant-time compare, without
// stopping at a match.
#ifndef NATGRAD_SERVER_SERVICE_TOKEN_AUTHENTICATOR_H_
#define NATGRAD_SERVER_SERVICE_TOKEN_AUTHENTICATOR_H_

#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "server/service/authenticator.h"

namespace natgrad::service {

class TokenAuthenticator final : public Authenticator {
 public:
  static absl::StatusOr<std::unique_ptr<TokenAuthenticator>> FromFile(std::string path);

  absl::StatusOr<std::string> Authenticate(
      const grpc::CallbackServerContext& context) const override;
  // Keeps the old table when the file is unreadable or malformed.
  absl::Status Reload();
  size_t size() const;

 private:
  explicit TokenAuthenticator(std::string path) : path_(std::move(path)) {}
  const std::string path_;
  mutable absl::Mutex mu_;
  struct Entry {
    std::string digest;  // SHA-256 of the token
    std::string tenant;
  };
  std::vector<Entry> entries_ ABSL_GUARDED_BY(mu_);
};

// Parses a tokens file body; exposed for tests.
absl::StatusOr<std::map<std::string, std::string>> ParseTokens(const std::string& text);

}  // namespace natgrad::service

#endif  // NATGRAD_SERVER_SERVICE_TOKEN_AUTHENTICATOR_H_
