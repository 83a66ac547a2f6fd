"""deploy/nginx: the rendered config passes `nginx -t` and routes gRPC as
docs/replicas.md says, with Debian's nginx in front of real natgrad-servers."""
import os
import subprocess
import sys

import grpc
import numpy as np
import pytest

import natgrad
from natgrad import blocks
from natgrad._pb import optimizer_service_pb2 as svc_pb2, optimizer_service_pb2_grpc as svc_grpc

import cluster
from cluster import render

pytestmark = pytest.mark.skipif(cluster.find_nginx() is None,
                                reason="nginx not installed (scripts/setup installs it)")


def test_debian_nginx_has_http2_and_grpc():
    r = subprocess.run([cluster.find_nginx(), "-V"], capture_output=True, text=True)
    out = r.stdout + r.stderr
    assert "--with-http_v2_module" in out
    assert "--without-http_grpc_module" not in out  # built in unless switched off


def test_rendered_config_passes_nginx_t(tmp_path):
    ngx = cluster.Nginx([(f"natgrad-{i}", f"127.0.0.1:{50051 + i}") for i in range(3)], tmp_path)
    ngx.render(18080)
    rc, out = ngx.check_config()
    assert rc == 0, out
    text = open(ngx.conf).read()
    assert "hash $http_natgrad_session_key consistent;" in text
    assert "map $http_natgrad_replica $natgrad_upstream" in text
    for i in range(3):
        assert f'"natgrad-{i}" natgrad_replica_{i};' in text
    # Nothing of Debian's root-only defaults is written to.
    directives = "\n".join(ln.split("#", 1)[0] for ln in text.splitlines())
    for path in ("/var/log/nginx", "/var/lib/nginx", "/run/nginx.pid"):
        assert path not in directives


def test_cli_matches_render_and_passes_nginx_t(tmp_path):
    out = tmp_path / "nginx.conf"
    args = ["--listen", "127.0.0.1:18081", "--prefix", str(tmp_path), "--make_dirs",
            "--replica", "a=127.0.0.1:5001", "--replica", "b=localhost:5002", "--out", str(out)]
    if os.geteuid() == 0:
        args += ["--user", "root"]
    subprocess.run([sys.executable, os.path.join(cluster.REPO, "deploy", "nginx", "render.py")] + args,
                   check=True)
    header, _, text = out.read_text().partition("\n")
    assert header.startswith(render.GENERATED)
    assert text == render.render([("a", "127.0.0.1:5001"), ("b", "localhost:5002")],
                                            "127.0.0.1:18081", str(tmp_path),
                                            user="root" if os.geteuid() == 0 else None)
    r = subprocess.run([cluster.find_nginx(), "-t", "-p", str(tmp_path), "-e", "stderr", "-c", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("replicas,listen,prefix,match", [
    ([], "8080", "/tmp/x", "at least one replica"),
    ([("a", "h:1"), ("a", "h:2")], "8080", "/tmp/x", "name 'a' given twice"),
    ([("a", "h:1"), ("b", "h:1")], "8080", "/tmp/x", "address 'h:1' given twice"),
    ([("a b", "h:1")], "8080", "/tmp/x", "replica name"),
    ([("a", "h")], "8080", "/tmp/x", "not HOST:PORT"),
    ([("a", "h:70000")], "8080", "/tmp/x", "not HOST:PORT"),
    ([("a", "h:1")], "8080", "rel/dir", "absolute"),
    ([("a", "h:1")], "0.0.0.0:80; evil", "/tmp/x", "listen"),
])
def test_renderer_rejects_bad_input(replicas, listen, prefix, match):
    with pytest.raises(ValueError, match=match):
        render.render(replicas, listen, prefix)


@pytest.fixture(scope="module")
def routed(tmp_path_factory):
    """Two plain servers (no routing flags needed) behind nginx."""
    work = tmp_path_factory.mktemp("nginx-routing")
    reps = cluster.Replicas(2, str(work), routing_flags=False).start()
    ngx = cluster.Nginx(reps.pairs(), str(work / "nginx"))
    try:
        ngx.start()
        yield reps, ngx
    finally:
        ngx.stop()
        reps.stop()


def _get(target, sid, replica=None):
    md = [("natgrad-session-key", sid)] + ([("natgrad-replica", replica)] if replica else [])
    with grpc.insecure_channel(target) as ch:
        return svc_grpc.OptimizerServiceStub(ch).GetSession(
            svc_pb2.GetSessionRequest(name=f"sessions/{sid}"), timeout=10, metadata=md)


def test_sessions_hash_to_one_replica_each(routed):
    reps, ngx = routed
    c = natgrad.Client(ngx.target)
    ids = [f"hash-{i}" for i in range(24)]
    for sid in ids:
        s = c.create_session([blocks.sgd("w", [3], lr=0.1)], session_id=sid)
        s.step({"w": np.ones(3)})  # the stream goes where CreateSession went
        s.step({"w": np.ones(3)})
        s.close()
    held = [cluster.sessions_on(srv.target) for srv in reps.servers]
    for sid in ids:
        where = [i for i, h in enumerate(held) if sid in h]
        assert len(where) == 1, f"{sid} on replicas {where}"
        assert held[where[0]][sid] == 2
    # 24 keys over two replicas: both get some (all on one: p = 2^-23).
    assert all(any(sid in h for sid in ids) for h in held)
    lines = [ln for ln in ngx.access_lines() if "key=hash-" in ln]
    assert any("/Step " in ln for ln in lines) and any("/CreateSession " in ln for ln in lines)
    c.close()


def test_replica_header_picks_the_upstream(routed):
    reps, ngx = routed
    direct = natgrad.Client(reps.servers[1].target)
    direct.create_session([blocks.sgd("w", [2], lr=0.1)], session_id="on-one")
    assert _get(ngx.target, "on-one", "natgrad-1").name == "sessions/on-one"
    with pytest.raises(grpc.RpcError) as e:
        _get(ngx.target, "on-one", "natgrad-0")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    # An unknown name falls back to the hash (it reaches some replica).
    try:
        _get(ngx.target, "on-one", "no-such-replica")
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.NOT_FOUND
    direct.close()


def test_large_messages_and_streams_pass(routed):
    _, ngx = routed
    c = natgrad.Client(ngx.target)
    n = 3 << 20  # 24 MiB of float64 in one StepRequest
    s = c.create_session([blocks.sgd("big", [n], lr=0.5)], session_id="big-one")
    g = np.arange(n, dtype=np.float64) / n
    r = s.step({"big": g})
    np.testing.assert_allclose(r["big"], -0.5 * g, rtol=1e-6)  # float32 state
    s.delete()
    c.close()


def test_no_failover_to_a_replica_without_the_session(tmp_path):
    """A dead replica's sessions answer UNAVAILABLE (the client retries), not
    NOT_FOUND from a replica that does not hold them."""
    reps = cluster.Replicas(2, str(tmp_path), routing_flags=False).start()
    ngx = cluster.Nginx(reps.pairs(), str(tmp_path / "nginx"))
    try:
        ngx.start()
        c = natgrad.Client(ngx.target)
        ids = [f"dead-{i}" for i in range(24)]
        for sid in ids:
            c.create_session([blocks.sgd("w", [1], lr=0.1)], session_id=sid)
        on0 = cluster.sessions_on(reps.servers[0].target)
        victims = [sid for sid in ids if sid in on0]
        assert victims, "24 keys over two replicas, none on natgrad-0 (p = 2^-24)"
        reps.servers[0].kill()
        for sid in victims:
            for replica in (None, "natgrad-0"):
                with pytest.raises(grpc.RpcError) as e:
                    _get(ngx.target, sid, replica)
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE, (sid, replica, e.value)
        c.close()
    finally:
        ngx.stop()
        reps.stop()


def test_compose_router_config_is_rendered_and_mounted():
    """deploy/nginx/compose.conf is what its first line's command renders
    now, and docker-compose.yml's router service mounts it and publishes
    its listen port."""
    import shlex
    import yaml
    conf = os.path.join(cluster.REPO, "deploy", "nginx", "compose.conf")
    with open(conf) as f:
        header, _, text = f.read().partition("\n")
    assert header.startswith(render.GENERATED)
    args = shlex.split(header[len(render.GENERATED):])
    i = args.index("--out")
    assert os.path.join(cluster.REPO, args[i + 1]) == conf
    expected = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"compose-{os.getpid()}.conf")
    args[i + 1] = expected
    try:
        assert render.main(args) == 0
        with open(expected) as f:
            assert f.read().partition("\n")[2] == text, "rerun the command on compose.conf's first line"
    finally:
        os.unlink(expected)
    with open(os.path.join(cluster.REPO, "docker-compose.yml")) as f:
        svc = yaml.safe_load(f)["services"]
    router = svc["router"]
    mounts = [v.split(":") for v in router["volumes"]]
    cfg = [m for m in mounts if os.path.normpath(os.path.join(cluster.REPO, m[0])) == conf]
    assert len(cfg) == 1
    cmd = router["command"]
    assert cmd[cmd.index("-c") + 1] == cfg[0][1]
    listen = args[args.index("--listen") + 1]
    assert f"{listen.rsplit(':', 1)[-1]}:{listen.rsplit(':', 1)[-1]}" in [str(p) for p in router["ports"]]
    for r in (x for j, x in enumerate(args) if j and args[j - 1] == "--replica"):
        name, host = r.split("=")[0], r.split("=")[1].rsplit(":", 1)[0]
        assert host in svc and svc[host].get("hostname", host) == name
    assert "natgrad" in router["depends_on"]
