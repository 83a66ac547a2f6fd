#!/usr/bin/env python3
"""Sparse variational GP regression (SVGP) on scikit-learn's diabetes data,
optimised through natgrad-server (docs/math.md):

  * q(u) = N(m, L Lᵀ) over M inducing values: a Gaussian block (mean +
    Cholesky parametrisation); the client sends m, L and dL/dm, dL/dL (the
    loss is the negative ELBO) and the server takes the natural-gradient step
    θ' = θ − γ ∂L/∂η, mapping back to (m, L).
  * the kernel hyperparameters (ARD RBF log-lengthscales, log-variance,
    log-noise): an Adam block on the server.

With a Gaussian likelihood one natural-gradient step with γ = 1 lands on the
optimal q(u) from any starting point, so the ELBO after step 1 equals Titsias'
collapsed bound (at the hyperparameters the step was taken at). The script
prints both and exits non-zero when they differ.

    .venv/bin/python client/python/examples/svgp_diabetes.py [--target HOST:PORT] [--steps 50]

Gradients are computed with torch autograd in float64.
"""
import argparse
import math
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import natgrad  # noqa: E402
from natgrad import blocks  # noqa: E402

torch.set_default_dtype(torch.float64)
JITTER = 1e-6


def load_data(seed=0, test_fraction=0.2):
    from sklearn.datasets import load_diabetes
    from sklearn.model_selection import train_test_split
    X, y = load_diabetes(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=test_fraction, random_state=seed)
    mu, sd = Xtr.mean(0), Xtr.std(0)
    ym, ys = ytr.mean(), ytr.std()
    return ((Xtr - mu) / sd, (ytr - ym) / ys, (Xte - mu) / sd, (yte - ym) / ys, ys)


def rbf(X1, X2, log_ls, log_var):
    ls = torch.exp(log_ls)
    d = (X1[:, None, :] - X2[None, :, :]) / ls
    return torch.exp(log_var) * torch.exp(-0.5 * (d ** 2).sum(-1))


class SVGP:
    """Negative ELBO and the collapsed bound of an SVGP with fixed inducing inputs Z."""

    def __init__(self, X, y, Z):
        self.X = torch.as_tensor(X)
        self.y = torch.as_tensor(y)
        self.Z = torch.as_tensor(Z)
        self.M = self.Z.shape[0]
        self.D = self.X.shape[1]

    def init_hyp(self):
        return np.concatenate([np.zeros(self.D), [0.0], [math.log(0.5)]])  # ls=1, var=1, noise=0.5

    def _split(self, hyp):
        return hyp[:self.D], hyp[self.D], hyp[self.D + 1]

    def _kernels(self, hyp):
        log_ls, log_var, log_noise = self._split(hyp)
        Kmm = rbf(self.Z, self.Z, log_ls, log_var) + JITTER * torch.eye(self.M)
        Knm = rbf(self.X, self.Z, log_ls, log_var)
        knn = torch.exp(log_var) * torch.ones(self.X.shape[0])
        return Kmm, Knm, knn, torch.exp(log_noise)

    def neg_elbo(self, m, L, hyp):
        Kmm, Knm, knn, s2 = self._kernels(hyp)
        Lk = torch.linalg.cholesky(Kmm)
        A = torch.cholesky_solve(Knm.T, Lk).T  # Knm Kmm^-1
        L = torch.tril(L)
        mu = A @ m
        var = knn - (A * Knm).sum(1) + ((A @ L) ** 2).sum(1)
        n = self.X.shape[0]
        ell = -0.5 * n * torch.log(2 * math.pi * s2) - 0.5 * (((self.y - mu) ** 2).sum() + var.sum()) / s2
        S = L @ L.T
        KiS = torch.cholesky_solve(S, Lk)
        Kim = torch.cholesky_solve(m[:, None], Lk)[:, 0]
        kl = 0.5 * (torch.trace(KiS) + m @ Kim - self.M
                    + 2 * torch.log(torch.diagonal(Lk)).sum()
                    - torch.log(torch.diagonal(L) ** 2).sum())
        return -(ell - kl)

    def collapsed_bound(self, hyp):
        """Titsias (2009): log N(y | 0, Qnn + σ²I) − tr(Knn − Qnn) / (2σ²)."""
        with torch.no_grad():
            Kmm, Knm, knn, s2 = self._kernels(torch.as_tensor(hyp))
            n = self.X.shape[0]
            Lk = torch.linalg.cholesky(Kmm)
            Psi = torch.linalg.solve_triangular(Lk, Knm.T, upper=False)  # M x n
            B = torch.eye(self.M) + Psi @ Psi.T / s2
            LB = torch.linalg.cholesky(B)
            c = torch.linalg.solve_triangular(LB, Psi @ self.y[:, None], upper=False)[:, 0] / s2
            logdet = 2 * torch.log(torch.diagonal(LB)).sum() + n * torch.log(s2)
            lml = (-0.5 * n * math.log(2 * math.pi) - 0.5 * logdet
                   - 0.5 * (self.y @ self.y) / s2 + 0.5 * (c @ c))
            return float(lml - 0.5 * (knn.sum() - (Psi ** 2).sum()) / s2)

    def value_and_grads(self, m, L, hyp):
        """(-ELBO, dL/dm, dL/dL (lower triangle), dL/dhyp) as numpy float64."""
        mt = torch.tensor(m, requires_grad=True)
        Lt = torch.tensor(L, requires_grad=True)
        ht = torch.tensor(hyp, requires_grad=True)
        loss = self.neg_elbo(mt, Lt, ht)
        gm, gL, gh = torch.autograd.grad(loss, [mt, Lt, ht])
        return float(loss), gm.numpy(), np.tril(gL.numpy()), gh.numpy()

    def predict(self, Xs, m, L, hyp):
        with torch.no_grad():
            hyp = torch.as_tensor(hyp)
            log_ls, log_var, log_noise = self._split(hyp)
            Kmm = rbf(self.Z, self.Z, log_ls, log_var) + JITTER * torch.eye(self.M)
            Ksm = rbf(torch.as_tensor(Xs), self.Z, log_ls, log_var)
            Lk = torch.linalg.cholesky(Kmm)
            A = torch.cholesky_solve(Ksm.T, Lk).T
            Lq = torch.tril(torch.as_tensor(L))
            mu = A @ torch.as_tensor(m)
            var = torch.exp(log_var) - (A * Ksm).sum(1) + ((A @ Lq) ** 2).sum(1) + torch.exp(log_noise)
            return mu.numpy(), var.numpy()


def choose_inducing(X, M, seed=0):
    from sklearn.cluster import KMeans
    return KMeans(n_clusters=M, n_init=4, random_state=seed).fit(X).cluster_centers_


def run(target, steps=50, M=30, gamma=1.0, hyp_lr=0.05, seed=0, verbose=True, tol=1e-6):
    Xtr, ytr, Xte, yte, y_scale = load_data(seed)
    model = SVGP(Xtr, ytr, choose_inducing(Xtr, M, seed))
    rng = np.random.default_rng(seed)
    # An arbitrary start far from the optimum.
    m = rng.standard_normal(M)
    L = np.tril(0.3 * rng.standard_normal((M, M)), -1) + np.diag(rng.uniform(0.5, 1.5, M))
    hyp = model.init_hyp()

    client = natgrad.Client(target)
    session = client.create_session(
        [blocks.gaussian("q_u", dim=M, parametrization="mean_cholesky", gamma=gamma),
         blocks.adam("hyperparameters", [hyp.size], lr=hyp_lr)],
        display_name="svgp diabetes")
    out = {"ok": False}
    try:
        t0 = time.perf_counter()
        for t in range(1, steps + 1):
            loss, gm, gL, gh = model.value_and_grads(m, L, hyp)
            r = session.step({
                "q_u": natgrad.gaussian.step_input(m, L, gm, gL, "parametrization"),
                "hyperparameters": {"gradient": gh, "params": hyp},
            }, loss=loss)
            q = r["q_u"]
            m_new, L_new = q.param1.reshape(M), q.param2.reshape(M, M)
            if t == 1:
                elbo1 = -float(model.neg_elbo(torch.as_tensor(m_new), torch.as_tensor(L_new),
                                              torch.as_tensor(hyp)))
                bound = model.collapsed_bound(hyp)
                diff = abs(elbo1 - bound)
                out.update(elbo0=-loss, elbo1=elbo1, bound=bound, gamma_used=q.gamma_used,
                           ok=diff <= tol * max(1.0, abs(bound)))
                if verbose:
                    print(f"step 1 (gamma={q.gamma_used:g}): ELBO {-loss:.6f} -> {elbo1:.9f}; "
                          f"collapsed (Titsias) bound {bound:.9f}; |diff| = {diff:.2e} "
                          f"-> {'reached' if out['ok'] else 'NOT reached'}")
            m, L = m_new, L_new
            hyp = hyp + r["hyperparameters"]
        elapsed = time.perf_counter() - t0
        final_elbo = -float(model.neg_elbo(torch.as_tensor(m), torch.as_tensor(L), torch.as_tensor(hyp)))
        mu, var = model.predict(Xte, m, L, hyp)
        rmse = float(np.sqrt(np.mean((mu - yte) ** 2)) * y_scale)
        nlpd = float(np.mean(0.5 * np.log(2 * np.pi * var) + 0.5 * (yte - mu) ** 2 / var) + np.log(y_scale))
        out.update(final_elbo=final_elbo, final_bound=model.collapsed_bound(hyp), rmse=rmse, nlpd=nlpd,
                   steps=steps, seconds=elapsed)
        if verbose:
            print(f"after {steps} steps ({elapsed:.2f}s): ELBO {final_elbo:.4f} "
                  f"(collapsed bound {out['final_bound']:.4f}), test RMSE {rmse:.2f}, test NLPD {nlpd:.3f}")
    finally:
        session.delete()
        client.close()
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", help="natgrad-server host:port (default: start one)")
    ap.add_argument("--server", help="natgrad-server binary (default: $NATGRAD_SERVER or build/server/natgrad-server)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--inducing", type=int, default=30)
    ap.add_argument("--gamma", type=float, default=1.0)
    ap.add_argument("--hyp-lr", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="10 steps")
    a = ap.parse_args(argv)
    steps = 10 if a.quick else a.steps
    if a.target:
        out = run(a.target, steps, a.inducing, a.gamma, a.hyp_lr, a.seed)
    else:
        with natgrad.LocalServer(a.server) as srv:
            out = run(srv.target, steps, a.inducing, a.gamma, a.hyp_lr, a.seed)
    return 0 if (out["ok"] or a.gamma != 1.0) else 1


if __name__ == "__main__":
    sys.exit(main())
