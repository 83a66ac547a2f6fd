"""Shared fixtures: a real natgrad-server child process per test session.

The binary comes from $NATGRAD_SERVER (CTest sets it) or
build/server/natgrad-server. Without one the server tests skip, unless
$NATGRAD_REQUIRE_SERVER=1 (set by CTest), where they fail instead.
Readiness: the server's --port_file is polled, then the gRPC channel must
connect (grpc.channel_ready_future); no fixed sleeps.
"""
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # kfac_reference, svgp helpers

import natgrad  # noqa: E402


def _binary_or_skip():
    b = natgrad.find_server_binary()
    if b is None:
        msg = ("natgrad-server binary not found (set NATGRAD_SERVER or build "
               "build/server/natgrad-server)")
        if os.environ.get("NATGRAD_REQUIRE_SERVER") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return b


@pytest.fixture(scope="session")
def server_binary():
    return _binary_or_skip()


@pytest.fixture(scope="session")
def server(server_binary, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    srv = natgrad.LocalServer(server_binary, log_path=str(log),
                              extra_args=["--worker_threads=2", "--shutdown_grace_s=2"])
    srv.start()
    yield srv
    srv.stop()
    srv.cleanup()


@pytest.fixture(scope="session")
def target(server):
    return server.target


@pytest.fixture()
def client(target):
    c = natgrad.Client(target, retry=natgrad.RetryPolicy(deadline_s=20.0))
    yield c
    c.close()


def crashable_server(server_binary, tmp_path, every, extra_args=()):
    """A started private server checkpointing every `every` steps, whose
    .crash() SIGKILLs it and starts it again on the same port and checkpoint
    directory (.kills counts them). The caller stops and cleans it up."""
    srv = natgrad.LocalServer(server_binary, log_path=str(tmp_path / "server.log"),
                              checkpoint_dir=str(tmp_path / "ckpt"),
                              extra_args=[*extra_args, f"--checkpoint_every_steps={every}",
                                          "--worker_threads=2", "--shutdown_grace_s=2"])
    srv.start()
    srv.kills = 0

    def crash():
        srv.kill()
        srv.kills += 1
        srv.start()
    srv.crash = crash
    return srv


def patient_client(target, **kw):
    """A client that rides out a server restart."""
    return natgrad.Client(target, retry=natgrad.RetryPolicy(deadline_s=60, max_attempts=200,
                                                            max_backoff=0.2), **kw)


@pytest.fixture()
def fresh_server(server_binary, tmp_path):
    """A private server for tests that stop/restart it."""
    srv = natgrad.LocalServer(server_binary, log_path=str(tmp_path / "server.log"),
                              checkpoint_dir=str(tmp_path / "ckpt"),
                              extra_args=["--checkpoint_every_steps=1", "--worker_threads=2",
                                          "--shutdown_grace_s=2"])
    srv.start()
    yield srv
    srv.stop()
    srv.cleanup()
