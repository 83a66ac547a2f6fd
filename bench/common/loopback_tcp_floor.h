// The kernel's floor for a step over loopback TCP: a request's bytes up and
// its reply's bytes down through a plain socket pair in this process, into
// buffers allocated and touched beforehand (no framing, no parsing, no
// allocation; one copy into the kernel and one out of it each way). No
// transport that copies through the socket can move a step's bytes faster
// than this on the same machine at the same moment, so a bench times it
// beside the step and reports what the bytes alone cost. Header only; a
// bench has no one to report to, so failures exit.
#ifndef NATGRAD_BENCH_COMMON_LOOPBACK_TCP_FLOOR_H_
#define NATGRAD_BENCH_COMMON_LOOPBACK_TCP_FLOOR_H_

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

namespace natgrad::bench {

class LoopbackTcpFloor {
 public:
  // A connected pair on 127.0.0.1 and the peer's thread, which answers each
  // `up_bytes` it reads with `down_bytes`.
  LoopbackTcpFloor(int64_t up_bytes, int64_t down_bytes)
      : up_(static_cast<size_t>(up_bytes), 1), down_(static_cast<size_t>(down_bytes), 2),
        peer_up_(up_.size(), 0), peer_down_(down_.size(), 3) {
    const int listener = Check(socket(AF_INET, SOCK_STREAM, 0), "socket");
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    Check(bind(listener, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), "bind");
    Check(listen(listener, 1), "listen");
    socklen_t len = sizeof(addr);
    Check(getsockname(listener, reinterpret_cast<sockaddr*>(&addr), &len), "getsockname");
    client_ = Check(socket(AF_INET, SOCK_STREAM, 0), "socket");
    Check(connect(client_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), "connect");
    peer_ = Check(accept(listener, nullptr, nullptr), "accept");
    close(listener);
    const int one = 1;
    setsockopt(client_, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    setsockopt(peer_, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    thread_ = std::thread([this] {
      // Ends when the client's side closes (a short read).
      while (ReadAll(peer_, peer_up_.data(), peer_up_.size()) &&
             WriteAll(peer_, peer_down_.data(), peer_down_.size())) {
      }
    });
  }
  LoopbackTcpFloor(const LoopbackTcpFloor&) = delete;
  LoopbackTcpFloor& operator=(const LoopbackTcpFloor&) = delete;
  ~LoopbackTcpFloor() {
    shutdown(client_, SHUT_RDWR);
    thread_.join();
    close(client_);
    close(peer_);
  }

  // One round trip: the request's bytes up, the reply's down. Milliseconds.
  double RoundTripMs() {
    const auto start = std::chrono::steady_clock::now();
    if (!WriteAll(client_, up_.data(), up_.size()) ||
        !ReadAll(client_, down_.data(), down_.size())) {
      std::fprintf(stderr, "loopback TCP floor: the peer went away\n");
      std::exit(1);
    }
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
        .count();
  }

 private:
  static int Check(int rc, const char* what) {
    if (rc < 0) {
      std::fprintf(stderr, "loopback TCP floor: %s: %s\n", what, std::strerror(errno));
      std::exit(1);
    }
    return rc;
  }
  static bool ReadAll(int fd, char* p, size_t n) {
    while (n > 0) {
      const ssize_t got = recv(fd, p, n, 0);
      if (got < 0 && errno == EINTR) continue;
      if (got <= 0) return false;
      p += got;
      n -= static_cast<size_t>(got);
    }
    return true;
  }
  static bool WriteAll(int fd, const char* p, size_t n) {
    while (n > 0) {
      const ssize_t put = send(fd, p, n, MSG_NOSIGNAL);
      if (put < 0 && errno == EINTR) continue;
      if (put <= 0) return false;
      p += put;
      n -= static_cast<size_t>(put);
    }
    return true;
  }

  std::vector<char> up_, down_, peer_up_, peer_down_;
  int client_ = -1, peer_ = -1;
  std::thread thread_;
};

}  // namespace natgrad::bench

#endif  // NATGRAD_BENCH_COMMON_LOOPBACK_TCP_FLOOR_H_
