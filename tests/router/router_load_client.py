#!/usr/bin/env python3
"""Python load client for the multi-replica tests (tests/router) and bench.

    router_load_client.py --target HOST:PORT --sessions N --first_index K \\
        --steps T --out FILE [--token_file F] [--step_interval_ms M]

Creates N sessions with ids rp-<K+i>, steps each T times on its own thread
(following SessionMoved redirects and retrying UNAVAILABLE through
natgrad.Client, which replays unacknowledged steps), and writes one line per
session:

    rp-<idx> <last step> <hex SHA-256 of every update's bytes, in order>

the format of the C++ tests/router/router_load_client (ids rt-<idx>), so a
run through a router with replicas killed and drained can be compared bit
for bit with an uninterrupted run against one server.

The model of session index i (fixed; changing it changes every digest):
  * "fc": kfac_dense d_in=6, d_out=4 with bias, lr 0.05, damping 1e-2, raw
    statistics (8 rows of activations and output gradients) each step;
  * "w":  adam, shape [5, 3], lr 0.01.
Step t's inputs come from numpy's PCG64 seeded with [i, t], in float64.
The digest hashes, per step in order, each block's delta (sorted by block
name) as float64 bytes in C order.

Exit status 0 only when every step of every session succeeded; otherwise it
prints what failed and exits 1 (the test checks that no call failed past the
client's retries). --step_interval_ms paces the steps (load shaping, so the
streams are still open when the test kills or drains a replica).
"""
import argparse
import hashlib
import sys
import threading
import time

import numpy as np

import natgrad
from natgrad import blocks

D_IN, D_OUT, ROWS = 6, 4, 8
W_SHAPE = (5, 3)


def session_blocks():
    return [blocks.kfac_dense("fc", D_IN, D_OUT, bias=True, lr=0.05, damping=1e-2),
            blocks.adam("w", list(W_SHAPE), lr=0.01)]


def step_inputs(index, step):
    rng = np.random.default_rng([index, step])
    acts = rng.standard_normal((ROWS, D_IN))
    outg = rng.standard_normal((ROWS, D_OUT)) / ROWS
    ext = np.hstack([acts, np.ones((ROWS, 1))])
    grad = outg.T @ ext
    return {"fc": {"gradient": grad, "activations": acts, "output_gradients": outg},
            "w": {"gradient": rng.standard_normal(W_SHAPE)}}


def update_bytes(result):
    return b"".join(np.ascontiguousarray(result[n], dtype=np.float64).tobytes()
                    for n in sorted(result))


def run_session(client, index, steps, interval_s, out, failures, lock):
    sid = f"rp-{index}"
    h = hashlib.sha256()
    try:
        s = client.create_session(session_blocks(), session_id=sid)
        for _ in range(steps):
            t = s.next_step
            h.update(update_bytes(s.step(step_inputs(index, t))))
            if interval_s:
                time.sleep(interval_s)  # pacing (load shaping), not synchronisation
        s.close()
        with lock:
            out[index] = (f"{sid} {s.next_step - 1} {h.hexdigest()}",
                          dict(retries=s.retries, replayed=s.replayed_steps,
                               redirects=s.redirects, replica=s.replica))
    except Exception as e:  # noqa: BLE001  (reported, and the exit status says so)
        with lock:
            failures.append(f"{sid}: {type(e).__name__}: {e}")


def connect(target, token, retry, attempts=3, timeout=10.0):
    """A Client whose channel is connected before the session threads start
    (one wait drives the connect; see natgrad.Client._await_channel), so
    the first CreateSession calls do not all fail fast at once. A channel
    not ready within `timeout` is replaced, and said so."""
    for i in range(attempts):
        client = natgrad.Client(target, token=token, retry=retry)
        try:
            client.wait_ready(timeout=timeout)
            return client
        except natgrad.Unavailable as e:
            client.close()
            print(f"connect attempt {i + 1}: {e}", file=sys.stderr)
    return natgrad.Client(target, token=token, retry=retry)  # the calls' retries report it


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", required=True)
    p.add_argument("--sessions", type=int, required=True)
    p.add_argument("--first_index", type=int, default=0)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--token_file")
    p.add_argument("--step_interval_ms", type=float, default=0.0)
    p.add_argument("--deadline_s", type=float, default=60.0,
                   help="the retry deadline of one step or call")
    a = p.parse_args(argv)
    token = None
    if a.token_file:
        with open(a.token_file) as f:
            token = f.read().split()[0]
    retry = natgrad.RetryPolicy(max_attempts=0, deadline_s=a.deadline_s, max_backoff=0.5,
                                stream_open_s=a.deadline_s)
    client = connect(a.target, token, retry)
    out, failures, lock = {}, [], threading.Lock()
    threads = [threading.Thread(target=run_session, daemon=True,
                                args=(client, a.first_index + i, a.steps, a.step_interval_ms / 1e3,
                                      out, failures, lock))
               for i in range(a.sessions)]
    start = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    end = time.time()
    client.close()
    with open(a.out, "w") as f:
        for i in sorted(out):
            f.write(out[i][0] + "\n")
    for i in sorted(out):
        print(f"rp-{i}: " + " ".join(f"{k}={v}" for k, v in out[i][1].items()), file=sys.stderr)
    steps = sum(int(v[0].split()[1]) for v in out.values())
    # For bench/router: wall-clock span of this process's sessions.
    print(f"stats start={start:.6f} end={end:.6f} steps={steps}", file=sys.stderr)
    for msg in failures:
        print(f"FAILED {msg}", file=sys.stderr)
    return 1 if failures or len(out) != a.sessions else 0


if __name__ == "__main__":
    sys.exit(main())
