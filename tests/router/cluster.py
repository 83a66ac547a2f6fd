"""natgrad replicas behind a real nginx on loopback, for tests/router and
bench/router.

Replicas are natgrad.LocalServer processes (port 0 + --port_file, readiness
by the port file and a gRPC connect). nginx is Debian's binary, run
unprivileged from a temp prefix with the config that deploy/nginx/render.py
renders. Its port is picked by binding port 0 and closing the socket just
before nginx starts: another process could take the port in between (a
small race on a busy machine); nginx then exits with "Address already in
use" and start() tries another port, up to three times.
"""
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time

import grpc

import natgrad

REPO = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
sys.path.insert(0, os.path.join(REPO, "deploy", "nginx"))
import render  # noqa: E402  (deploy/nginx/render.py)

ADMIN_TOKEN = "router-test-admin-token"


def find_nginx():
    for c in (os.environ.get("NGINX"), shutil.which("nginx"), "/usr/sbin/nginx"):
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def free_port(host="127.0.0.1"):
    """A port that was free a moment ago (see the module docstring's race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout, what, interval=0.01):
    """Polls predicate() until it is true (returning its value) or raises
    TimeoutError after `timeout` seconds. Polling a condition with a
    deadline, not a sleep standing in for synchronisation."""
    deadline = time.monotonic() + timeout
    while True:
        v = predicate()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class Nginx:
    """nginx in front of `replicas` [(name, 'host:port')], from a prefix dir."""

    def __init__(self, replicas, prefix, *, binary=None, worker_processes=1, access_log=True):
        self.binary = binary or find_nginx()
        if self.binary is None:
            raise FileNotFoundError("nginx not found (scripts/setup installs Debian's nginx)")
        self.replicas = list(replicas)
        self.prefix = os.path.abspath(prefix)
        self.conf = os.path.join(self.prefix, "nginx.conf")
        self.worker_processes = worker_processes
        self.access_log = access_log
        self.proc = None
        self.port = None
        render.make_dirs(self.prefix)

    @property
    def target(self):
        return f"127.0.0.1:{self.port}"

    @property
    def access_log_path(self):
        return os.path.join(self.prefix, "access.log")

    def render(self, port):
        # Started as root, nginx would switch its workers to `nobody`, who
        # cannot reach a private temp prefix: keep them as the current user.
        user = pwd.getpwuid(os.geteuid()).pw_name if os.geteuid() == 0 else None
        text = render.render(self.replicas, f"127.0.0.1:{port}", self.prefix,
                             worker_processes=self.worker_processes, user=user,
                             access_log=self.access_log, log_level="info")
        with open(self.conf, "w") as f:
            f.write(text)

    def check_config(self):
        """`nginx -t` on the rendered config: (returncode, output)."""
        r = subprocess.run([self.binary, "-t", "-p", self.prefix, "-e", "stderr", "-c", self.conf],
                           capture_output=True, text=True, timeout=30)
        return r.returncode, r.stdout + r.stderr

    def start(self, timeout=20.0):
        last = ""
        for _ in range(3):
            port = free_port()
            self.render(port)
            rc, out = self.check_config()
            if rc != 0:
                raise RuntimeError(f"nginx -t failed:\n{out}")
            log = open(os.path.join(self.prefix, "nginx.stderr"), "ab")
            self.proc = subprocess.Popen([self.binary, "-p", self.prefix, "-e", "stderr",
                                          "-c", self.conf], stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
            log.close()

            def listening():
                if self.proc.poll() is not None:
                    return "exited"
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    return "up"
                except OSError:
                    return None
            state = wait_until(listening, timeout, f"nginx to listen on {port}")
            if state == "up":
                self.port = port
                return self
            last = self.log_tail()
            if "in use" not in last:
                raise RuntimeError(f"nginx exited with {self.proc.returncode}:\n{last}")
        raise RuntimeError(f"nginx could not bind a free port three times:\n{last}")

    def log_tail(self, n=4000):
        out = []
        for name in ("nginx.stderr", "error.log"):
            try:
                with open(os.path.join(self.prefix, name), "rb") as f:
                    out.append(f"--- {name}\n" + f.read()[-n:].decode(errors="replace"))
            except OSError:
                pass
        return "\n".join(out)

    def access_lines(self):
        try:
            with open(self.access_log_path) as f:
                return f.read().splitlines()
        except OSError:
            return []

    def stop(self, timeout=20.0):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful: the access log is complete
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Replicas:
    """`n` natgrad-server replicas named natgrad-0.. with their own checkpoint
    dirs and an admin token file, on 127.0.0.1 port 0. routing_flags=False
    leaves out --replica_name/--admin_token_file (tests of nginx alone)."""

    def __init__(self, n, workdir, *, binary=None, extra_args=(), routing_flags=True):
        self.workdir = workdir
        os.makedirs(workdir, exist_ok=True)
        self.token_file = os.path.join(workdir, "admin.token")
        with open(self.token_file, "w") as f:
            f.write(ADMIN_TOKEN + "\n")
        self.names = [f"natgrad-{i}" for i in range(n)]
        self.servers = []
        for i, name in enumerate(self.names):
            ckpt = os.path.join(workdir, f"{name}-checkpoints")
            os.makedirs(ckpt, exist_ok=True)
            self.servers.append(natgrad.LocalServer(
                binary, checkpoint_dir=ckpt, log_path=os.path.join(workdir, f"{name}.log"),
                extra_args=([f"--replica_name={name}", f"--admin_token_file={self.token_file}"]
                            if routing_flags else []) + list(extra_args)))

    def start(self):
        for s in self.servers:
            s.start()
        return self

    def pairs(self):
        return [(n, s.target) for n, s in zip(self.names, self.servers)]

    def stop(self):
        for s in self.servers:
            try:
                s.stop()
            finally:
                s.cleanup()


def drain(target, peers, token=ADMIN_TOKEN, timeout=60.0):
    """AdminService.Drain on the replica at `target` towards peers
    [(name, address)]; returns the DrainResponse."""
    from natgrad._pb import admin_service_pb2, admin_service_pb2_grpc
    with grpc.insecure_channel(target) as ch:
        stub = admin_service_pb2_grpc.AdminServiceStub(ch)
        req = admin_service_pb2.DrainRequest(
            peers=[admin_service_pb2.Peer(replica=n, address=a) for n, a in peers])
        return stub.Drain(req, timeout=timeout, metadata=(("authorization", f"Bearer {token}"),))


_monitors = {}


def sessions_on(target):
    """{session id: last_step} of the sessions a replica holds (ListSessions
    on a channel kept per target, so polling does not reconnect each time);
    {} while the replica does not answer."""
    c = _monitors.get(target)
    if c is None:
        c = _monitors[target] = natgrad.Client(
            target, timeout=10, retry=natgrad.RetryPolicy(max_attempts=3, deadline_s=10))
    try:
        return {s.name.split("/", 1)[1]: s.last_step for s in c.list_sessions()}
    except natgrad.Unavailable:
        return {}
