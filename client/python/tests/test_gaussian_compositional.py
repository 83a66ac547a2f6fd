"""Compositional Gaussian steps and the xi-space step option through the real
server, against a numpy dense oracle written from the definitions:

* u_s = (F_s + lambda I)^-1 dl/dz(z_s) by a dense solve;
* the likelihood's gradient w.r.t. (m, S) by central finite differences of
  the surrogate f(m, S) = mean_s u_s . (m + chol(S) eps_s) (u_s held fixed);
* dL/deta from (dL/dm, G = sym dL/dS): (dL/dm - 2 G m, G); the rest of the
  objective is the KL to a prior N(0, K), whose dL/deta is theta_q - theta_K;
* the step theta' = theta - gamma dL/deta, mapped to the block's
  parametrisation by natgrad.gaussian.from_mean_cov.
"""
import numpy as np
import pytest

import natgrad
from natgrad import blocks, errors
from natgrad import gaussian as ng

pytestmark = pytest.mark.server

L, M, S = 2, 3, 4


def spd(r, n, lo):
    x = r.standard_normal((n, n))
    return x @ x.T / n + lo * np.eye(n)


def problem(seed, form):
    r = np.random.default_rng(seed)
    m = r.standard_normal((L, M))
    cov = np.stack([spd(r, M, 0.5) for _ in range(L)])
    eps = r.standard_normal((L, S, M))
    dl = 0.3 * r.standard_normal((L, S, M))
    if form == "full":
        fisher = np.stack([np.stack([spd(r, M, 0.3) for _ in range(S)]) for _ in range(L)])
    elif form == "diagonal":
        fisher = r.uniform(0.2, 2.0, (L, S, M))
    else:
        fisher = np.stack([spd(r, M, 0.3) for _ in range(L)])
    prior = spd(r, M, 1.0)
    return m, cov, eps, dl, fisher, prior


def dense_fisher(fisher, form, c, s):
    if form == "full":
        return fisher[c, s]
    if form == "diagonal":
        return np.diag(fisher[c, s])
    return fisher[c]


def likelihood_eta_gradient(m, cov, eps, dl, fisher, form, damping):
    """dL/deta of the likelihood part for every copy, via finite differences."""
    e1, e2 = np.zeros((L, M)), np.zeros((L, M, M))
    for c in range(L):
        u = np.stack([np.linalg.solve(dense_fisher(fisher, form, c, s) + damping * np.eye(M), dl[c, s])
                      for s in range(S)])

        def f(mean, sig):
            return np.mean([u[s] @ (mean + np.linalg.cholesky(sig) @ eps[c, s]) for s in range(S)])

        dm = u.mean(axis=0)  # f is linear in m
        G = np.zeros((M, M))
        h = 1e-5
        for i in range(M):
            for j in range(i + 1):
                E = np.zeros((M, M))
                E[i, j] = E[j, i] = 1.0
                d = (f(m[c], cov[c] + h * E) - f(m[c], cov[c] - h * E)) / (2 * h)
                G[i, j] = G[j, i] = d if i == j else d / 2
        e1[c] = dm - 2 * G @ m[c]
        e2[c] = G
    return e1, e2


def kl_eta_gradient(m, cov, prior):
    """dKL(q || N(0, K))/deta = theta_q - theta_K."""
    P = np.linalg.inv(cov)
    Kinv = np.linalg.inv(prior)
    t1 = (P @ m[..., None])[..., 0]
    return t1, -0.5 * P + 0.5 * Kinv


def oracle_step(p, m, cov, e1, e2, gamma):
    t1, t2 = ng.from_mean_cov(m, cov, "natural")
    m2, cov2 = ng.to_mean_cov(t1 - gamma * e1, t2 - gamma * e2, "natural")
    return ng.from_mean_cov(m2, cov2, p)


CASES = [("mean_cholesky", "full", "expectation"), ("mean_covariance", "diagonal", "parametrization"),
         ("natural", "shared", "expectation"), ("expectation", "full", None)]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_compositional_step_matches_dense_oracle(client, case):
    p, form, rest = CASES[case]
    m, cov, eps, dl, fisher, prior = problem(case, form)
    gamma, damping = 0.4, 0.25
    sess = client.create_session([blocks.gaussian("q", M, L, parametrization=p, gamma=gamma,
                                                  likelihood_damping=damping, return_direction=True)])
    p1, p2 = ng.from_mean_cov(m, cov, p)
    e1, e2 = likelihood_eta_gradient(m, cov, eps, dl, fisher, form, damping)
    if rest == "expectation":
        r1, r2 = kl_eta_gradient(m, cov, prior)
        x = ng.compositional_input(p1, p2, eps, dl, fisher, fisher_form=form, rest_grad1=r1,
                                   rest_grad2=r2, gradient_space="expectation")
        e1, e2 = e1 + r1, e2 + r2
    elif rest == "parametrization":
        # dKL/dm = K^-1 m, dKL/dS = (K^-1 - S^-1)/2 for mean_covariance.
        Kinv = np.linalg.inv(prior)
        r1 = (Kinv @ m[..., None])[..., 0]
        r2 = 0.5 * (Kinv - np.linalg.inv(cov))
        x = ng.compositional_input(p1, p2, eps, dl, fisher, fisher_form=form, rest_grad1=r1,
                                   rest_grad2=r2, gradient_space="parametrization")
        k1, k2 = kl_eta_gradient(m, cov, prior)
        e1, e2 = e1 + k1, e2 + k2
    else:
        x = ng.compositional_input(p1, p2, eps, dl, fisher, fisher_form=form)
    res = sess.step({"q": x})
    u = res["q"]
    assert res.hyperparameters["q"]["likelihood_damping"] == damping
    g = u.gamma_used
    w1, w2 = oracle_step(p, m, cov, e1, e2, g)
    np.testing.assert_allclose(u.param1, w1, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(u.param2, w2, rtol=1e-7, atol=1e-9)
    if p == "mean_covariance":
        # The direction in (m, S): (S (v1 + 2 V2 m), 2 S V2 S).
        d1 = (cov @ (e1 + 2 * (e2 @ m[..., None])[..., 0])[..., None])[..., 0]
        np.testing.assert_allclose(u.direction1, d1, rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(u.direction2, 2 * cov @ e2 @ cov, rtol=1e-7, atol=1e-9)


def test_blocks_alias_and_one_copy_shapes(client):
    """natgrad.blocks.gaussian_compositional_input is the same helper; with one
    copy the leading copies axis may be dropped everywhere."""
    m, cov, eps, dl, fisher, prior = problem(3, "shared")
    sess = client.create_session([blocks.gaussian("q", M, 1, parametrization="mean_cholesky",
                                                  gamma=0.5, likelihood_damping=0.1)])
    p1, p2 = ng.from_mean_cov(m[0], cov[0], "mean_cholesky")
    x = blocks.gaussian_compositional_input(p1, p2, eps[0], dl[0], fisher[0], fisher_form="shared")
    u = sess.step({"q": x})["q"]
    e1, e2 = likelihood_eta_gradient(m[:1].repeat(L, 0), cov[:1].repeat(L, 0), eps[:1].repeat(L, 0),
                                     dl[:1].repeat(L, 0), fisher[:1].repeat(L, 0), "shared", 0.1)
    w1, w2 = oracle_step("mean_cholesky", m[0], cov[0], e1[0], e2[0], u.gamma_used)
    np.testing.assert_allclose(u.param1.reshape(M), w1, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(u.param2.reshape(M, M), w2, rtol=1e-7, atol=1e-9)


def test_bad_fisher_is_refused_and_changes_nothing(client):
    m, cov, eps, dl, fisher, prior = problem(4, "full")
    sess = client.create_session([blocks.gaussian("q", M, L, parametrization="mean_covariance",
                                                  gamma=0.5)])
    bad = fisher.copy()
    bad[1, 2, 0, 1] += 0.5  # copy 1, sample 2 not symmetric
    with pytest.raises(errors.InvalidArgument, match=r"likelihood_fisher\[1\]\[2\] is not symmetric"):
        sess.step({"q": ng.compositional_input(m, cov, eps, dl, bad, fisher_form="full")})
    # Zero Fisher with the default damping 0: not positive definite.
    with pytest.raises(errors.InvalidArgument, match=r"likelihood_damping = 0\) is not positive definite"):
        sess.step({"q": ng.compositional_input(m, cov, eps, dl, np.zeros((L, S, M)),
                                               fisher_form="diagonal")})
    with pytest.raises(errors.InvalidArgument, match="likelihood_fisher"):
        sess.step({"q": ng.compositional_input(m, cov, eps, dl, fisher[:, :2], fisher_form="full")})
    with pytest.raises(ValueError, match="fisher_form"):
        ng.compositional_input(m, cov, eps, dl, fisher, fisher_form="blocky")
    # Nothing was applied: the good step is step 1.
    u = sess.step({"q": ng.compositional_input(m, cov, eps, dl, fisher, fisher_form="full")})
    assert u.step == 1


def test_config_validation():
    with pytest.raises(ValueError, match="step_space"):
        blocks.gaussian("q", 2, step_space="eta")
    with pytest.raises(ValueError, match="likelihood_damping"):
        blocks.gaussian("q", 2, likelihood_damping=-1.0)
    c = blocks.gaussian("q", 2, step_space="xi", likelihood_damping=1e-3)
    assert c.gaussian.step_space == natgrad.blocks.STEP_SPACES["xi"]
    assert c.gaussian.likelihood_damping.HasField("constant")
    assert blocks.gaussian_diag("d", 2, step_space="xi").gaussian_diag.step_space == \
        natgrad.blocks.STEP_SPACES["xi"]


@pytest.mark.parametrize("p", ["mean_cholesky", "mean_covariance", "expectation"])
def test_xi_step_moves_the_parametrisation_along_the_direction(client, p):
    m, cov, eps, dl, fisher, prior = problem(5, "full")
    gamma = 0.3
    sess = client.create_session([blocks.gaussian("q", M, L, parametrization=p, gamma=gamma,
                                                  step_space="xi", return_direction=True)])
    p1, p2 = ng.from_mean_cov(m, cov, p)
    r1, r2 = kl_eta_gradient(m, cov, prior)
    u = sess.step({"q": ng.step_input(p1, p2, r1, r2, gradient_space="expectation")})["q"]
    # The direction is the theta-step's first-order move (see above: for
    # mean_covariance (S (v1 + 2 V2 m), 2 S V2 S)); the xi step is xi - gamma d.
    np.testing.assert_allclose(u.param1, p1 - gamma * u.direction1, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(u.param2, p2 - gamma * u.direction2, rtol=1e-12, atol=1e-12)
    if p == "mean_covariance":
        d1 = (cov @ (r1 + 2 * (r2 @ m[..., None])[..., 0])[..., None])[..., 0]
        np.testing.assert_allclose(u.direction1, d1, rtol=1e-9, atol=1e-11)
        np.testing.assert_allclose(u.direction2, 2 * cov @ r2 @ cov, rtol=1e-9, atol=1e-11)


def test_diag_xi_step_mean_variance(client):
    r = np.random.default_rng(6)
    m, s = r.standard_normal((L, M)), r.uniform(0.5, 2.0, (L, M))
    g1, g2 = 0.1 * r.standard_normal((L, M)), 0.1 * r.standard_normal((L, M))
    gamma = 0.3
    sess = client.create_session([blocks.gaussian_diag("d", M, L, gamma=gamma, step_space="xi")],
                                 state_dtype="float64")
    u = sess.step({"d": {"param1": m, "param2": s, "grad1": g1, "grad2": g2,
                         "gradient_space": "parametrization"}})["d"]
    # (m, s) Fisher is diag(1/s, 1/(2 s^2)): d = (s g1, 2 s^2 g2).
    np.testing.assert_allclose(u.param1, m - gamma * s * g1, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(u.param2, s - gamma * 2 * s * s * g2, rtol=1e-12, atol=1e-12)
    with pytest.raises(errors.InvalidArgument, match="compositional"):
        sess.step({"d": {"param1": m, "param2": s, "grad1": g1, "grad2": g2,
                         "gradient_space": "parametrization",
                         "compositional": {"samples": np.zeros((L, 1, M))}}})
