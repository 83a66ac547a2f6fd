"""natgrad.jax full checkpoints: state_dict() embeds the exported session;
restoring into a fresh server (empty checkpoint directory) continues
bit-identically; restoring onto a server that has the session checks the
step; mismatches raise natgrad errors."""
import os
import pickle

import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="jax not installed (scripts/setup-python installs jax[cpu])")
import jax.numpy as jnp  # noqa: E402

import natgrad  # noqa: E402
import natgrad.jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

T = 9  # 3x3 output positions of a 3x3 VALID conv on 5x5


def init(seed=0, hidden=6):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    return {"conv": {"kernel": jax.random.normal(k1, (3, 3, 2, 3)) / 4.0, "bias": jnp.zeros(3)},
            "dense": {"kernel": jax.random.normal(k2, (T * 3, hidden)) / 5.0, "bias": jnp.zeros(hidden)},
            "out": {"kernel": jax.random.normal(k3, (hidden, 2)) / 2.0, "bias": jnp.zeros(2)},
            "scale": jnp.ones(())}


def data(seed=1, n=16):
    r = np.random.default_rng(seed)
    x = r.standard_normal((n, 5, 5, 2))
    y = (x.reshape(n, -1)[:, :4].sum(1) > 0).astype(np.int32)
    return jnp.asarray(x), jnp.asarray(y)


def forward(p, x, z1=None, z2=None, z3=None):
    if z1 is None:
        z1 = jax.lax.conv_general_dilated(x, p["conv"]["kernel"], (1, 1), "VALID",
                                          dimension_numbers=("NHWC", "HWIO", "NHWC")) + p["conv"]["bias"]
    f = jnp.tanh(z1).reshape(x.shape[0], -1)
    if z2 is None:
        z2 = f @ p["dense"]["kernel"] + p["dense"]["bias"]
    h = jnp.tanh(z2)
    if z3 is None:
        z3 = h @ p["out"]["kernel"] + p["out"]["bias"]
    return z1, f, z2, h, z3 * p["scale"], z3


def nll(logits, y):
    return -jax.nn.log_softmax(logits)[jnp.arange(y.shape[0]), y]


def loss_and_stats(p, x, y):
    loss, grads = jax.value_and_grad(lambda q: nll(forward(q, x)[4], y).mean())(p)
    z1, f, z2, h, _, z3 = forward(p, x)
    g1 = jax.grad(lambda z: nll(forward(p, x, z1=z).__getitem__(4), y).sum())(z1)
    g2 = jax.grad(lambda z: nll(forward(p, x, z1=z1, z2=z)[4], y).sum())(z2)
    g3 = jax.grad(lambda z: nll(forward(p, x, z1=z1, z2=z2, z3=z)[4], y).sum())(z3)
    return loss, grads, {"conv": (natgrad.jax.conv_patches(x, 3), g1), "dense": (f, g2), "out": (h, g3)}


def make(params, target, **kw):
    # reduce pinned: "auto" chooses by timing, so two runs may differ in the
    # last bits, and these tests compare runs bit for bit.
    kw.setdefault("reduce", True)
    return natgrad.jax.KFAC(params, target=target, locations={"conv": T}, lr=0.2, damping=1e-2,
                            momentum=0.9, kl_clip=1e-2, inverse_period=2, fallback_lr=1e-2, **kw)


def run(opt, params, steps, x, y):
    for _ in range(steps):
        loss, grads, stats = loss_and_stats(params, x, y)
        params = opt.step(params, grads, stats, loss=float(loss))
    return params


def leaves(tree):
    return [np.asarray(v) for v in jax.tree_util.tree_leaves(tree)]


def test_restore_on_a_fresh_server_continues_bit_identically(target, fresh_server):
    x, y = data()
    p0 = init()
    # Uninterrupted reference: 7 steps on one server.
    ref_opt = make(p0, target)
    want = run(ref_opt, p0, 7, x, y)
    ref_opt.close(delete=True)

    opt = make(p0, target)
    p3 = run(opt, p0, 3, x, y)
    state = pickle.loads(pickle.dumps(opt.state_dict()))  # what a checkpoint file holds
    assert int(state["step"]) == 3 and state["session"] == opt.session.name
    assert state["snapshot"].dtype == np.uint8 and state["snapshot"].size > 0
    # pytree-friendly: every leaf is str or numpy.
    assert all(isinstance(v, (str, np.ndarray)) for v in jax.tree_util.tree_leaves(state))

    assert os.listdir(fresh_server.checkpoint_dir) == []  # nothing to recover from
    restored = make(p3, fresh_server.target, state=state)
    assert restored.session.name == state["session"] and restored.session.next_step == 4
    got = run(restored, p3, 4, x, y)
    for a, b in zip(leaves(got), leaves(want)):
        assert np.array_equal(a, b), np.max(np.abs(a - b))
    restored.close(delete=True)
    opt.close(delete=True)


def test_restore_on_the_same_server_checks_the_step(target):
    x, y = data(2)
    p0 = init(1)
    opt = make(p0, target)
    p2 = run(opt, p0, 2, x, y)
    state = opt.state_dict()

    # The session is there at step 2: attach, no import; steps continue.
    again = make(p2, target, state=state)
    assert again.session.name == opt.session.name and again.session.next_step == 3
    again.session.close()
    # The client-level helper takes the serialized snapshot too.
    s = opt.client.restore_session(state["snapshot"].tobytes())
    assert s.name == opt.session.name and s.next_step == 3
    with pytest.raises(natgrad.InvalidArgument, match="does not parse"):
        opt.client.restore_session(b"\xff\xff\xff")
    # load_state_dict on an optimizer that made its own session drops that
    # empty session and attaches to the checkpoint's.
    other = make(p0, target)
    own = other.session.name
    other.load_state_dict(state)
    assert other.session.name == opt.session.name
    with pytest.raises(natgrad.NotFound):
        other.client.get_session_info(own)
    other.session.close()

    run(opt, p2, 1, x, y)  # the server's session moves on to step 3
    with pytest.raises(natgrad.FailedPrecondition, match="at step 3, the checkpoint at step 2"):
        make(p2, target, state=state)
    opt.close(delete=True)


def test_mismatched_or_malformed_state_is_refused(target):
    x, y = data(3)
    p0 = init(2)
    opt = make(p0, target)
    run(opt, p0, 1, x, y)
    state = opt.state_dict()
    # Another model (different hidden size): the blocks do not match.
    with pytest.raises(natgrad.InvalidArgument, match="do not match this optimizer's layers"):
        make(init(2, hidden=7), target, state=state)
    bad = dict(state, snapshot=state["snapshot"][: len(state["snapshot"]) // 2])
    with pytest.raises(natgrad.InvalidArgument, match="snapshot"):
        make(p0, target, state=bad)
    with pytest.raises(natgrad.InvalidArgument, match="inconsistent"):
        make(p0, target, state=dict(state, step=np.asarray(5)))
    with pytest.raises(natgrad.InvalidArgument, match="format"):
        make(p0, target, state=dict(state, format=np.asarray(99)))
    with pytest.raises(natgrad.InvalidArgument, match="not a natgrad.jax state_dict"):
        make(p0, target, state={"session": "x"})
    opt.close(delete=True)
