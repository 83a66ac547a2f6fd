#!/usr/bin/env python3
"""Variational inference in a linear-Gaussian model: standard, pushforward
and compositional natural gradients, and Adam, against the exact optimum.

Model: p(x | z) = N(A z, sigma² I), prior p(z) = N(0, I), z in R^d, x in R^n.
q(z) = N(m, L Lᵀ) (mean + Cholesky). The objective is the negative ELBO,
E_q[l(z)] + KL(q || p) with l(z) = -log p(x | z); every method sees the
likelihood term only through S reparameterised samples z_s = m + L eps_s
(a Monte Carlo estimate) and the KL in closed form. The exact optimum is the
posterior N(mu*, Sigma*), Sigma* = (AᵀA/sigma² + I)^-1, mu* = Sigma* Aᵀx/sigma²,
where -ELBO = -log p(x); the printed metric is the gap -ELBO(m, L) + log p(x),
computed exactly (not estimated).

Methods (docs/variational_inference.md):
  standard NG     the server's gaussian block on the MC gradient in (m, L)
                  (gradient_space parametrization): theta' = theta - gamma dL/deta.
  pushforward NG  preconditioned by the Fisher of the marginal predictive
                  N(A m, A S Aᵀ + sigma² I) in (m, S): with
                  B = Aᵀ(ASAᵀ + sigma² I)^-1 A, F_mm = B and F_SS[dS] = ½ B dS B,
                  damped by delta I (exactly, in B's eigenbasis); numpy, here.
  compositional   the server's compositional gradient: eps_s, grad l(z_s) and
    NG            F_z = AᵀA/sigma² (shared by all samples), the KL's (m, L)
                  gradient as the rest; the server forms
                  u_s = (F_z + lambda_z I)^-1 grad l(z_s) and steps on it.
  Adam            two server Adam blocks on m and L, same MC gradient.

    .venv/bin/python client/python/examples/linear_gaussian_vi.py --steps 200 --seeds 5 --samples 1 8 32 --out /tmp/lg
"""
import argparse
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vi_common as vc  # noqa: E402
from natgrad import gaussian as ng  # noqa: E402

GRIDS = {
    "standard NG (server)": [0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0],
    "pushforward NG (numpy)": [0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0],
    "compositional NG": [0.003, 0.01, 0.03, 0.1, 0.3, 1.0],
    "Adam (server)": [0.001, 0.003, 0.01, 0.03, 0.1, 0.3],
}
SMALL_GRIDS = {k: v[::2] for k, v in GRIDS.items()}
LEVEL = 1.0  # "steps to": first step at which the seed-mean gap is <= 1 nat
# The compositional method is tuned over (gamma, lambda_z) pairs: lambda_z
# changes both its conditioning and (docs/variational_inference.md) its fixed point.
LIKELIHOOD_DAMPINGS = [1e-3, 1.0]


class LinearGaussian:
    def __init__(self, n, d, sigma, seed):
        r = np.random.default_rng(seed)
        self.n, self.d, self.sigma2 = n, d, sigma * sigma
        self.A = r.standard_normal((n, d)) / math.sqrt(d)
        z = r.standard_normal(d)
        self.x = self.A @ z + sigma * r.standard_normal(n)
        self.H = self.A.T @ self.A / self.sigma2  # Hessian (and Fisher) of l in z
        self.b = self.A.T @ self.x / self.sigma2
        self.post_cov = np.linalg.inv(self.H + np.eye(d))
        self.post_mean = self.post_cov @ self.b
        C = self.A @ self.A.T + self.sigma2 * np.eye(n)
        _, logdet = np.linalg.slogdet(C)
        self.neg_log_evidence = 0.5 * (n * math.log(2 * math.pi) + logdet + self.x @ np.linalg.solve(C, self.x))

    def lik_grads(self, Z):
        """grad_z l(z) = H z - b for each row of Z."""
        return Z @ self.H - self.b

    def neg_elbo(self, m, L):
        S = L @ L.T
        r = self.x - self.A @ m
        el = 0.5 * self.n * math.log(2 * math.pi * self.sigma2) + 0.5 * (r @ r) / self.sigma2 \
            + 0.5 * np.sum(self.H * S)
        return el + vc.kl_to_isotropic_prior(m, L)[0]

    def gap(self, m, L):
        return self.neg_elbo(m, L) - self.neg_log_evidence

    def pushforward_direction(self, S, gm, gS, damping):
        """(F + damping I)^-1 (gm, gS) for the Fisher F of the marginal
        predictive N(A m, A S Aᵀ + sigma² I) in (m, S): with
        B = Aᵀ(A S Aᵀ + sigma² I)^-1 A, F_mm = B, F_mS = 0 and
        F_SS[dS] = ½ B dS B (from ½ tr(C^-1 dC C^-1 dC), dC = A dS Aᵀ);
        solved exactly in B's eigenbasis, where F_SS is diagonal."""
        C = self.A @ S @ self.A.T + self.sigma2 * np.eye(self.n)
        B = self.A.T @ np.linalg.solve(C, self.A)
        lam, Q = np.linalg.eigh(0.5 * (B + B.T))
        dm = Q @ ((Q.T @ gm) / (lam + damping))
        dS = Q @ ((Q.T @ gS @ Q) / (0.5 * np.outer(lam, lam) + damping)) @ Q.T
        return dm, dS

    def mc_gradients(self, m, L, eps):
        """(m, L) gradient of the MC -ELBO: likelihood by reparameterisation,
        KL exact."""
        gm, gL = vc.reparam_gradients(eps, self.lik_grads(m + eps @ L.T))
        _, km, kL = vc.kl_to_isotropic_prior(m, L)
        return gm + km, gL + kL


def start(d):
    return np.zeros(d), np.eye(d)  # q = prior


def make_methods(client, prob, pushforward_damping, compositional):
    d = prob.d

    def samples(seed, S, steps):
        return np.random.default_rng(1000 + seed).standard_normal((steps, S, d))

    def standard(gamma, seed, S, steps):
        sess = vc.gaussian_session(client, d, gamma)
        m, L = start(d)
        curve = [prob.gap(m, L)]
        try:
            for eps in samples(seed, S, steps):
                m, L = vc.ng_step(sess, m, L, *prob.mc_gradients(m, L, eps))
                curve.append(prob.gap(m, L))
        finally:
            vc.close_quietly(sess)
        return curve

    def pushforward(lr, seed, S, steps):
        m, L = start(d)
        curve = [prob.gap(m, L)]
        for eps in samples(seed, S, steps):
            gm, gL = prob.mc_gradients(m, L, eps)
            # (m, S) gradient from the (m, L) one: dL/dS = G, dL/dm unchanged.
            G = ng.expectation_gradient(m, L, gm, gL, "mean_cholesky")[1]
            Sig = L @ L.T
            dm, dS = prob.pushforward_direction(Sig, gm, G, pushforward_damping)
            step = lr
            for _ in range(9):  # halve until S stays positive definite, as the server's safeguard
                S_new = Sig - step * 0.5 * (dS + dS.T)
                if vc.is_pd(S_new):
                    break
                step *= 0.5
            else:
                raise vc.Diverged("pushforward step left the positive-definite cone")
            m, L = m - step * dm, np.linalg.cholesky(S_new)
            curve.append(prob.gap(m, L))
        return curve

    def compositional_run(step, seed, S, steps):
        gamma, likelihood_damping = step
        sess = vc.gaussian_session(client, d, gamma, likelihood_damping=likelihood_damping) \
            if compositional == "server" else vc.gaussian_session(client, d, gamma)
        m, L = start(d)
        curve = [prob.gap(m, L)]
        try:
            for eps in samples(seed, S, steps):
                g = prob.lik_grads(m + eps @ L.T)
                _, km, kL = vc.kl_to_isotropic_prior(m, L)
                if compositional == "server":
                    m, L = vc.compositional_step(sess, m, L, eps, g, prob.H, "shared", km, kL)
                else:  # dense numpy reference of the same gradient, server's NG step
                    um, uL = vc.compositional_gradient_numpy(eps, g, prob.H, "shared", likelihood_damping)
                    m, L = vc.ng_step(sess, m, L, um + km, uL + kL)
                curve.append(prob.gap(m, L))
        finally:
            vc.close_quietly(sess)
        return curve

    def adam(lr, seed, S, steps):
        sess = vc.adam_session(client, d, lr)
        m, L = start(d)
        curve = [prob.gap(m, L)]
        try:
            for eps in samples(seed, S, steps):
                m, L = vc.adam_step(sess, m, L, *prob.mc_gradients(m, L, eps))
                curve.append(prob.gap(m, L))
        finally:
            vc.close_quietly(sess)
        return curve

    comp_name = "compositional NG" + ("" if compositional == "server" else " (numpy ref)")
    return {"standard NG (server)": standard, "pushforward NG (numpy)": pushforward,
            comp_name: compositional_run, "Adam (server)": adam}, comp_name


def run(client, steps=200, seeds=5, samples=(1, 8, 32), n=50, d=20, sigma=0.5, data_seed=0,
        pushforward_damping=1e-3, likelihood_dampings=LIKELIHOOD_DAMPINGS, grid="full", compositional=None,
        out=".", verbose=True):
    """Runs the comparison; returns the JSON document (also written to out/)."""
    if compositional is None:
        compositional = "server" if vc.server_has_compositional() else "numpy"
    prob = LinearGaussian(n, d, sigma, data_seed)
    methods, comp_name = make_methods(client, prob, pushforward_damping, compositional)
    grids = dict(GRIDS if grid == "full" else SMALL_GRIDS)
    grids[comp_name] = [(g, lam) for g in grids.pop("compositional NG") for lam in likelihood_dampings]
    log = print if verbose else None
    if verbose:
        print(f"linear-Gaussian VI: n={n} d={d} sigma={sigma}; -log p(x) = {prob.neg_log_evidence:.4f}; "
              f"gap at q = prior: {prob.gap(*start(d)):.4g}")
        print("step-size grids: " + "; ".join(f"{k}: {v}" for k, v in grids.items()))
    results = vc.tune(methods, grids, list(samples), list(range(seeds)), steps, log=log)
    checkpoints = sorted({min(t, steps) for t in (10, 50, steps)})
    rows = vc.summary_rows(results, checkpoints, level=LEVEL)
    if verbose:
        print()
        vc.print_table(rows, checkpoints, "gap", level=LEVEL)
    os.makedirs(out, exist_ok=True)
    png = os.path.join(out, "linear_gaussian_vi.png")
    vc.plot(results, png, "-ELBO - (-log p(x))", f"linear-Gaussian VI, n={n}, d={d}, sigma={sigma}; "
            f"mean and range over {seeds} seeds", logy=True)
    config = {"example": "linear_gaussian_vi", "steps": steps, "seeds": seeds, "samples": list(samples),
              "n": n, "d": d, "sigma": sigma, "data_seed": data_seed,
              "pushforward_damping": pushforward_damping, "likelihood_dampings": list(likelihood_dampings),
              "compositional": compositional, "grids": {k: v for k, v in grids.items()},
              "neg_log_evidence": prob.neg_log_evidence,
              "selection": "per (method, S): lowest seed-mean of the gap averaged over the last quarter of steps"}
    doc = vc.to_json(results, rows, config, os.path.join(out, "linear_gaussian_vi.json"))
    doc["png"] = png
    return doc


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    vc.common_args(ap, steps=200, seeds=5, samples=[1, 8, 32])
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--d", type=int, default=20)
    ap.add_argument("--sigma", type=float, default=0.5)
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--pushforward-damping", type=float, default=1e-3)
    ap.add_argument("--likelihood-damping", type=float, nargs="+", default=LIKELIHOOD_DAMPINGS,
                    help="lambda_z values of the compositional step's grid")
    ap.add_argument("--grid", choices=["full", "small"], default="full")
    ap.add_argument("--compositional", choices=["server", "numpy"], default=None,
                    help="compositional gradient through the server (default when it supports it) "
                         "or the example's dense numpy reference")
    a = ap.parse_args(argv)
    with vc.service(a) as client:
        run(client, a.steps, a.seeds, a.samples, a.n, a.d, a.sigma, a.data_seed, a.pushforward_damping,
            a.likelihood_damping, a.grid, a.compositional, a.out, verbose=not a.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
