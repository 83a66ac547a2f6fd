"""natgrad.jax convolutions: unfolded patches, `locations`, kfac-jax's factor
scaling (A over n, G over n*T), checked against numpy oracles and trained
through the real server."""
import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="jax not installed (scripts/setup-python installs jax[cpu])")
import jax.numpy as jnp  # noqa: E402

import natgrad  # noqa: E402
import natgrad.jax  # noqa: E402
import kfac_reference as ref  # noqa: E402

jax.config.update("jax_enable_x64", True)

N, H, W, CIN, COUT, K, CLASSES = 24, 6, 6, 2, 4, 3, 3
T = (H - K + 1) * (W - K + 1)  # VALID 3x3 -> 4x4 = 16 output positions


def im2col(x, k, stride, pad):
    """numpy oracle: [n, T, k*k*c] with (kh, kw, c) feature order (HWIO flattening)."""
    x = np.pad(np.asarray(x), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    n, h, w, c = x.shape
    rows = []
    for i in range(0, h - k + 1, stride):
        for j in range(0, w - k + 1, stride):
            rows.append(x[:, i:i + k, j:j + k, :].reshape(n, -1))
    return np.stack(rows, 1)


def conv(x, kernel, b, stride=1, padding="VALID"):
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), padding,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC")) + b


@pytest.mark.parametrize("stride,padding,pad", [(1, "VALID", 0), (2, "SAME", 1), (1, [(1, 1), (1, 1)], 1)])
def test_conv_patches_match_im2col_and_the_convolution(stride, padding, pad):
    r = np.random.default_rng(0)
    x = r.standard_normal((3, 6, 6, CIN))
    kern = r.standard_normal((K, K, CIN, COUT))
    p = np.asarray(natgrad.jax.conv_patches(x, K, stride, padding))
    if padding == "SAME" and stride == 2:
        # XLA's SAME for 6 -> 3 with a 3x3 window pads (0, 1): shift the oracle.
        want = im2col(np.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))), K, stride, 0)
    else:
        want = im2col(x, K, stride, pad)
    np.testing.assert_allclose(p, want, rtol=0, atol=0)
    out = np.asarray(conv(x, kern, 0.0, stride, padding))
    np.testing.assert_allclose(p @ kern.reshape(-1, COUT), out.reshape(3, -1, COUT), rtol=1e-12, atol=1e-12)
    # out_in ([c_out, c_in, kh, kw]) flattening.
    oihw = np.transpose(kern, (3, 2, 0, 1))
    q = np.asarray(natgrad.jax.conv_patches(x, K, stride, padding, kernel_layout="out_in"))
    np.testing.assert_allclose(q @ oihw.reshape(COUT, -1).T, out.reshape(3, -1, COUT), rtol=1e-12, atol=1e-12)


def init(seed=0):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    return {"conv": {"kernel": jax.random.normal(k1, (K, K, CIN, COUT)) / np.sqrt(K * K * CIN),
                     "bias": jnp.zeros(COUT)},
            "head": {"kernel": jax.random.normal(k2, (T * COUT, CLASSES)) / np.sqrt(T * COUT),
                     "bias": jnp.zeros(CLASSES)}}


def data(seed=1):
    r = np.random.default_rng(seed)
    x = r.standard_normal((N, H, W, CIN))
    y = (x[:, 1:4, 1:4, :].reshape(N, -1) @ r.standard_normal((9 * CIN, CLASSES))).argmax(1)
    return jnp.asarray(x), jnp.asarray(y)


def per_example_loss(z2, y):
    return -jax.nn.log_softmax(z2)[jnp.arange(y.shape[0]), y]


def head(params, z1):
    f = jnp.tanh(z1).reshape(z1.shape[0], -1)
    return f, f @ params["head"]["kernel"] + params["head"]["bias"]


def loss_and_stats(params, x, y):
    def mean_loss(p):
        return per_example_loss(head(p, conv(x, p["conv"]["kernel"], p["conv"]["bias"]))[1], y).mean()

    loss, grads = jax.value_and_grad(mean_loss)(params)
    z1 = conv(x, params["conv"]["kernel"], params["conv"]["bias"])
    f, z2 = head(params, z1)
    # Per-example output gradients = cotangents of the summed loss.
    g1 = jax.grad(lambda z: per_example_loss(head(params, z)[1], y).sum())(z1)   # [n, 4, 4, COUT]
    g2 = jax.grad(lambda z: per_example_loss(z, y).sum())(z2)
    patches = natgrad.jax.conv_patches(x, K)                                       # [n, T, 18]
    return loss, grads, {"conv": (patches, g1), "head": (f, g2)}


def test_a_convolution_needs_locations(target):
    with pytest.raises(natgrad.InvalidArgument, match=r"'conv'.*convolution.*locations=\{'conv': T\}") as e:
        natgrad.jax.KFAC(init(), target=target)
    assert e.value.block == "conv" and e.value.field == "locations"
    opt = natgrad.jax.KFAC(init(), target=target, exclude=["conv"])
    assert set(opt.fallback) == {"conv/kernel", "conv/bias"}
    opt.close(delete=True)


@pytest.mark.parametrize("reduce", [False, True])
def test_first_step_matches_kfac_jax_scaling(target, reduce):
    params = init()
    x, y = data()
    lr, damping, kl = 0.3, 1e-2, 1e-3
    opt = natgrad.jax.KFAC(params, target=target, locations={"conv": T}, lr=lr, damping=damping,
                           kl_clip=kl, inverse_period=1, state_dtype="float64", reduce=reduce)
    assert opt.session.blocks["conv"].kfac_dense.locations == T
    assert list(opt.session.blocks["conv"].shape) == [COUT, K * K * CIN + 1]
    loss, grads, stats = loss_and_stats(params, x, y)
    # Oracle: A = abar^T abar / n, G = g^T g / (n T) for the conv; dense as usual.
    a = np.asarray(stats["conv"][0]).reshape(N * T, -1)
    abar = np.concatenate([a, np.ones((N * T, 1))], 1)
    g = np.asarray(stats["conv"][1]).reshape(N * T, COUT)
    A, G = abar.T @ abar / N, g.T @ g / (N * T)
    gw = {"conv": np.concatenate([np.asarray(grads["conv"]["kernel"]).reshape(-1, COUT).T,
                                  np.asarray(grads["conv"]["bias"])[:, None]], 1),
          "head": np.concatenate([np.asarray(grads["head"]["kernel"]).T,
                                  np.asarray(grads["head"]["bias"])[:, None]], 1)}
    Ah, Gh = ref.factors(stats["head"][0], stats["head"][1], True)
    V = {"conv": ref.precondition(gw["conv"], A, G, damping),
         "head": ref.precondition(gw["head"], Ah, Gh, damping)}
    nu = min(1.0, np.sqrt(kl / sum(lr ** 2 * np.sum(V[k] * gw[k]) for k in V)))
    new = opt.step(params, grads, stats, loss=float(loss))
    d = -lr * nu * V["conv"]
    np.testing.assert_allclose(np.asarray(new["conv"]["kernel"] - params["conv"]["kernel"]),
                               d[:, :-1].T.reshape(K, K, CIN, COUT), rtol=1e-7, atol=1e-12)
    np.testing.assert_allclose(np.asarray(new["conv"]["bias"] - params["conv"]["bias"]), d[:, -1],
                               rtol=1e-7, atol=1e-12)
    np.testing.assert_allclose(np.asarray(new["head"]["kernel"] - params["head"]["kernel"]),
                               (-lr * nu * V["head"])[:, :-1].T, rtol=1e-7, atol=1e-12)
    opt.close(delete=True)


def test_tiny_conv_trains_through_the_server(target):
    params = init(2)
    x, y = data(3)
    opt = natgrad.jax.KFAC(params, target=target, locations={"conv": T}, lr=0.3, damping=1e-2,
                           kl_clip=1e-2, inverse_period=2)
    loss0 = None
    for _ in range(20):
        loss, grads, stats = loss_and_stats(params, x, y)
        loss0 = float(loss) if loss0 is None else loss0
        params = opt.step(params, grads, stats, loss=float(loss))
    assert float(loss) < 0.5 * loss0, (loss0, float(loss))
    assert params["conv"]["kernel"].shape == (K, K, CIN, COUT)
    # Rows that are not whole examples are refused, naming the layer.
    p, g = stats["conv"]
    with pytest.raises(natgrad.InvalidArgument, match="'conv'.*n \\* locations"):
        opt.step(params, grads, {**stats, "conv": (np.asarray(p).reshape(-1, p.shape[-1])[:-1],
                                                   np.asarray(g).reshape(-1, COUT)[:-1])})
    opt.close(delete=True)
