"""Start the real natgrad-server with the deploy files' flags.

Flag names are checked elsewhere; this checks that the server accepts the
values and the flagfile syntax as absl really parses them, reports SERVING on
grpc.health.v1 (what the Kubernetes probes ask), and exits cleanly on SIGTERM
within --shutdown_grace_s (what the grace periods assume). Listen addresses and
the checkpoint directory are overridden by later flags (absl: last one wins),
so the test binds free local ports and a temp dir.
"""
import json
import signal
import subprocess
import time

import pytest

from conftest import (DOCKERFILE, dockerfile_instructions, effective, parse_flag_args)


def _health_status(port, timeout=10.0):
    """grpc.health.v1.Health/Check for service "" with hand-encoded protobuf:
    the request is empty; the response is field 1 (enum status), SERVING = 1."""
    grpc = pytest.importorskip("grpc", reason="python3-grpcio not installed")
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        check = ch.unary_unary("/grpc.health.v1.Health/Check")
        reply = check(b"", timeout=timeout, wait_for_ready=True)
    return {b"": 0, b"\x08\x00": 0, b"\x08\x01": 1, b"\x08\x02": 2, b"\x08\x03": 3}[reply]


def _run(server_binary, tmp_path, args, grace):
    port_file = tmp_path / "port"
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    cmd = [server_binary, *args,
           "--address=127.0.0.1:0", "--metrics_address=",
           f"--checkpoint_dir={ckpt}", f"--port_file={port_file}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            if proc.poll() is not None:
                pytest.fail(f"server exited {proc.returncode} at start-up:\n"
                            f"{' '.join(cmd)}\n{proc.stdout.read()}")
            assert time.monotonic() < deadline, "no --port_file after 30 s"
            time.sleep(0.05)
        port = int(port_file.read_text().strip())
        assert _health_status(port) == 1, "grpc.health.v1 does not report SERVING"
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=grace + 5)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {grace + 5} s after SIGTERM (--shutdown_grace_s={grace})")
        out = proc.stdout.read()
        assert rc == 0, f"exit status {rc} after SIGTERM:\n{out}"
        assert time.monotonic() - t0 <= grace + 5
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_k8s_flagfile_starts_the_server(k8s_base, server_binary, tmp_path):
    # (The GPU overlay uses the same flagfile plus --inversion_backend=cuda,
    # which needs a GPU; test_k8s checks that it changes nothing else.)
    _, text = k8s_base.flagfile()
    flagfile = tmp_path / "flags"
    flagfile.write_text(text)
    # The container's args, with the flagfile at its temp path.
    args = [f"--flagfile={flagfile}" if n == "flagfile" else a
            for (n, _), a in zip(parse_flag_args(k8s_base.container["args"]),
                                 k8s_base.container["args"])]
    grace = int(effective(k8s_base.flags())["shutdown_grace_s"])
    _run(server_binary, tmp_path, args, grace)


def test_docker_entrypoint_and_compose_command_start_the_server(compose, server_binary,
                                                                 server_flags, tmp_path):
    entry = json.loads(dict(dockerfile_instructions(DOCKERFILE))["ENTRYPOINT"])
    args = entry[1:] + compose["services"]["natgrad"].get("command", [])
    f = effective(parse_flag_args(args))
    grace = int(f.get("shutdown_grace_s", server_flags["shutdown_grace_s"]))
    _run(server_binary, tmp_path, args, grace)
