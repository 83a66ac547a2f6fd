"""Multi-replica client behaviour against real servers (no router): session
ids chosen by the client, the replica learned from Session.replica,
UNAVAILABLE retried within the retry deadline, and SessionMoved redirects
after AdminService.Drain followed with every update bit-identical to an
uninterrupted run. (Through nginx: tests/router.)"""
import re
import threading
import time

import grpc
import numpy as np
import pytest

import natgrad
from natgrad import blocks

TOKEN = "routing-test-admin"


def _model():
    return [blocks.kfac_dense("fc", 3, 2, bias=True, lr=0.1, damping=1e-2),
            blocks.adam("w", [4], lr=0.01)]


def _inputs(t):
    rng = np.random.default_rng([7, t])
    a, g = rng.standard_normal((5, 3)), rng.standard_normal((5, 2)) / 5
    return {"fc": {"gradient": g.T @ np.hstack([a, np.ones((5, 1))]), "activations": a,
                   "output_gradients": g},
            "w": rng.standard_normal(4)}


def _replica(binary, tmp_path, name, *extra):
    tok = tmp_path / "admin.token"
    tok.write_text(TOKEN + "\n")
    return natgrad.LocalServer(binary, checkpoint_dir=str(tmp_path / f"{name}-ckpt"),
                               log_path=str(tmp_path / f"{name}.log"),
                               extra_args=[f"--replica_name={name}", f"--admin_token_file={tok}",
                                           "--checkpoint_every_steps=1", *extra]).start()


def _drain(source, peers):
    from natgrad._pb import admin_service_pb2 as a_pb2, admin_service_pb2_grpc as a_grpc
    with grpc.insecure_channel(source.target) as ch:
        return a_grpc.AdminServiceStub(ch).Drain(
            a_pb2.DrainRequest(peers=[a_pb2.Peer(replica=n, address=s.target) for n, s in peers]),
            timeout=60, metadata=(("authorization", f"Bearer {TOKEN}"),))


def _reference(binary, tmp_path, steps):
    """The deltas of an uninterrupted run on one server."""
    srv = natgrad.LocalServer(binary, checkpoint_dir=str(tmp_path / "ref-ckpt"),
                              log_path=str(tmp_path / "ref.log")).start()
    try:
        c = natgrad.Client(srv.target)
        s = c.create_session(_model(), session_id="reference")
        out = [dict(s.step(_inputs(s.next_step))) for _ in range(steps)]
        c.close()
        return out
    finally:
        srv.stop()
        srv.cleanup()


def _assert_same(got, want):
    assert len(got) == len(want)
    for t, (g, w) in enumerate(zip(got, want)):
        assert sorted(g) == sorted(w)
        for n in w:
            assert g[n].tobytes() == w[n].tobytes(), f"step {t + 1} block {n}"


@pytest.fixture
def two(server_binary, tmp_path):
    a = _replica(server_binary, tmp_path, "alpha")
    b = _replica(server_binary, tmp_path, "beta")
    yield a, b
    for s in (a, b):
        s.stop()
        s.cleanup()


def test_session_ids_chosen_by_the_client(two):
    a, _ = two
    c = natgrad.Client(a.target)
    s1 = c.create_session(_model())
    s2 = c.create_session(_model())
    for s in (s1, s2):
        assert re.fullmatch(r"[a-z0-9-]{4,63}", s.id), s.id
    assert s1.id != s2.id
    assert c.create_session(_model(), session_id="mine-1").id == "mine-1"
    assert {x.name for x in c.list_sessions()} >= {s1.name, s2.name, "sessions/mine-1"}
    c.close()


def test_replica_learned_from_the_session(two):
    a, b = two
    for srv, name in ((a, "alpha"), (b, "beta")):
        c = natgrad.Client(srv.target)
        s = c.create_session(_model())
        assert s.replica == name == c.replica_of(s.name)
        assert natgrad.Client(srv.target).get_session(s.name).replica == name
        c.close()


class _Gate(natgrad.RetryPolicy):
    """A retry policy whose first backoff waits for the test: the call has
    failed once (failed) and goes on when the test says so (go)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.failed, self.go = threading.Event(), threading.Event()

    def sleep(self, attempt, start):
        self.failed.set()
        assert self.go.wait(60)


@pytest.mark.parametrize("what", ["step", "get_session"])
def test_unavailable_retried_until_the_server_is_back(server_binary, tmp_path, what):
    srv = _replica(server_binary, tmp_path, "alpha")
    try:
        gate = _Gate(max_attempts=0, deadline_s=60)
        c = natgrad.Client(srv.target, retry=gate)
        s = c.create_session(_model())
        s.step(_inputs(1))
        srv.kill()
        box = {}

        def call():
            try:
                box["r"] = s.step(_inputs(2)) if what == "step" else c.get_session_info(s.name)
            except Exception as e:  # noqa: BLE001  (checked below)
                box["e"] = e
        th = threading.Thread(target=call)
        th.start()
        assert gate.failed.wait(30), "the call never failed against the dead server"
        srv.start()  # same port and checkpoint dir
        gate.go.set()
        th.join(60)
        assert "e" not in box, box.get("e")
        if what == "step":
            assert box["r"].step == 2 and s.retries >= 1
        else:
            assert box["r"].last_step == 1
        c.close()
    finally:
        srv.stop()
        srv.cleanup()


def test_unavailable_gives_up_at_the_deadline():
    c = natgrad.Client("127.0.0.1:1", retry=natgrad.RetryPolicy(max_attempts=0, deadline_s=0.5))
    with pytest.raises(natgrad.Unavailable, match="127.0.0.1:1"):
        c.get_session_info("sessions/nowhere")
    c.close()


def test_drain_redirects_steps_and_creates(server_binary, tmp_path, two):
    a, b = two
    want = _reference(server_binary, tmp_path, 10)
    c = natgrad.Client(a.target)  # no router: the redirect's address is followed
    s = c.create_session(_model(), session_id="moving")
    got = [dict(s.step(_inputs(s.next_step))) for _ in range(5)]
    resp = _drain(a, [("beta", b)])
    assert (resp.moved, resp.failed) == (1, 0), resp
    got += [dict(s.step(_inputs(s.next_step))) for _ in range(5)]
    _assert_same(got, want)
    assert s.replica == "beta" and s.redirects >= 1
    assert natgrad.Client(b.target).get_session_info("moving").last_step == 10
    # A draining replica sends new sessions to a peer.
    s2 = c.create_session(_model(), session_id="born-elsewhere")
    assert s2.replica == "beta"
    assert natgrad.Client(b.target).get_session_info("born-elsewhere").last_step == 0
    # Unary calls follow the tombstone too.
    assert c.get_session_info("moving").replica == "beta"
    c.close()


def test_router_mode_without_a_router_stops_after_max_redirects(two):
    a, b = two
    c = natgrad.Client(a.target, redirects="router",
                       retry=natgrad.RetryPolicy(max_redirects=3))
    s = c.create_session(_model(), session_id="stuck")
    s.step(_inputs(1))
    _drain(a, [("beta", b)])
    with pytest.raises(natgrad.FailedPrecondition, match="moved"):
        s.step(_inputs(2))
    c.close()


def test_drain_while_streaming(server_binary, tmp_path, two):
    a, b = two
    steps = 150
    want = _reference(server_binary, tmp_path, steps)
    c = natgrad.Client(a.target, retry=natgrad.RetryPolicy(max_attempts=0, deadline_s=60))
    s = c.create_session(_model(), session_id="streaming")
    got, box = [], {}

    def run():
        try:
            for _ in range(steps):
                got.append(dict(s.step(_inputs(s.next_step))))
                time.sleep(0.005)  # pacing, so the drain lands mid-run
        except Exception as e:  # noqa: BLE001
            box["e"] = e
    th = threading.Thread(target=run)
    th.start()
    probe = natgrad.Client(a.target)
    deadline = time.monotonic() + 30
    while probe.get_session_info("streaming").last_step < 20:  # poll with a deadline
        assert time.monotonic() < deadline and th.is_alive()
        time.sleep(0.005)
    resp = _drain(a, [("beta", b)])
    th.join(60)
    assert "e" not in box, box.get("e")
    assert (resp.moved, resp.failed) == (1, 0), resp
    assert s.redirects >= 1, "the drain came after the last step"
    _assert_same(got, want)
    probe.close()
    c.close()
