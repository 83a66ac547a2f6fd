#!/usr/bin/env python3
"""Router overhead and scaling with Debian's nginx in front of natgrad replicas.

    .venv/bin/python bench/router/router_bench.py [--server build/server/natgrad-server]
        [--cpp_client build/tests/router/router_load_client]

1. Latency per step through nginx vs direct, same run: one replica, one
   session through nginx and one direct (same model), stepped alternately
   step by step; p50/p99 of the per-step round trip over blocks of --block
   steps each; the figure is the median over --rounds blocks.
2. Aggregate steps/s with 1 replica direct, and through nginx with 1 and
   with 3 replicas: --procs load
   client processes (tests/router/router_load_client.py, or the C++ one with
   --cpp_client) of --sessions each, unpaced; steps / wall-clock span.

Prints the figures (and --json FILE writes them). Not a test: figures depend
on the machine (docs/replicas.md quotes them with the machine they came from).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.normpath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, os.path.join(REPO, "tests", "router"))

import natgrad  # noqa: E402
import cluster  # noqa: E402
import router_load_client as load  # noqa: E402


def pct(xs, q):
    return float(np.percentile(np.asarray(xs), q))


def latency(binary, work, rounds, block):
    reps = cluster.Replicas(1, os.path.join(work, "lat"), binary=binary, routing_flags=False).start()
    ngx = cluster.Nginx(reps.pairs(), os.path.join(work, "lat", "nginx"), access_log=False)
    try:
        ngx.start()
        # max_replay_steps=0: the replica keeps no periodic checkpoints here, so
        # the clients would otherwise hold every step for replay.
        clients = {"direct": natgrad.Client(reps.servers[0].target, max_replay_steps=0),
                   "nginx": natgrad.Client(ngx.target, max_replay_steps=0)}
        sessions = {k: c.create_session(load.session_blocks(), session_id=f"lat-{k}")
                    for k, c in clients.items()}
        for s in sessions.values():  # warm up: channels, streams, first inversions
            for _ in range(20):
                s.step(load.step_inputs(0, s.next_step))
        per = {k: {"p50": [], "p99": []} for k in sessions}
        names = list(sessions)
        for r in range(rounds):
            ts = {k: [] for k in names}
            for i in range(block):
                # Step by step alternation (which one goes first alternates
                # too), so both paths see the same machine noise.
                for k in (names if i % 2 == 0 else names[::-1]):
                    s = sessions[k]
                    inp = load.step_inputs(1, s.next_step)
                    t0 = time.perf_counter()
                    s.step(inp)
                    ts[k].append(time.perf_counter() - t0)
            for k in names:
                per[k]["p50"].append(pct(ts[k], 50) * 1e6)
                per[k]["p99"].append(pct(ts[k], 99) * 1e6)
        for c in clients.values():
            c.close()
    finally:
        ngx.stop()
        reps.stop()
    out = {k: {q: statistics.median(v) for q, v in d.items()} for k, d in per.items()}
    out["added_us"] = {q: out["nginx"][q] - out["direct"][q] for q in ("p50", "p99")}
    return out


def throughput(binary, work, n_replicas, procs, sessions, steps, cpp_client, via_nginx=True):
    d = os.path.join(work, f"tp{n_replicas}{'' if via_nginx else 'direct'}")
    reps = cluster.Replicas(n_replicas, d, binary=binary, routing_flags=False).start()
    ngx = cluster.Nginx(reps.pairs(), os.path.join(d, "nginx"), access_log=False,
                        worker_processes=2)
    try:
        if via_nginx:
            ngx.start()
        target = ngx.target if via_nginx else reps.servers[0].target
        ps = []
        for i in range(procs):
            cmd = ([cpp_client] if cpp_client else [sys.executable, os.path.join(
                REPO, "tests", "router", "router_load_client.py")])
            cmd += ["--target", target, "--sessions", str(sessions), "--first_index",
                    str(i * sessions), "--steps", str(steps), "--out", os.path.join(d, f"out{i}.txt")]
            ps.append(subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True))
        t0 = time.time()
        logs = [p.communicate(timeout=600)[1] for p in ps]
        t1 = time.time()
        for p, log in zip(ps, logs):
            if p.returncode != 0:
                raise RuntimeError(f"load client failed:\n{log[-2000:]}")
        spans = []
        for log in logs:
            for ln in log.splitlines():
                if ln.startswith("stats "):
                    kv = dict(x.split("=") for x in ln.split()[1:])
                    spans.append((float(kv["start"]), float(kv["end"])))
        total = procs * sessions * steps
        # The Python client reports its own span (after start-up); the C++
        # one may not, then the processes' wall clock is used.
        span = (max(e for _, e in spans) - min(s for s, _ in spans)) if len(spans) == procs else t1 - t0
        held = [len(cluster.sessions_on(s.target)) for s in reps.servers]
    finally:
        ngx.stop()
        reps.stop()
    return {"replicas": n_replicas, "via": "nginx" if via_nginx else "direct", "steps": total, "seconds": span, "steps_per_s": total / span,
            "sessions_per_replica": held}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--server", default=natgrad.find_server_binary())
    p.add_argument("--cpp_client", help="the C++ router_load_client for the throughput runs")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--block", type=int, default=200)
    p.add_argument("--procs", type=int, default=4)
    p.add_argument("--sessions", type=int, default=6)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--json")
    a = p.parse_args()
    if not a.server:
        sys.exit("natgrad-server not found (--server)")
    res = {"machine": f"{os.cpu_count()} cores", "model": "kfac_dense 6->4 + adam [5,3] (router_load_client)"}
    with tempfile.TemporaryDirectory(prefix="router-bench-") as work:
        res["latency_us"] = latency(a.server, work, a.rounds, a.block)
        lat = res["latency_us"]
        print(f"per-step latency, median of {a.rounds} blocks of {a.block} alternating steps (us):")
        for k in ("direct", "nginx"):
            print(f"  {k:7s} p50 {lat[k]['p50']:8.1f}  p99 {lat[k]['p99']:8.1f}")
        print(f"  added   p50 {lat['added_us']['p50']:8.1f}  p99 {lat['added_us']['p99']:8.1f}")
        res["throughput"] = [throughput(a.server, work, 1, a.procs, a.sessions, a.steps, a.cpp_client,
                                        via_nginx=False)]
        res["throughput"] += [throughput(a.server, work, n, a.procs, a.sessions, a.steps, a.cpp_client)
                              for n in (1, 3)]
        who = "C++" if a.cpp_client else "Python"
        print(f"aggregate throughput, {a.procs} {who} load clients x {a.sessions} sessions "
              f"x {a.steps} steps:")
        for t in res["throughput"]:
            print(f"  {t['replicas']} replica(s), {t['via']:6s}: {t['steps_per_s']:9.0f} steps/s "
                  f"({t['steps']} steps in {t['seconds']:.2f} s; sessions per replica "
                  f"{t['sessions_per_replica']})")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
