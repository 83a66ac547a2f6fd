"""natgrad.jax against a real server (skipped when jax is not installed)."""
import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="jax not installed (scripts/setup-python installs jax[cpu])")
import jax.numpy as jnp  # noqa: E402

import natgrad  # noqa: E402
import natgrad.jax  # noqa: E402
import kfac_reference as ref  # noqa: E402

jax.config.update("jax_enable_x64", True)


def init(key, dims=(8, 16, 3)):
    k1, k2 = jax.random.split(key)
    return {
        "dense1": {"kernel": jax.random.normal(k1, (dims[0], dims[1])) / np.sqrt(dims[0]),
                   "bias": jnp.zeros(dims[1])},
        "dense2": {"kernel": jax.random.normal(k2, (dims[1], dims[2])) / np.sqrt(dims[1]),
                   "bias": jnp.zeros(dims[2])},
        "scale": jnp.ones(()),
    }


def forward(params, x):
    s1 = x @ params["dense1"]["kernel"] + params["dense1"]["bias"]
    h = jnp.tanh(s1)
    s2 = (h @ params["dense2"]["kernel"] + params["dense2"]["bias"]) * params["scale"]
    return s1, h, s2


def per_example_loss(s2, y):
    return -jax.nn.log_softmax(s2)[jnp.arange(y.shape[0]), y]


def loss_and_stats(params, x, y):
    """Mean loss, its gradient, and the K-FAC statistics: per-example output
    gradients of the per-example loss = cotangents of the summed loss."""
    def mean_loss(p):
        return per_example_loss(forward(p, x)[2], y).mean()

    loss, grads = jax.value_and_grad(mean_loss)(params)
    d1, d2, scale = params["dense1"], params["dense2"], params["scale"]
    s1 = x @ d1["kernel"] + d1["bias"]
    h = jnp.tanh(s1)
    s2 = h @ d2["kernel"] + d2["bias"]  # dense2's output (before the scale)
    g1 = jax.grad(lambda z: per_example_loss((jnp.tanh(z) @ d2["kernel"] + d2["bias"]) * scale, y).sum())(s1)
    g2 = jax.grad(lambda z: per_example_loss(z * scale, y).sum())(s2)
    return loss, grads, {"dense1": (x, g1), "dense2": (h, g2)}


def data(n=64, seed=0):
    r = np.random.default_rng(seed)
    x = r.standard_normal((n, 8))
    y = (x[:, :3] @ r.standard_normal((3, 3))).argmax(1)
    return jnp.asarray(x), jnp.asarray(y)


def test_find_layers():
    layers = natgrad.jax.find_layers(init(jax.random.PRNGKey(0)))
    assert layers == {"dense1": ("dense1/kernel", "dense1/bias"), "dense2": ("dense2/kernel", "dense2/bias")}


def test_first_step_matches_reference_and_training_reduces_loss(target):
    params = init(jax.random.PRNGKey(0))
    x, y = data()
    opt = natgrad.jax.KFAC(params, target=target, lr=0.2, damping=1e-2, momentum=0.9, kl_clip=1e-3,
                           inverse_period=1, fallback_lr=1e-3, state_dtype="float64", reduce=False)
    assert opt.fallback == ["scale"]
    loss0, grads, stats = loss_and_stats(params, x, y)
    layers = {}
    for name in ("dense1", "dense2"):
        gW = np.concatenate([np.asarray(grads[name]["kernel"]).T, np.asarray(grads[name]["bias"])[:, None]], 1)
        a, g = stats[name]
        layers[name] = dict(grad=gW, a=np.asarray(a), g=np.asarray(g), bias=True)
    want, _ = ref.first_step(layers, lr=0.2, damping=1e-2, mode="tikhonov", kl_clip=1e-3)
    new = opt.step(params, grads, stats, loss=float(loss0))
    for name in ("dense1", "dense2"):
        np.testing.assert_allclose(np.asarray(new[name]["kernel"] - params[name]["kernel"]).T,
                                   want[name][:, :-1], rtol=1e-7, atol=1e-12)
        np.testing.assert_allclose(np.asarray(new[name]["bias"] - params[name]["bias"]),
                                   want[name][:, -1], rtol=1e-7, atol=1e-12)
    np.testing.assert_allclose(float(new["scale"] - params["scale"]),
                               ref.adam_first_step(np.asarray(grads["scale"]), 1e-3), rtol=1e-7)
    assert isinstance(new["dense1"]["kernel"], jax.Array)
    params = new
    for _ in range(30):
        loss, grads, stats = loss_and_stats(params, x, y)
        params = opt.step(params, grads, stats, loss=float(loss))
    assert float(loss) < 0.6 * float(loss0)
    opt.close(delete=True)


def test_misuse_names_the_layer(target):
    params = init(jax.random.PRNGKey(1))
    x, y = data()
    opt = natgrad.jax.KFAC(params, target=target)
    loss, grads, stats = loss_and_stats(params, x, y)
    with pytest.raises(natgrad.InvalidArgument, match="dense2"):
        opt.step(params, grads, {"dense1": stats["dense1"]})
    a, g = stats["dense1"]
    with pytest.raises(natgrad.InvalidArgument, match="'dense1'.*activations"):
        opt.step(params, grads, {**stats, "dense1": (a[:, :5], g)})
    assert opt.session.next_step == 1
    opt.close(delete=True)
