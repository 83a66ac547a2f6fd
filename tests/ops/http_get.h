// A blocking HTTP/1.1 GET on loopback, enough to scrape /metrics and query
// Prometheus's HTTP API in tests.
#ifndef NATGRAD_TESTS_OPS_HTTP_GET_H_
#define NATGRAD_TESTS_OPS_HTTP_GET_H_

#include <arpa/inet.h>
#include <sys/socket.h>
#include <unistd.h>

#include <optional>
#include <string>

namespace natgrad::testing {

// A loopback port that was free a moment ago (for servers such as the
// metrics listener and Prometheus that do not report the port they bound).
inline int FreePort() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  socklen_t len = sizeof(addr);
  getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  close(fd);
  return ntohs(addr.sin_port);
}

// The body of a 200 response, or nullopt.
inline std::optional<std::string> HttpGet(int port, const std::string& path) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(port);
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  timeval tv{10, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    close(fd);
    return std::nullopt;
  }
  const std::string req = "GET " + path + " HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
  send(fd, req.data(), req.size(), MSG_NOSIGNAL);
  std::string resp;
  char buf[8192];
  ssize_t n;
  while ((n = recv(fd, buf, sizeof(buf), 0)) > 0) resp.append(buf, n);
  close(fd);
  if (resp.rfind("HTTP/1.1 200", 0) != 0 && resp.rfind("HTTP/1.0 200", 0) != 0) return std::nullopt;
  const size_t body = resp.find("\r\n\r\n");
  if (body == std::string::npos) return std::nullopt;
  std::string out = resp.substr(body + 4);
  // Prometheus answers chunked; a crude de-chunking is enough for JSON search.
  return out;
}

}  // namespace natgrad::testing

#endif  // NATGRAD_TESTS_OPS_HTTP_GET_H_
