"""Diagonal (mean-field) Gaussian blocks through the real server, against a
closed form: for L = KL(q || p) with p = N(mu, diag(sigma2)), dL/deta =
theta_q - theta_p, so one natural-gradient step with gamma = 1 lands exactly on
p, and with gamma < 1, theta_t - theta_p = (1 - gamma)^t (theta_0 - theta_p)."""
import numpy as np
import pytest

import natgrad
from natgrad import blocks

pytestmark = pytest.mark.server

L, M = 3, 50


def natural(m, s):
    return m / s, -0.5 / s


def kl_eta_gradient(m, s, mu, sigma2):
    t1, t2 = natural(m, s)
    p1, p2 = natural(mu, sigma2)
    return t1 - p1, t2 - p2


def target_and_start(seed=0):
    r = np.random.default_rng(seed)
    mu, sigma2 = r.standard_normal((L, M)), r.uniform(0.2, 3.0, (L, M))
    m, s = r.standard_normal((L, M)), r.uniform(0.2, 3.0, (L, M))
    return mu, sigma2, m, s


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_one_step_with_gamma_one_lands_on_the_target(client, dtype):
    mu, sigma2, m, s = target_and_start()
    sess = client.create_session([blocks.gaussian_diag("q", M, L, gamma=1.0)],
                                 state_dtype="float64" if dtype == np.float64 else "float32")
    g1, g2 = kl_eta_gradient(m, s, mu, sigma2)
    u = sess.step({"q": {"param1": m.astype(dtype), "param2": s.astype(dtype),
                         "grad1": g1.astype(dtype), "grad2": g2.astype(dtype),
                         "gradient_space": "expectation"}})["q"]
    tol = 1e-12 if dtype == np.float64 else 1e-4
    assert u.param1.dtype == dtype
    np.testing.assert_allclose(u.param1, mu, rtol=tol, atol=tol)
    np.testing.assert_allclose(u.param2, sigma2, rtol=tol, atol=tol)


def test_log_std_contracts_geometrically_towards_the_target(client):
    mu, sigma2, m, s = target_and_start(1)
    gamma = 0.3
    sess = client.create_session([blocks.gaussian_diag("q", M, L, parametrization="mean_log_std",
                                                       gamma=gamma)], state_dtype="float64")
    t0 = np.stack(natural(m, s))
    tp = np.stack(natural(mu, sigma2))
    rho = 0.5 * np.log(s)
    for t in range(1, 6):
        s_now = np.exp(2 * rho)
        g1, g2 = kl_eta_gradient(m, s_now, mu, sigma2)
        u = sess.step({"q": {"param1": m, "param2": rho, "grad1": g1, "grad2": g2,
                             "gradient_space": "expectation"}})["q"]
        m, rho = u.param1, u.param2
        theta = np.stack(natural(m, np.exp(2 * rho)))
        np.testing.assert_allclose(theta - tp, (1 - gamma) ** t * (t0 - tp), rtol=1e-9, atol=1e-10)


def test_bad_inputs_name_the_block_and_field(client):
    sess = client.create_session([blocks.gaussian_diag("q", 4)])
    with pytest.raises(natgrad.InvalidArgument, match="gradient_space"):
        sess.step({"q": {"param1": np.zeros(4), "param2": np.ones(4),
                         "grad1": np.zeros(4), "grad2": np.zeros(4)}})
    with pytest.raises(natgrad.InvalidArgument, match="positive variance"):
        sess.step({"q": {"param1": np.zeros(4), "param2": -np.ones(4),
                         "grad1": np.zeros(4), "grad2": np.zeros(4),
                         "gradient_space": "expectation"}})
    with pytest.raises(ValueError, match="parametrization"):
        blocks.gaussian_diag("q", 4, parametrization="cholesky")
