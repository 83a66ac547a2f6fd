"""Offline checks of natgrad.gaussian's reference maths (docs/math.md)."""
import os
import sys

import numpy as np
import pytest

from natgrad import gaussian as ng

torch = pytest.importorskip("torch")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))

PARAMS = ["natural", "expectation", "mean_covariance", "mean_cholesky"]


def random_q(rng, M):
    m = rng.standard_normal(M)
    L = np.tril(0.3 * rng.standard_normal((M, M)), -1) + np.diag(rng.uniform(0.5, 1.5, M))
    return m, L @ L.T


@pytest.mark.parametrize("p", PARAMS)
def test_conversions_round_trip(p):
    m, S = random_q(np.random.default_rng(1), 4)
    p1, p2 = ng.from_mean_cov(m, S, p)
    m2, S2 = ng.to_mean_cov(p1, p2, p)
    np.testing.assert_allclose(m2, m, atol=1e-10)
    np.testing.assert_allclose(S2, S, atol=1e-10)


def _torch_to_eta(p1, p2, p):
    if p == "expectation":
        return p1, p2
    if p == "mean_covariance":
        return p1, p2 + torch.outer(p1, p1)
    if p == "mean_cholesky":
        L = torch.tril(p2)
        return p1, L @ L.T + torch.outer(p1, p1)
    if p == "natural":
        S = torch.linalg.inv(-2 * p2)
        m = S @ p1
        return m, S + torch.outer(m, m)


@pytest.mark.parametrize("p", PARAMS)
def test_expectation_gradient_matches_autograd(p):
    rng = np.random.default_rng(2)
    M = 4
    m, S = random_q(rng, M)
    a = torch.tensor(rng.standard_normal(M))
    B = torch.tensor(rng.standard_normal((M, M)))  # not symmetric: the sym() matters

    def f(e1, e2):
        return a @ e1 + torch.sum(B * e2) + 0.1 * (e1 @ e1) ** 2 + 0.05 * torch.sum(e2 * e2)

    m_, S_ = ng.to_mean_cov(*ng.from_mean_cov(m, S, "expectation"), "expectation")
    e1 = torch.tensor(m_, requires_grad=True)
    e2 = torch.tensor(S_ + np.outer(m_, m_), requires_grad=True)
    d1, d2 = torch.autograd.grad(f(e1, e2), [e1, e2])
    want1, want2 = d1.numpy(), 0.5 * (d2.numpy() + d2.numpy().T)

    p1, p2 = ng.from_mean_cov(m, S, p)
    t1 = torch.tensor(p1, requires_grad=True)
    t2 = torch.tensor(p2, requires_grad=True)
    g1, g2 = torch.autograd.grad(f(*_torch_to_eta(t1, t2, p)), [t1, t2])
    got1, got2 = ng.expectation_gradient(p1, p2, g1.numpy(), g2.numpy(), p)
    np.testing.assert_allclose(got1, want1, rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(got2, want2, rtol=1e-8, atol=1e-8)


@pytest.fixture(scope="module")
def svgp():
    import svgp_diabetes as ex
    Xtr, ytr, *_ = ex.load_data(0)
    return ex, ex.SVGP(Xtr, ytr, ex.choose_inducing(Xtr, 15, 0))


@pytest.mark.parametrize("p", PARAMS)
def test_one_natural_step_with_gamma_1_reaches_collapsed_bound(svgp, p):
    ex, model = svgp
    M = model.M
    rng = np.random.default_rng(3)
    m, S = random_q(rng, M)
    hyp = model.init_hyp()
    _, gm, gL, _ = model.value_and_grads(m, np.linalg.cholesky(S), hyp)
    # Gradients in parametrisation p via the mean/Cholesky ones: go through eta.
    e1, e2 = ng.expectation_gradient(m, np.linalg.cholesky(S), gm, gL, "mean_cholesky")
    p1, p2 = ng.from_mean_cov(m, S, p)
    n1, n2 = ng.natural_gradient_step(p1, p2, e1, e2, p, 1.0, gradient_space="expectation")
    m1, S1 = ng.to_mean_cov(n1, n2, p)
    elbo = -float(model.neg_elbo(torch.tensor(m1), torch.tensor(np.linalg.cholesky(S1)), torch.tensor(hyp)))
    assert elbo == pytest.approx(model.collapsed_bound(hyp), rel=1e-8)


def test_gamma_below_one_contracts_geometrically(svgp):
    ex, model = svgp
    rng = np.random.default_rng(4)
    m, S = random_q(rng, model.M)
    L = np.linalg.cholesky(S)
    hyp = model.init_hyp()
    gamma = 0.3
    theta0 = ng.from_mean_cov(m, S, "natural")
    thetas = []
    for _ in range(3):
        _, gm, gL, _ = model.value_and_grads(m, L, hyp)
        m, L = ng.natural_gradient_step(m, L, gm, gL, "mean_cholesky", gamma)
        thetas.append(ng.from_mean_cov(*ng.to_mean_cov(m, L, "mean_cholesky"), "natural"))
    # theta* from gamma = 1
    _, gm, gL, _ = model.value_and_grads(m, L, hyp)
    star = ng.from_mean_cov(*ng.to_mean_cov(*ng.natural_gradient_step(m, L, gm, gL, "mean_cholesky", 1.0),
                                            "mean_cholesky"), "natural")
    for t, th in enumerate(thetas, start=1):
        for k in range(2):
            np.testing.assert_allclose(th[k] - star[k], (1 - gamma) ** t * (theta0[k] - star[k]),
                                       rtol=1e-5, atol=1e-6)
