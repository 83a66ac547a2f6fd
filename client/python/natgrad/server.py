"""Start a local natgrad-server for examples, tests and notebooks.

    with natgrad.LocalServer() as srv:          # 127.0.0.1, port 0, temp checkpoint dir
        client = natgrad.Client(srv.target)

The binary is found from the `binary` argument, $NATGRAD_SERVER, or
build/server/natgrad-server in the source tree (or on PATH). Readiness is
detected by polling the --port_file the server writes and then waiting for
the gRPC channel to connect (no fixed sleeps).
"""
import os
import shutil
import signal
import subprocess
import tempfile
import time

import grpc

_REPO = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))


def find_server_binary(binary=None):
    """The natgrad-server path, or None."""
    cands = [binary, os.environ.get("NATGRAD_SERVER"),
             os.path.join(_REPO, "build", "server", "natgrad-server"),
             shutil.which("natgrad-server")]
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


class LocalServer:
    """A natgrad-server child process on 127.0.0.1 (port 0 unless given).

    extra_args: more flags (e.g. ["--checkpoint_every_steps=1"]).
    checkpoint_dir: None -> a fresh temp dir (removed on stop unless keep_dir).
    log_path: server stderr/stdout go here (a temp file by default)."""

    def __init__(self, binary=None, *, port=0, host="127.0.0.1", checkpoint_dir=None,
                 extra_args=(), log_path=None, startup_timeout=30.0, keep_dir=False):
        self.binary = find_server_binary(binary)
        if self.binary is None:
            raise FileNotFoundError(
                "natgrad-server not found: pass --server / binary=, set $NATGRAD_SERVER, or "
                "build it: cmake -S . -B build -G Ninja && cmake --build build --target natgrad-server")
        self.host, self.port = host, int(port)
        self._tmp = tempfile.mkdtemp(prefix="natgrad-server-")
        self.checkpoint_dir = checkpoint_dir or os.path.join(self._tmp, "checkpoints")
        os.makedirs(self.checkpoint_dir, exist_ok=True)
        self.extra_args = list(extra_args)
        self.log_path = log_path or os.path.join(self._tmp, "server.log")
        self.startup_timeout = startup_timeout
        self.keep_dir = keep_dir
        self.proc = None
        self._log = None
        # Wait for a plaintext gRPC connection after the port file appears.
        self._probe = not any(a.startswith("--tls_cert") for a in self.extra_args)

    @property
    def target(self):
        return f"{self.host}:{self.port}"

    def start(self):
        port_file = os.path.join(self._tmp, "port")
        if os.path.exists(port_file):
            os.unlink(port_file)
        args = [self.binary, f"--address={self.host}:{self.port}", f"--port_file={port_file}",
                f"--checkpoint_dir={self.checkpoint_dir}"] + self.extra_args
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + self.startup_timeout
        port = None
        while port is None:
            if self.proc.poll() is not None:
                raise RuntimeError(f"natgrad-server exited with {self.proc.returncode} at start-up:\n"
                                   + self.log_tail())
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"natgrad-server wrote no port file in {self.startup_timeout}s:\n"
                                   + self.log_tail())
            try:
                with open(port_file) as f:
                    txt = f.read().strip()
                if txt:
                    port = int(txt.rsplit(":", 1)[-1])
            except (OSError, ValueError):
                pass
            if port is None:
                time.sleep(0.01)  # polling the port file, not a synchronisation sleep
        self.port = port
        if not self._probe:  # e.g. TLS: the caller checks readiness with its own channel
            return self
        with grpc.insecure_channel(self.target) as ch:
            try:
                grpc.channel_ready_future(ch).result(timeout=max(1.0, deadline - time.monotonic()))
            except grpc.FutureTimeoutError:
                self.kill()
                raise TimeoutError(f"natgrad-server on {self.target} did not accept connections:\n"
                                   + self.log_tail()) from None
        return self

    def log_tail(self, n=4000):
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout=30.0):
        """SIGTERM (the server checkpoints and drains), then SIGKILL after timeout."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._close_log()
        return self.proc.returncode if self.proc else None

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._close_log()

    def restart(self, **kw):
        """Stops and starts again on the same port and checkpoint dir."""
        self.stop(**kw)
        return self.start()

    def _close_log(self):
        if self._log:
            self._log.close()
            self._log = None

    def cleanup(self):
        self.kill()
        if not self.keep_dir:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        self.cleanup()
