"""natgrad.jax.natural_direction against the server's closed-form directions.

The Gaussian blocks, asked for ``return_direction``, return the natural-
gradient direction in the client's parametrisation, computed on the server by
hand-derived formulas (docs/math.md). natural_direction gets the same thing
from nothing but the map theta -> xi and one jax.jvp, so for each of the four
full-covariance and four diagonal parametrisations the two must agree to
rounding (float64 state on the server)."""
import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="jax not installed (scripts/setup-python installs jax[cpu])")
import jax.numpy as jnp  # noqa: E402

import natgrad.jax as njax  # noqa: E402
from natgrad import blocks  # noqa: E402
from natgrad import gaussian as ng  # noqa: E402

jax.config.update("jax_enable_x64", True)

COPIES, M = 3, 5
TOL = 1e-10


# theta -> xi for one copy of a full Gaussian, theta = (S^-1 m, -1/2 S^-1).
def _mean_cov(theta):
    t1, t2 = theta
    S = jnp.linalg.inv(-2.0 * t2)
    S = 0.5 * (S + S.T)
    return S @ t1, S


FULL = {
    "natural": lambda th: th,
    "expectation": lambda th: (lambda m, S: (m, S + jnp.outer(m, m)))(*_mean_cov(th)),
    "mean_covariance": _mean_cov,
    "mean_cholesky": lambda th: (lambda m, S: (m, jnp.linalg.cholesky(S)))(*_mean_cov(th)),
}


# theta -> xi elementwise for a diagonal Gaussian, theta = (m/s, -1/(2s)).
def _mean_var(theta):
    t1, t2 = theta
    s = -0.5 / t2
    return t1 * s, s


DIAG = {
    "natural": lambda th: th,
    "expectation": lambda th: (lambda m, s: (m, s + m * m))(*_mean_var(th)),
    "mean_variance": _mean_var,
    "mean_log_std": lambda th: (lambda m, s: (m, 0.5 * jnp.log(s)))(*_mean_var(th)),
}


def random_full(seed):
    r = np.random.default_rng(seed)
    m = r.standard_normal((COPIES, M))
    Lc = np.tril(0.4 * r.standard_normal((COPIES, M, M)), -1) + np.eye(M) * r.uniform(0.5, 1.5, (COPIES, 1, M))
    S = Lc @ np.swapaxes(Lc, -1, -2)
    g1 = r.standard_normal((COPIES, M))
    G = r.standard_normal((COPIES, M, M))
    g2 = 0.5 * (G + np.swapaxes(G, -1, -2))  # dL/deta2 is symmetric (eta2 is)
    return m, S, g1, g2


def random_diag(seed):
    r = np.random.default_rng(seed)
    return (r.standard_normal((COPIES, M)), r.uniform(0.3, 2.0, (COPIES, M)),
            r.standard_normal((COPIES, M)), r.standard_normal((COPIES, M)))


def server_direction(client, block, p1, p2, g1, g2):
    sess = client.create_session([block], state_dtype="float64")
    u = sess.step({block.name: {"param1": p1, "param2": p2, "grad1": g1, "grad2": g2,
                                "gradient_space": "expectation"}})[block.name]
    sess.delete()
    assert u.direction1 is not None and u.direction2 is not None
    return np.asarray(u.direction1), np.asarray(u.direction2)


@pytest.mark.server
@pytest.mark.parametrize("param", sorted(FULL))
def test_full_covariance_direction_matches_server(client, param):
    m, S, g1, g2 = random_full(10 + sorted(FULL).index(param))
    p1, p2 = ng.from_mean_cov(m, S, param)
    want1, want2 = server_direction(
        client, blocks.gaussian("q", M, COPIES, parametrization=param, gamma=0.01, return_direction=True),
        p1, p2, g1, g2)
    theta = ng.from_mean_cov(m, S, "natural")
    got1, got2 = njax.natural_direction(jax.vmap(FULL[param]), theta, (g1, g2))
    scale = max(1.0, float(np.max(np.abs(want2))))
    np.testing.assert_allclose(np.asarray(got1), want1, rtol=TOL, atol=TOL * scale)
    np.testing.assert_allclose(np.asarray(got2), want2, rtol=TOL, atol=TOL * scale)


@pytest.mark.server
@pytest.mark.parametrize("param", sorted(DIAG))
def test_diagonal_direction_matches_server(client, param):
    m, s, g1, g2 = random_diag(20 + sorted(DIAG).index(param))
    t1, t2 = m / s, -0.5 / s
    p1, p2 = {"natural": (t1, t2), "expectation": (m, s + m * m), "mean_variance": (m, s),
              "mean_log_std": (m, 0.5 * np.log(s))}[param]
    want1, want2 = server_direction(
        client, blocks.gaussian_diag("q", M, COPIES, parametrization=param, gamma=0.01, return_direction=True),
        p1, p2, g1, g2)
    got1, got2 = njax.natural_direction(DIAG[param], (t1, t2), (g1, g2))
    np.testing.assert_allclose(np.asarray(got1), want1, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(np.asarray(got2), want2, rtol=TOL, atol=TOL)


@pytest.mark.server
def test_pytree_of_blocks_in_one_pass(client):
    """A dict of a full and a diagonal Gaussian, pushed forward together."""
    m, S, g1, g2 = random_full(30)
    dm_, ds_, dg1, dg2 = random_diag(31)
    theta = {"full": ng.from_mean_cov(m, S, "natural"), "diag": (dm_ / ds_, -0.5 / ds_)}
    grads = {"full": (g1, g2), "diag": (dg1, dg2)}

    def xi_of_theta(th):
        return {"full": jax.vmap(FULL["mean_cholesky"])(th["full"]), "diag": DIAG["mean_log_std"](th["diag"])}

    xi, d = njax.natural_direction(xi_of_theta, theta, grads, return_xi=True)
    np.testing.assert_allclose(np.asarray(xi["full"][1]), np.linalg.cholesky(S), atol=1e-12)
    wf = server_direction(client, blocks.gaussian("f", M, COPIES, parametrization="mean_cholesky",
                                                  return_direction=True),
                          m, np.linalg.cholesky(S), g1, g2)
    wd = server_direction(client, blocks.gaussian_diag("d", M, COPIES, parametrization="mean_log_std",
                                                       return_direction=True),
                          dm_, 0.5 * np.log(ds_), dg1, dg2)
    for got, want in zip(d["full"] + d["diag"], wf + wd):
        np.testing.assert_allclose(np.asarray(got), want, rtol=TOL, atol=TOL * max(1.0, np.max(np.abs(want))))


def test_mean_cholesky_matches_the_written_out_formula():
    """No server: the docstring's closed form, dm = S (g1 + 2 g2 m),
    dL = L Phi(2 L^T g2 L), Phi = lower triangle with halved diagonal."""
    m, S, g1, g2 = random_full(40)
    got_m, got_L = njax.natural_direction(jax.vmap(FULL["mean_cholesky"]), ng.from_mean_cov(m, S, "natural"),
                                          (g1, g2))
    L = np.linalg.cholesky(S)
    inner = 2.0 * np.swapaxes(L, -1, -2) @ g2 @ L
    phi = np.tril(inner) - 0.5 * inner * np.eye(M)
    np.testing.assert_allclose(np.asarray(got_m), (S @ (g1 + 2 * (g2 @ m[..., None])[..., 0])[..., None])[..., 0],
                               rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(np.asarray(got_L), L @ phi, rtol=1e-10, atol=1e-10)


def test_first_order_agreement_with_the_natural_step():
    """xi(theta - eps v) - xi(theta) = -eps * direction + O(eps^2)."""
    m, S, g1, g2 = random_full(41)
    theta = ng.from_mean_cov(m, S, "natural")
    f = jax.vmap(FULL["mean_cholesky"])
    d = njax.natural_direction(f, theta, (g1, g2))
    for eps in (1e-4, 1e-5):
        moved = f((theta[0] - eps * g1, theta[1] - eps * g2))
        base = f(theta)
        for a, b, dd in zip(moved, base, d):
            fd = (np.asarray(a) - np.asarray(b)) / eps
            np.testing.assert_allclose(fd, -np.asarray(dd), rtol=0, atol=50 * eps * max(1.0, np.max(np.abs(dd))))


def test_structure_and_shape_mismatches_raise():
    theta = (jnp.ones(3), -jnp.ones(3))
    with pytest.raises(ValueError, match="structure"):
        njax.natural_direction(lambda t: t, theta, [jnp.ones(3)])
    with pytest.raises(ValueError, match="shape"):
        njax.natural_direction(lambda t: t, theta, (jnp.ones(3), jnp.ones(4)))
