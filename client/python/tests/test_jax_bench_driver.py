"""bench/jax/kfac_jax_compare.py's model, data and statistics builders (jax
only), its natgrad runs on a tiny model against the real server, and, where
kfac-jax is installed (bench/jax/setup-venv's venv, not the main .venv), its
kfac-jax configuration against natgrad's first update."""
import importlib.util
import os

import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="jax not installed (scripts/setup-python installs jax[cpu])")
import jax.numpy as jnp  # noqa: E402

DRIVER = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "..", "bench", "jax",
                                       "kfac_jax_compare.py"))
TINY = (12, 8, 4, 8, 12)


@pytest.fixture(scope="module")
def drv():
    spec = importlib.util.spec_from_file_location("kfac_jax_compare", DRIVER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # imports jax and natgrad only; kfac_jax/optax when a run needs them
    return mod


def test_model_is_the_autoencoder(drv):
    p = drv.init_params(0)
    assert drv.WIDTHS == (784, 1000, 500, 250, 30, 250, 500, 1000, 784)
    assert list(p) == [f"dense{i}" for i in range(8)]
    for i, name in enumerate(p):
        d_in, d_out = drv.WIDTHS[i], drv.WIDTHS[i + 1]
        assert p[name]["kernel"].shape == (d_in, d_out) and p[name]["bias"].shape == (d_out,)
        assert p[name]["kernel"].dtype == jnp.float32
        assert float(jnp.abs(p[name]["kernel"]).max()) <= 1 / np.sqrt(d_in)
    assert drv.linear_layers() == {3, 7}  # the 30-unit code layer and the logits
    # The same seed gives the same parameters (every kind starts from them).
    for a, b in zip(jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(drv.init_params(0))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_images_are_mnist_shaped(drv):
    x = np.asarray(drv.images(1000, 7))
    assert x.shape == (1000, 784) and x.dtype == np.float32
    assert x.min() >= 0.0 and x.max() <= 1.0
    assert 0.18 < np.mean(x > 0) < 0.20
    np.testing.assert_array_equal(x, np.asarray(drv.images(1000, 7)))


def test_forward_and_loss(drv):
    p = drv.init_params(1, TINY)
    x = drv.images(5, 2, d=TINY[0])
    logits, acts, pres = drv.forward(p, x, widths=TINY)
    # By hand: sigmoid after layers 0 and 2, linear code layer 1 and logits 3.
    h = x
    for i in range(4):
        s = h @ p[f"dense{i}"]["kernel"] + p[f"dense{i}"]["bias"]
        np.testing.assert_allclose(np.asarray(acts[i]), np.asarray(h), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(pres[i]), np.asarray(s), rtol=1e-6)
        h = s if i in (1, 3) else 1 / (1 + np.exp(-s))
    np.testing.assert_allclose(np.asarray(logits), np.asarray(h), rtol=1e-5, atol=1e-6)
    z, t = np.asarray(logits, np.float64), np.asarray(x, np.float64)
    bce = -(t * np.log(1 / (1 + np.exp(-z))) + (1 - t) * np.log(1 - 1 / (1 + np.exp(-z)))).sum(1)
    np.testing.assert_allclose(float(drv.mean_loss(p, x, TINY)), bce.mean(), rtol=1e-5)


def test_statistics_are_per_example_output_gradients(drv):
    p = drv.init_params(2, TINY)
    x = drv.images(6, 3, d=TINY[0])
    loss, grads, stats = drv.make_loss_and_stats(TINY)(p, x, jax.random.PRNGKey(0))
    np.testing.assert_allclose(float(loss), float(drv.mean_loss(p, x, TINY)), rtol=1e-6)
    want_g = jax.grad(drv.mean_loss)(p, x, TINY)
    for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(want_g)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    # Oracle: the Jacobian of the vector of per-example losses w.r.t. each
    # layer's pre-activations; example k's row of g is its diagonal block.
    n = x.shape[0]
    eps = [jnp.zeros((n, d)) for d in TINY[1:]]

    def losses(e):
        return drv.per_example_loss(drv.forward(p, x, e, TINY)[0], x)
    jac = jax.jacrev(losses)(eps)
    _, acts, _ = drv.forward(p, x, widths=TINY)
    for i, name in enumerate(drv.layer_names(TINY)):
        a, g = stats[name]
        np.testing.assert_array_equal(np.asarray(a), np.asarray(acts[i]))
        diag = np.asarray(jac[i])[np.arange(n), np.arange(n)]
        np.testing.assert_allclose(np.asarray(g), diag, rtol=1e-5, atol=1e-6)


def test_sampled_statistics_use_model_targets(drv):
    p = drv.init_params(3, TINY)
    x = drv.images(64, 4, d=TINY[0])
    f = drv.make_loss_and_stats(TINY, fisher="sampled")
    loss, grads, stats = f(p, x, jax.random.PRNGKey(1))
    _, grads_e, stats_e = drv.make_loss_and_stats(TINY)(p, x, jax.random.PRNGKey(1))
    for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads_e)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # the gradient is the data's
    # Logits layer: per-example output gradient sigmoid(z) - y with y in {0, 1}.
    z = np.asarray(drv.forward(p, x, widths=TINY)[0], np.float64)
    g = np.asarray(stats["dense3"][1], np.float64)
    y = 1 / (1 + np.exp(-z)) - g
    assert np.all(np.isclose(y, 0, atol=1e-5) | np.isclose(y, 1, atol=1e-5))
    assert not np.allclose(g, np.asarray(stats_e["dense3"][1]))
    again = f(p, x, jax.random.PRNGKey(1))[2]["dense3"][1]
    np.testing.assert_array_equal(np.asarray(again), np.asarray(stats["dense3"][1]))
    with pytest.raises(ValueError, match="fisher"):
        drv.make_loss_and_stats(TINY, fisher="exact")


def test_kfac_jax_settings_rescale_the_empirical_fisher(drv):
    class A:
        lr, damping, kl_clip, batch, fisher = 0.1, 1e-3, 1e-3, 1000, "empirical"
    assert drv.kfac_jax_settings(A) == (1e-4, 1e-6, 1e-6, "fisher_empirical")
    A.fisher = "sampled"
    assert drv.kfac_jax_settings(A) == (0.1, 1e-3, 1e-3, "fisher_gradients")


TINY_ARGS = ["--widths", ",".join(map(str, TINY)), "--batch", "32", "--batches", "2", "--reps", "1",
             "--warmup", "2", "--steps", "4", "--inverse_period", "2"]


def test_natgrad_runs_on_a_tiny_model(drv, server_binary, capsys):
    rows = drv.main(TINY_ARGS + ["--kinds", "natgrad,natgrad_pipe", "--server", server_binary])
    out = capsys.readouterr().out
    assert "natgrad_pipe" in out and "x kfac_jax" in out and "floor x" in out
    # reduce="auto" (the driver's default) says what it chose, rep by rep ("?": still
    # trying after these few steps).
    chose = [line for line in out.splitlines() if line.startswith("reduce=auto chose")]
    assert len(chose) == 2 and all(line.rsplit(" ", 1)[-1] in ("raw", "reduced", "?") for line in chose)
    loss0 = float(drv.mean_loss(drv.init_params(0, TINY), drv.images(32, 999, d=TINY[0]), TINY))
    for kind in ("natgrad", "natgrad_pipe"):
        r = rows[kind]
        assert r["step_ms"] > 0 and np.isfinite(r["loss"]) and r["loss"] < loss0
        assert r["server_micros"] > 0
        # Both processes' CPU per step over this machine's cores (one rep).
        ncpu = len(os.sched_getaffinity(0))
        assert r["floor_ms"] == pytest.approx((r["cpu_ms"] + r["server_cpu_ms"]) / ncpu)
