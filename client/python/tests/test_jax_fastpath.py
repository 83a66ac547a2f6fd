"""natgrad.jax's reduced statistics: jitted, in the arrays' dtype, packed."""
import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="jax not installed (scripts/setup-python installs jax[cpu])")
import jax.numpy as jnp  # noqa: E402

import natgrad  # noqa: E402
import natgrad.jax  # noqa: E402
import kfac_reference as ref  # noqa: E402

from test_jax import data, init, loss_and_stats  # noqa: E402  (enables x64)


def unpack(p, d):
    m = np.zeros((d, d), np.float64)
    m[np.triu_indices(d)] = p
    return m + np.triu(m, 1).T


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype,rtol", [(np.float32, 2e-6), (np.float64, 1e-13)])
def test_reduced_factors_equal_the_float64_reference(bias, dtype, rtol):
    r = np.random.default_rng(5)
    a = r.random((200, 30)).astype(dtype)
    g = r.standard_normal((200, 9)).astype(dtype)
    pa, pg = natgrad.jax._reduced_factors(jnp.asarray(a), jnp.asarray(g), 200, bias)
    assert pa.dtype == dtype and pg.dtype == dtype  # computed in the arrays' dtype
    d = 30 + int(bias)
    assert pa.shape == (d * (d + 1) // 2,) and pg.shape == (45,)
    A, G = ref.factors(a, g, bias)
    np.testing.assert_allclose(unpack(np.asarray(pa), d), A, rtol=0, atol=rtol * np.abs(A).max())
    np.testing.assert_allclose(unpack(np.asarray(pg), 9), G, rtol=0, atol=rtol * np.abs(G).max())


def test_reduced_first_step_matches_the_reference(target):
    params = init(jax.random.PRNGKey(0))
    x, y = data()
    opt = natgrad.jax.KFAC(params, target=target, lr=0.2, damping=1e-2, momentum=0.9, kl_clip=1e-3,
                           inverse_period=1, fallback_lr=1e-3, state_dtype="float64", reduce=True)
    _, grads, stats = loss_and_stats(params, x, y)
    sent = {}
    real = opt.session._block_step

    def block_step(name, inp, step=None, out=None):
        sent[name] = bs = real(name, inp, step, out)
        return bs
    opt.session._block_step = block_step
    layers = {}
    for name in ("dense1", "dense2"):
        gW = np.concatenate([np.asarray(grads[name]["kernel"]).T, np.asarray(grads[name]["bias"])[:, None]], 1)
        a, g = stats[name]
        layers[name] = dict(grad=gW, a=np.asarray(a), g=np.asarray(g), bias=True)
    want, _ = ref.first_step(layers, lr=0.2, damping=1e-2, mode="tikhonov", kl_clip=1e-3)
    new = opt.step(params, grads, stats)
    for name in ("dense1", "dense2"):
        assert sent[name].kfac.reduced.packed
        np.testing.assert_allclose(np.asarray(new[name]["kernel"] - params[name]["kernel"]).T,
                                   want[name][:, :-1], rtol=1e-7, atol=1e-12)
    opt.close(delete=True)


def test_request_size_bound_and_the_message_limit(target):
    """build_requests sizes blocks without serializing them (client._size_bound):
    the bound is never below the real size, and a request over
    max_message_bytes is still refused before anything is sent."""
    from natgrad.client import _size_bound
    params = init(jax.random.PRNGKey(2))
    x, y = data()
    opt = natgrad.jax.KFAC(params, target=target, reduce=False, weight_decay=1e-4)
    _, grads, stats = loss_and_stats(params, x, y)
    inputs = opt._prepare(params, grads, stats)
    reqs = opt.session.build_requests(inputs, loss=1.0)
    for r in reqs:
        assert _size_bound(r) >= r.ByteSize()
        for b in r.blocks:
            assert _size_bound(b) >= b.ByteSize()
    opt.session.client.max_message_bytes = reqs[0].ByteSize() - 1
    try:
        with pytest.raises(natgrad.ResourceExhausted, match="max_message_bytes"):
            opt.step(params, grads, stats, loss=1.0)
    finally:
        opt.session.client.max_message_bytes = natgrad.client.DEFAULT_MAX_MESSAGE_BYTES
    assert opt.session.next_step == 1
    opt.close(delete=True)
