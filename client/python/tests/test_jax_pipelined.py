"""natgrad.jax.KFAC(pipelined=True) against a real server: each call returns
the update of the previous call's step (one step stale), errors of the step
in flight raise at the next call, flush() drains."""
import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="jax not installed (scripts/setup-python installs jax[cpu])")
import jax.numpy as jnp  # noqa: E402

import natgrad  # noqa: E402
import natgrad.jax  # noqa: E402
from natgrad import blocks  # noqa: E402

from test_jax import data, init, loss_and_stats  # noqa: E402  (enables x64)

KW = dict(lr=0.2, damping=1e-2, momentum=0.9, kl_clip=1e-3, inverse_period=2, fallback_lr=1e-3,
          state_dtype="float64", reduce=False)


def opt_for(params, target, **kw):
    return natgrad.jax.KFAC(params, target=target, pipelined=True, **{**KW, **kw})


def manual_session(client):
    """The same session as opt_for's, built by hand."""
    cfg = [blocks.kfac_dense(name, d_in, d_out, bias=True, lr=KW["lr"], damping=KW["damping"],
                             momentum=KW["momentum"], inverse_period=KW["inverse_period"])
           for name, d_in, d_out in (("dense1", 8, 16), ("dense2", 16, 3))]
    cfg.append(blocks.adam("scale", [1], lr=KW["fallback_lr"]))
    return client.create_session(cfg, kl_clip=KW["kl_clip"], state_dtype="float64")


def manual_inputs(params, grads, stats):
    """Session.step inputs for the test model, laid out here (not by natgrad.jax)."""
    inputs = {}
    for name in ("dense1", "dense2"):
        gw = np.concatenate([np.asarray(grads[name]["kernel"]).T, np.asarray(grads[name]["bias"])[:, None]], 1)
        a, g = stats[name]
        inputs[name] = {"gradient": gw, "activations": np.asarray(a), "output_gradients": np.asarray(g)}
    inputs["scale"] = np.asarray(grads["scale"]).reshape(1)
    return inputs


def add(params, r):
    new = {name: {"kernel": np.asarray(params[name]["kernel"]) + r[name][:, :-1].T,
                  "bias": np.asarray(params[name]["bias"]) + r[name][:, -1]}
           for name in ("dense1", "dense2")}
    new["scale"] = np.asarray(params["scale"]) + r["scale"].reshape(())
    return jax.tree_util.tree_map(jnp.asarray, new)


def assert_same(p, q):
    for a, b in zip(jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(q)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def batches(n):
    return [data(seed=i) for i in range(n)]


def test_updates_are_the_synchronous_sessions_applied_one_step_late(target, client):
    xs = batches(6)
    params0 = init(jax.random.PRNGKey(3))
    # natgrad.jax, pipelined.
    opt = opt_for(params0, target)
    got, p = [], params0
    for x, y in xs:
        loss, grads, stats = loss_and_stats(p, x, y)
        p = opt.step(p, grads, stats, loss=float(loss))
        got.append(p)
    assert opt.in_flight
    final = opt.flush(p)
    assert not opt.in_flight and opt.session.next_step == len(xs) + 1
    opt.close(delete=True)
    # The same schedule by hand over Session.step: call t sends step t from
    # the parameters it is given and returns them plus step t-1's update.
    s = manual_session(client)
    want, q, pending = [], params0, None
    for x, y in xs:
        loss, grads, stats = loss_and_stats(q, x, y)
        r = s.step(manual_inputs(q, grads, stats), loss=float(loss))
        q = q if pending is None else add(q, pending)
        pending = r
        want.append(q)
    want_final = add(q, pending)
    s.delete()
    assert_same(got[0], params0)  # the first call has no update to apply yet
    for g, w in zip(got, want):
        assert_same(g, w)
    assert_same(final, want_final)
    # Not vacuous: one step stale is not the synchronous trajectory.
    sync = natgrad.jax.KFAC(params0, target=target, **KW)
    p = params0
    for x, y in xs[:3]:
        loss, grads, stats = loss_and_stats(p, x, y)
        p = sync.step(p, grads, stats, loss=float(loss))
    sync.close(delete=True)
    assert not np.array_equal(np.asarray(p["dense1"]["kernel"]), np.asarray(got[2]["dense1"]["kernel"]))


def nan_stats(stats):
    a, g = stats["dense1"]
    return {**stats, "dense1": (jnp.full_like(a, jnp.nan), g)}


def test_an_error_in_flight_raises_at_the_next_call(target):
    xs = batches(4)
    params = init(jax.random.PRNGKey(4))
    opt = opt_for(params, target)
    loss, grads, stats = loss_and_stats(params, *xs[0])
    p1 = opt.step(params, grads, stats)                      # sends step 1
    loss, grads, stats = loss_and_stats(p1, *xs[1])
    p2 = opt.step(p1, grads, nan_stats(stats))               # sends step 2 (bad); applies step 1
    assert opt.last_result.step == 1
    loss, grads, stats = loss_and_stats(p2, *xs[2])
    with pytest.raises(natgrad.InvalidArgument, match="dense1") as e:
        opt.step(p2, grads, stats)                           # step 2's error; this step is not sent
    assert "activations" in str(e.value)
    assert not opt.in_flight and opt.session.next_step == 2  # step 2 never applied on the server
    # Training goes on from p2: the next call is sent as step 2.
    p3 = opt.step(p2, grads, stats)
    assert_same(p3, p2)                                      # nothing was pending
    loss, grads, stats = loss_and_stats(p3, *xs[3])
    p4 = opt.step(p3, grads, stats)
    assert opt.last_result.step == 2
    assert not np.array_equal(np.asarray(p4["dense2"]["kernel"]), np.asarray(p3["dense2"]["kernel"]))
    # flush() raises the error of a failed step in flight too.
    opt.step(p4, grads, nan_stats(stats))
    with pytest.raises(natgrad.InvalidArgument, match="dense1"):
        opt.flush(p4)
    assert not opt.in_flight and opt.session.next_step == 4
    # ... and close(), after closing the session.
    opt.step(p4, grads, nan_stats(stats))
    with pytest.raises(natgrad.InvalidArgument, match="dense1"):
        opt.close(delete=True)
    with pytest.raises(natgrad.NotFound):
        with natgrad.Client(target) as c:
            c.get_session(opt.session.name)


def test_flush_drains_and_keeps_the_schedule(target, client):
    xs = batches(3)
    params = init(jax.random.PRNGKey(5))
    opt = opt_for(params, target)
    p = params
    for x, y in xs[:2]:
        loss, grads, stats = loss_and_stats(p, x, y)
        p = opt.step(p, grads, stats, loss=float(loss))
    # flush() without params: the step lands on the server, its update stays
    # pending and the next call applies it, as without the flush.
    assert opt.flush() is None
    assert opt.in_flight and opt.session.next_step == 3
    assert client.get_session_info(opt.session.name).last_step == 2
    with pytest.raises(natgrad.FailedPrecondition, match="flush"):
        opt.state_dict()                                     # params lack step 2's update
    loss, grads, stats = loss_and_stats(p, *xs[2])
    p3 = opt.step(p, grads, stats, loss=float(loss))
    assert opt.last_result.step == 2
    # flush(params): everything sent is applied; then a checkpoint is consistent.
    p4 = opt.flush(p3)
    assert opt.last_result.step == 3 and not opt.in_flight
    assert not np.array_equal(np.asarray(p4["dense1"]["kernel"]), np.asarray(p3["dense1"]["kernel"]))
    assert opt.flush(p4) is p4                               # nothing left
    state = opt.state_dict()
    assert int(state["step"]) == 3
    opt.close(delete=True)


def test_synchronous_flush_is_a_no_op(target):
    params = init(jax.random.PRNGKey(6))
    opt = natgrad.jax.KFAC(params, target=target, **KW)
    x, y = data()
    loss, grads, stats = loss_and_stats(params, x, y)
    p = opt.step(params, grads, stats)
    assert opt.flush(p) is p and not opt.in_flight and opt.session.next_step == 2
    opt.close(delete=True)
