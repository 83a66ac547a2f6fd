#include "server/service/token_authenticator.h"

#include <fstream>
#include <sstream>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace natgrad::service {

absl::StatusOr<std::map<std::string, std::string>> ParseTokens(const std::string& text) {
  std::map<std::string, std::string> out;
  int line_no = 0;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    ++line_no;
    line = absl::StripAsciiWhitespace(line);
    if (line.empty() || line[0] == '#') continue;
    std::vector<absl::string_view> parts =
        absl::StrSplit(line, absl::ByAnyChar(" \t"), absl::SkipEmpty());
    if (parts.size() != 2) {
      return absl::InvalidArgumentError(
          absl::StrCat("tokens file line ", line_no, ": want \"<token> <tenant>\""));
    }
    if (parts[0].size() < 16) {
      return absl::InvalidArgumentError(
          absl::StrCat("tokens file line ", line_no, ": token shorter than 16 characters"));
    }
    out[std::string(parts[0])] = std::string(parts[1]);
  }
  return out;
}

absl::StatusOr<std::unique_ptr<TokenAuthenticator>> TokenAuthenticator::FromFile(
    std::string path) {
  auto auth = std::unique_ptr<TokenAuthenticator>(new TokenAuthenticator(std::move(path)));
  if (absl::Status s = auth->Reload(); !s.ok()) return s;
  return auth;
}

absl::Status TokenAuthenticator::Reload() {
  std::ifstream in(path_);
  if (!in) return absl::FailedPreconditionError(absl::StrCat("cannot read ", path_));
  std::stringstream buffer;
  buffer << in.rdbuf();
  auto parsed = ParseTokens(buffer.str());
  if (!parsed.ok()) return parsed.status();
  absl::MutexLock lock(&mu_);
  tenants_ = *std::move(parsed);
  return absl::OkStatus();
}

size_t TokenAuthenticator::size() const {
  absl::MutexLock lock(&mu_);
  return tenants_.size();
}

absl::StatusOr<std::string> TokenAuthenticator::Authenticate(
    const grpc::CallbackServerContext& context) const {
  const auto& md = context.client_metadata();
  auto it = md.find("authorization");
  if (it == md.end()) {
    return absl::UnauthenticatedError("missing authorization: Bearer <token> metadata");
  }
  absl::string_view value(it->second.data(), it->second.size());
  if (!absl::ConsumePrefix(&value, "Bearer ")) {
    return absl::UnauthenticatedError("authorization metadata must be \"Bearer <token>\"");
  }
  absl::MutexLock lock(&mu_);
  auto found = tenants_.find(std::string(value));
  if (found == tenants_.end()) return absl::UnauthenticatedError("unknown token");
  return found->second;
}

}  // namespace natgrad::service
