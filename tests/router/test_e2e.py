"""End to end: 24 sessions through nginx over three replicas, one replica
SIGKILLed and restarted and another drained while the sessions stream, and
every session's updates bit-identical to an uninterrupted single-server run.

Clients: two Python load client processes (router_load_client.py, sessions
rp-0..rp-11) and two C++ ones (router_load_client, rt-0..rt-11) when
$NATGRAD_ROUTER_LOAD_CLIENT names the binary (CTest sets it when the target
is built; without it the C++ half is replaced by two more Python processes,
rp-12..rp-23, and the test says so in its skip report of
test_cpp_client_present).

Sequence (every wait is a poll of a condition with a deadline):
  1. reference: the same four clients against one fresh server, unpaced;
  2. three replicas (--checkpoint_every_steps=2, so a SIGKILL loses the
     step after the last checkpoint and the clients replay it) behind nginx;
     the four clients start, paced with --step_interval_ms;
  3. once a quarter of all steps are done: SIGKILL the replica holding the
     most sessions, restart it on the same port and checkpoint dir;
  4. once half are done: Drain the other replica with the most unfinished
     sessions onto the remaining two;
  5. every client exits 0 (no call failed past its retries) and writes the
     same digest per session as the reference; the drained replica holds
     nothing; nginx's access log shows the routing metadata on every call.
"""
import os
import subprocess
import sys

import pytest

import cluster

HERE = os.path.dirname(os.path.abspath(__file__))
PY_CLIENT = os.path.join(HERE, "router_load_client.py")
STEPS = 120
PER_CLIENT = 6
INTERVAL_MS = 25
CPP_CLIENT = os.environ.get("NATGRAD_ROUTER_LOAD_CLIENT")

pytestmark = pytest.mark.skipif(cluster.find_nginx() is None,
                                reason="nginx not installed (scripts/setup installs it)")


def _clients():
    """(kind, first_index) of the four load client processes."""
    if CPP_CLIENT:
        return [("py", 0), ("py", PER_CLIENT), ("cpp", 0), ("cpp", PER_CLIENT)]
    return [("py", i * PER_CLIENT) for i in range(4)]


def _start_clients(target, workdir, tag, interval_ms, token_file=None):
    procs = []
    for kind, first in _clients():
        out = os.path.join(workdir, f"{tag}-{kind}-{first}.txt")
        err = open(os.path.join(workdir, f"{tag}-{kind}-{first}.stderr"), "wb")
        cmd = ([sys.executable, PY_CLIENT] if kind == "py" else [CPP_CLIENT])
        cmd += ["--target", target, "--sessions", str(PER_CLIENT), "--first_index", str(first),
                "--steps", str(STEPS), "--out", out, "--step_interval_ms", str(interval_ms)]
        if token_file:
            cmd += ["--token_file", token_file]
        procs.append((cmd, out, err.name, subprocess.Popen(cmd, stdout=err, stderr=subprocess.STDOUT,
                                                           stdin=subprocess.DEVNULL)))
        err.close()
    return procs


def _finish(procs, timeout):
    lines = {}
    for cmd, out, err, p in procs:
        try:
            rc = p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            rc = "timeout"
        with open(err, errors="replace") as f:
            log = f.read()
        assert rc == 0, f"{' '.join(cmd)} exited {rc}:\n{log[-4000:]}"
        print(f"--- {os.path.basename(err)}\n" + "\n".join(
            ln for ln in log.splitlines() if "retries=" in ln or ln.startswith("stats")))
        with open(out) as f:
            for ln in f.read().splitlines():
                sid, step, digest = ln.split()
                lines[sid] = (int(step), digest)
    return lines


def _progress(reps):
    """{session id: last step} over the replicas that answer."""
    held = {}
    for srv in reps.servers:
        for sid, step in cluster.sessions_on(srv.target).items():
            held[sid] = max(step, held.get(sid, -1))
    return held


def _wait(reps, procs, predicate, what):
    """wait_until with what the clients and replicas were doing when it timed out."""
    try:
        cluster.wait_until(predicate, 90, what)
    except TimeoutError as e:
        logs = []
        for _, _, err, p in procs:
            with open(err, errors="replace") as f:
                logs.append(f"--- {os.path.basename(err)} (exit {p.poll()})\n{f.read()[-1500:]}")
        prog = _progress(reps)
        raise AssertionError(f"{e}; progress: {len(prog)} sessions, {sum(prog.values())} steps "
                             f"{prog}\n" + "\n".join(logs)) from None


def test_cpp_client_present():
    if not CPP_CLIENT:
        pytest.skip("NATGRAD_ROUTER_LOAD_CLIENT not set: the e2e run used Python load clients only")
    assert os.access(CPP_CLIENT, os.X_OK), CPP_CLIENT


def test_kill_restart_and_drain_keep_every_update(tmp_path):
    total = len(_clients()) * PER_CLIENT
    n_steps = total * STEPS

    # 1. Reference: one server, nothing interrupted.
    ref_dir = tmp_path / "reference"
    ref_dir.mkdir()
    ref = cluster.Replicas(1, str(ref_dir)).start()
    try:
        reference = _finish(_start_clients(ref.servers[0].target, str(ref_dir), "ref", 0), 120)
    finally:
        ref.stop()
    assert len(reference) == total and all(s == STEPS for s, _ in reference.values())

    # 2. Three replicas behind nginx.
    reps = cluster.Replicas(3, str(tmp_path), extra_args=["--checkpoint_every_steps=2"]).start()
    ngx = cluster.Nginx(reps.pairs(), str(tmp_path / "nginx"))
    procs = []
    try:
        ngx.start()
        procs = _start_clients(ngx.target, str(tmp_path), "routed", INTERVAL_MS)

        # 3. SIGKILL the busiest replica mid-run and restart it.
        _wait(reps, procs, lambda: len(_progress(reps)) == total
              and sum(_progress(reps).values()) >= n_steps // 4, "a quarter of the steps")
        held = [cluster.sessions_on(s.target) for s in reps.servers]
        victim = max(range(3), key=lambda i: len(held[i]))
        assert any(step < STEPS for step in held[victim].values()), \
            "the victim's sessions had all finished before the kill (clients too fast?)"
        reps.servers[victim].kill()
        reps.servers[victim].start()

        # 4. Drain another replica while its sessions stream.
        _wait(reps, procs, lambda: sum(_progress(reps).values()) >= n_steps // 2,
              "half of the steps")
        held = [cluster.sessions_on(s.target) for s in reps.servers]
        others = [i for i in range(3) if i != victim]
        drained = max(others, key=lambda i: sum(step < STEPS for step in held[i].values()))
        assert any(step < STEPS for step in held[drained].values()), \
            "no unfinished session left on the replica to drain (clients too fast?)"
        peers = [(reps.names[i], reps.servers[i].target) for i in range(3) if i != drained]
        resp = cluster.drain(reps.servers[drained].target, peers)
        print(f"killed {reps.names[victim]} holding {len(held[victim])} sessions; drained "
              f"{reps.names[drained]}: moved {resp.moved}, failed {resp.failed}")
        assert resp.failed == 0, list(resp.errors)
        assert resp.moved == len(held[drained]), (resp, sorted(held[drained]))

        # 5. Everything finished, bit for bit.
        routed = _finish(procs, 120)
        procs = []
        assert cluster.sessions_on(reps.servers[drained].target) == {}
        final = _progress(reps)
        assert sorted(final) == sorted(reference)
        assert all(step == STEPS for step in final.values()), final
    finally:
        for _, _, _, p in procs:
            p.kill()
            p.wait()
        ngx.stop()
        reps.stop()

    assert sorted(routed) == sorted(reference)
    diff = [sid for sid in reference if routed[sid] != reference[sid]]
    assert not diff, {sid: (routed[sid], reference[sid]) for sid in diff}

    # The routing metadata on every call nginx saw; the replica header on
    # every call but a session's first CreateSession.
    calls = [ln for ln in ngx.access_lines() if '"POST /natgrad.v1.' in ln]
    assert calls
    for ln in calls:
        assert "key=-" not in ln, ln
        if "/CreateSession " not in ln:
            assert "replica=-" not in ln, ln
