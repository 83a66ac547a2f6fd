#include "server/service/token_authenticator.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>

#include <fstream>
#include <sstream>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace natgrad::service {
namespace {

std::string Sha256(absl::string_view bytes) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  EVP_Digest(bytes.data(), bytes.size(), md, &len, EVP_sha256(), nullptr);
  return std::string(reinterpret_cast<const char*>(md), len);
}

}  // namespace

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
  std::vector<Entry> entries;
  for (auto& [token, tenant] : *parsed) entries.push_back({Sha256(token), std::move(tenant)});
  absl::MutexLock lock(&mu_);
  entries_ = std::move(entries);
  return absl::OkStatus();
}

size_t TokenAuthenticator::size() const {
  absl::MutexLock lock(&mu_);
  return entries_.size();
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
  const std::string digest = Sha256(value);
  absl::MutexLock lock(&mu_);
  const Entry* found = nullptr;
  for (const Entry& e : entries_) {
    // Every entry is compared; only the selection depends on the result.
    const bool match = CRYPTO_memcmp(e.digest.data(), digest.data(), digest.size()) == 0;
    found = match ? &e : found;
  }
  if (found == nullptr) return absl::UnauthenticatedError("unknown token");
  return found->tenant;
}

}  // namespace natgrad::service
