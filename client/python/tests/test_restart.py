"""Reconnect across a server restart: the session comes back from the
checkpoint and the client resends the pending step on a new connection."""
import threading
import time

import numpy as np
import pytest

import natgrad
from natgrad import blocks

CFG = [blocks.adam("w", [4, 3], lr=0.05), blocks.sgd("b", [3], lr=0.1, momentum=0.9)]


def inputs(t):
    r = np.random.default_rng(t)
    return {"w": r.standard_normal((4, 3)).astype(np.float32),
            "b": r.standard_normal(3).astype(np.float32)}


def reference(target, steps):
    c = natgrad.Client(target)
    s = c.create_session(CFG)
    out = [s.step(inputs(t)) for t in range(1, steps + 1)]
    s.delete()
    c.close()
    return out


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_session_survives_server_restart(fresh_server, target, how):
    want = reference(target, 6)
    c = natgrad.Client(fresh_server.target, retry=natgrad.RetryPolicy(deadline_s=30, max_attempts=50))
    s = c.create_session(CFG)
    for t in range(1, 4):
        np.testing.assert_array_equal(s.step(inputs(t))["w"], want[t - 1]["w"])
    if how == "sigterm":
        fresh_server.restart()
    else:
        fresh_server.kill()
        fresh_server.start()
    # Same Session object: the dropped stream is reopened transparently.
    for t in range(4, 7):
        r = s.step(inputs(t))
        np.testing.assert_array_equal(r["w"], want[t - 1]["w"])
        np.testing.assert_array_equal(r["b"], want[t - 1]["b"])
    assert s.retries >= 1
    assert c.get_session_info(s.name).last_step == 6
    s.delete()


def test_step_waits_for_a_server_that_comes_back(fresh_server):
    c = natgrad.Client(fresh_server.target, retry=natgrad.RetryPolicy(deadline_s=60, max_attempts=1000,
                                                                       max_backoff=0.2))
    s = c.create_session(CFG)
    s.step(inputs(1))
    fresh_server.stop()
    restarted = threading.Event()

    def bring_back():
        deadline = time.monotonic() + 30
        while s.retries < 2 and time.monotonic() < deadline:  # the client is retrying
            time.sleep(0.01)
        fresh_server.start()
        restarted.set()

    th = threading.Thread(target=bring_back)
    th.start()
    r = s.step(inputs(2))  # blocks in the retry loop until the server is back
    th.join()
    assert restarted.is_set() and r.step == 2 and s.retries >= 2
    s.delete()
