"""The examples, end to end against a real server."""
import os
import subprocess
import sys
import time

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples")
sys.path.insert(0, EXAMPLES)


def test_svgp_one_natural_step_reaches_collapsed_bound(target):
    import svgp_diabetes
    out = svgp_diabetes.run(target, steps=8, M=20, gamma=1.0, verbose=False)
    assert out["gamma_used"] == 1.0
    assert out["ok"], (out["elbo1"], out["bound"])
    assert out["elbo1"] > out["elbo0"]
    # Hyperparameter learning (Adam block) improves the bound further.
    assert out["final_bound"] > out["bound"]
    assert out["final_elbo"] == pytest.approx(out["final_bound"], rel=1e-3)


@pytest.mark.slow
def test_digits_quick_demo(server_binary, tmp_path):
    png = tmp_path / "digits.png"
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, os.path.join(EXAMPLES, "digits_kfac.py"), "--quick",
                        "--server", server_binary, "--no-progress", "--plot", str(png)],
                       capture_output=True, text=True, timeout=300)
    elapsed = time.monotonic() - t0
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "natgrad K-FAC" in r.stdout and "torch Adam" in r.stdout
    assert "steps to 95%" in r.stdout and "ms/step" in r.stdout
    assert png.exists() and png.stat().st_size > 10_000
    assert elapsed < 120, f"--quick took {elapsed:.0f}s"
    rows = {l[:26].strip(): l[26:].split() for l in r.stdout.splitlines()
            if l.startswith(("natgrad K-FAC", "torch Adam"))}
    assert set(rows) == {"natgrad K-FAC", "natgrad K-FAC pipelined", "torch Adam"}, rows
    for name, cols in rows.items():
        # ... final acc, final loss, steps, train time "s", ms/step
        acc, steps, wall, per_step = float(cols[-6]), int(cols[-4]), float(cols[-3]), float(cols[-1])
        # Both columns are rounded to 2 decimals: the wall time to 0.005 s,
        # which is 1e3 * 0.005 / steps ms per step, plus 0.005 ms of its own.
        assert per_step == pytest.approx(1e3 * wall / steps, abs=5.0 / steps + 0.006), (name, cols)
        if name.startswith("natgrad"):  # K-FAC, synchronous or one step stale, learns
            assert acc > 0.9, (name, cols)
    assert "relative to Adam: natgrad K-FAC " in r.stdout


def test_svgp_script_cli(target):
    r = subprocess.run([sys.executable, os.path.join(EXAMPLES, "svgp_diabetes.py"), "--target", target,
                        "--quick", "--inducing", "15"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "reached" in r.stdout and "NOT reached" not in r.stdout


# -- variational inference: linear_gaussian_vi.py, logistic_regression_vi.py --

import json  # noqa: E402

import numpy as np  # noqa: E402


def _whitened(S, d, seed):
    """S >= d + 1 samples with mean exactly 0 and second moment exactly I, so
    a reparameterised gradient of a quadratic objective is exact."""
    e = np.random.default_rng(seed).standard_normal((S, d))
    e -= e.mean(0)
    w = np.linalg.cholesky(e.T @ e / S)
    return e @ np.linalg.inv(w).T


def _vi_client(target):
    import natgrad
    return natgrad.Client(target)


def test_linear_gaussian_standard_ng_one_step_lands_on_posterior(target):
    """Oracle: with exact (whitened-sample) gradients, one server natural
    step with gamma = 1 from q = prior is the exact posterior (conjugacy)."""
    import linear_gaussian_vi as lg
    import vi_common as vc
    prob = lg.LinearGaussian(30, 6, 0.5, 0)
    c = _vi_client(target)
    sess = vc.gaussian_session(c, 6, 1.0)
    m, L = lg.start(6)
    m, L = vc.ng_step(sess, m, L, *prob.mc_gradients(m, L, _whitened(40, 6, 1)))
    np.testing.assert_allclose(m, prob.post_mean, atol=1e-9)
    np.testing.assert_allclose(L @ L.T, prob.post_cov, atol=1e-9)
    assert abs(prob.gap(m, L)) < 1e-9
    c.close()


def test_linear_gaussian_pushforward_fisher_matches_dense_construction():
    """The eigenbasis solve against the Fisher built entry by entry from
    J_muᵀ C^-1 J_mu + ½ tr(C^-1 dC_i C^-1 dC_j) over (m, every S_ij)."""
    import linear_gaussian_vi as lg
    prob = lg.LinearGaussian(5, 3, 0.7, 2)
    r = np.random.default_rng(3)
    d = 3
    R = r.standard_normal((d, d))
    S = R @ R.T + 0.5 * np.eye(d)
    gm, G = r.standard_normal(d), r.standard_normal((d, d))
    G = 0.5 * (G + G.T)
    damping = 1e-2
    C = prob.A @ S @ prob.A.T + prob.sigma2 * np.eye(5)
    Ci = np.linalg.inv(C)
    Fmm = prob.A.T @ Ci @ prob.A
    E = [np.outer(np.eye(d)[i], np.eye(d)[j]) for i in range(d) for j in range(d)]
    dC = [prob.A @ e @ prob.A.T for e in E]
    Fss = np.array([[0.5 * np.trace(Ci @ a @ Ci @ b) for b in dC] for a in dC])
    want_m = np.linalg.solve(Fmm + damping * np.eye(d), gm)
    want_S = np.linalg.solve(Fss + damping * np.eye(d * d), G.reshape(-1)).reshape(d, d)
    got_m, got_S = prob.pushforward_direction(S, gm, G, damping)
    np.testing.assert_allclose(got_m, want_m, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got_S, want_S, rtol=1e-9, atol=1e-11)


def test_compositional_reference_matches_closed_form():
    """vi_common's dense compositional gradient on a quadratic likelihood with
    whitened samples: u_s = (H + lam I)^-1 (H z_s - b), so mean u =
    (H + lam)^-1 (H m - b) and tril(mean u epsᵀ) = tril((H + lam)^-1 H L)."""
    import linear_gaussian_vi as lg
    import vi_common as vc
    prob = lg.LinearGaussian(20, 4, 0.5, 4)
    r = np.random.default_rng(5)
    m = r.standard_normal(4)
    L = np.tril(0.3 * r.standard_normal((4, 4)), -1) + np.diag(r.uniform(0.5, 1.5, 4))
    eps = _whitened(12, 4, 6)
    lam = 0.3
    g = prob.lik_grads(m + eps @ L.T)
    K = np.linalg.inv(prob.H + lam * np.eye(4))
    for form, F in (("shared", prob.H), ("full", np.broadcast_to(prob.H, (12, 4, 4)))):
        um, uL = vc.compositional_gradient_numpy(eps, g, F, form, lam)
        np.testing.assert_allclose(um, K @ (prob.H @ m - prob.b), atol=1e-10)
        np.testing.assert_allclose(uL, np.tril(K @ prob.H @ L), atol=1e-10)
    D = np.diag(prob.H).copy()
    um, uL = vc.compositional_gradient_numpy(eps, g, np.broadcast_to(D, (12, 4)), "diagonal", lam)
    np.testing.assert_allclose(um, (prob.H @ m - prob.b) / (D + lam), atol=1e-10)


def test_logistic_fisher_is_the_hessian_and_reference_is_a_minimum():
    torch = pytest.importorskip("torch")
    import logistic_regression_vi as lr
    prob = lr.Logistic(1.0)
    r = np.random.default_rng(7)
    Z = 0.2 * r.standard_normal((2, prob.d))
    g, F = prob.grads_and_fisher(Z)
    X, y = torch.tensor(prob.X), torch.tensor(prob.y)

    def nll(z):
        a = X @ z
        return torch.sum(torch.nn.functional.softplus(a) - y * a)

    for s in range(2):
        z = torch.tensor(Z[s], requires_grad=True)
        np.testing.assert_allclose(g[s], torch.autograd.grad(nll(z), z)[0].numpy(), rtol=1e-10, atol=1e-9)
        np.testing.assert_allclose(F[s], torch.autograd.functional.hessian(nll, z.detach()).numpy(),
                                   rtol=1e-10, atol=1e-9)
    m, L, best = prob.reference_optimum()
    # The quadrature -ELBO against a Monte Carlo estimate (4 standard errors).
    eps = r.standard_normal((40000, prob.d))
    vals = prob.nll_samples(m + eps @ L.T)
    kl = prob.neg_elbo(m, L) - prob.expected_nll(m, L)
    assert abs(vals.mean() + kl - best) < 4 * vals.std() / np.sqrt(len(vals))
    # Its MC gradient vanishes and perturbations only increase -ELBO.
    gm, gL = prob.mc_gradients(m, L, eps)
    assert np.abs(gm).max() < 0.05 and np.abs(gL).max() < 0.1
    for _ in range(10):
        assert prob.neg_elbo(m + 0.02 * r.standard_normal(prob.d), L) > best
        assert prob.neg_elbo(m, L * (1 + 0.02 * r.standard_normal())) > best


def _check_vi_outputs(doc, out, stem, methods):
    assert (out / f"{stem}.png").stat().st_size > 5_000
    saved = json.loads((out / f"{stem}.json").read_text())
    assert set(saved["results"]) == set(methods)
    return {(r["method"], r["S"]): r for r in saved["summary"]}


@pytest.mark.slow
def test_linear_gaussian_vi_small(target, tmp_path):
    import linear_gaussian_vi as lg
    c = _vi_client(target)
    doc = lg.run(c, steps=25, seeds=2, samples=(1, 8), n=30, d=6, grid="small", out=str(tmp_path), verbose=False)
    c.close()
    comp = next(k for k in doc["results"] if k.startswith("compositional"))
    rows = _check_vi_outputs(doc, tmp_path, "linear_gaussian_vi",
                             ["standard NG (server)", "pushforward NG (numpy)", comp, "Adam (server)"])
    start = doc["results"]["standard NG (server)"]["8"]
    for name, per_S in doc["results"].items():
        for S, e in per_S.items():
            for g in e["grid"].values():
                if g["mean_curve"] is not None:  # -ELBO >= -log p(x): the gap is never negative
                    assert min(v for v in g["mean_curve"] if v is not None) > -1e-9, (name, S)
    gap0 = next(g["mean_curve"][0] for g in start["grid"].values() if g["mean_curve"])
    for name in ("standard NG (server)", "pushforward NG (numpy)", "Adam (server)"):
        assert rows[(name, 8)]["mean@25"] < 0.5 * gap0, (name, rows[(name, 8)])


@pytest.mark.slow
def test_logistic_regression_vi_small(target, tmp_path):
    import logistic_regression_vi as lr
    c = _vi_client(target)
    doc = lr.run(c, steps=15, seeds=2, samples=(1, 8), grid="small", out=str(tmp_path), verbose=False)
    c.close()
    comp = next(k for k in doc["results"] if k.startswith("compositional"))
    rows = _check_vi_outputs(doc, tmp_path, "logistic_regression_vi",
                             ["standard NG (server)", comp, "Adam (server)"])
    gap0 = doc["results"]["standard NG (server)"]["8"]
    gap0 = next(g["mean_curve"][0] for g in gap0["grid"].values() if g["mean_curve"])
    for name, per_S in doc["results"].items():
        for S, e in per_S.items():
            for g in e["grid"].values():
                if g["mean_curve"] is not None:  # the reference is the minimum
                    assert min(v for v in g["mean_curve"] if v is not None) > -1e-6, (name, S)
    for name in ("standard NG (server)", "Adam (server)"):
        assert rows[(name, 8)]["mean@15"] < 0.5 * gap0, (name, rows[(name, 8)])


def test_vi_example_clis(target, tmp_path):
    for script, extra in (("linear_gaussian_vi.py", ["--n", "20", "--d", "4"]), ("logistic_regression_vi.py", [])):
        r = subprocess.run([sys.executable, os.path.join(EXAMPLES, script), "--target", target, "--steps", "3",
                            "--seeds", "1", "--samples", "2", "--grid", "small", "--out", str(tmp_path)] + extra,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert "steps to" in r.stdout and "Adam (server)" in r.stdout


@pytest.mark.parametrize("path", ["numpy", "server"])
def test_compositional_fixed_point_is_the_predicted_biased_one(target, path):
    """With exact expectations (whitened samples), F_z = H and lambda_z = 0,
    the compositional iteration's fixed point is where E[u] + grad KL = 0:
    m = (2H)^-1 b and S = I/2 — not the posterior (docs/variational_inference.md).
    The iteration must land there, through the server's compositional input
    or through the example's numpy reference plus the server's NG step."""
    import linear_gaussian_vi as lg
    import vi_common as vc
    if path == "server" and not vc.server_has_compositional():
        pytest.skip("this natgrad build has no GaussianStepInput.compositional")
    d = 5
    prob = lg.LinearGaussian(25, d, 0.5, 8)
    eps = _whitened(12, d, 9)
    c = _vi_client(target)
    sess = vc.gaussian_session(c, d, 0.5, likelihood_damping=0.0 if path == "server" else None)
    m, L = lg.start(d)
    for _ in range(150):
        g = prob.lik_grads(m + eps @ L.T)
        _, km, kL = vc.kl_to_isotropic_prior(m, L)
        if path == "server":
            m, L = vc.compositional_step(sess, m, L, eps, g, prob.H, "shared", km, kL)
        else:
            um, uL = vc.compositional_gradient_numpy(eps, g, prob.H, "shared", 0.0)
            m, L = vc.ng_step(sess, m, L, um + km, uL + kL)
    c.close()
    np.testing.assert_allclose(m, np.linalg.solve(2 * prob.H, prob.b), atol=1e-8)
    np.testing.assert_allclose(L @ L.T, 0.5 * np.eye(d), atol=1e-8)
    assert np.linalg.norm(m - prob.post_mean) > 0.1  # and so not the posterior


def test_compositional_server_step_matches_numpy_reference(target):
    """One server compositional step (full, diagonal and shared Fisher forms)
    equals the numpy reference gradient stepped by the server's plain NG step."""
    import vi_common as vc
    if not vc.server_has_compositional():
        pytest.skip("this natgrad build has no GaussianStepInput.compositional")
    r = np.random.default_rng(11)
    d, S, lam = 4, 6, 0.2
    m = r.standard_normal(d)
    L = np.tril(0.3 * r.standard_normal((d, d)), -1) + np.diag(r.uniform(0.5, 1.5, d))
    eps, g = r.standard_normal((S, d)), r.standard_normal((S, d))
    R = r.standard_normal((S, d, d))
    fishers = {"full": R @ np.swapaxes(R, -1, -2), "diagonal": r.uniform(0.1, 2.0, (S, d)),
               "shared": R[0] @ R[0].T}
    _, km, kL = vc.kl_to_isotropic_prior(m, L)
    c = _vi_client(target)
    for form, F in fishers.items():
        s1 = vc.gaussian_session(c, d, 0.3, likelihood_damping=lam)
        got = vc.compositional_step(s1, m, L, eps, g, F, form, km, kL)
        s2 = vc.gaussian_session(c, d, 0.3)
        um, uL = vc.compositional_gradient_numpy(eps, g, F, form, lam)
        want = vc.ng_step(s2, m, L, um + km, uL + kL)
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12, err_msg=form)
        vc.close_quietly(s1)
        vc.close_quietly(s2)
    c.close()


def test_digits_demo_through_shared_memory(server_binary, tmp_path):
    # The sidecar deployment's trainer command (deploy/k8s/sidecar): K-FAC
    # steps through /dev/shm to a server started with --shared_memory.
    r = subprocess.run([sys.executable, os.path.join(EXAMPLES, "digits_kfac.py"), "--steps", "40",
                        "--no-pipelined", "--shared-memory", "--server", server_binary,
                        "--no-progress", "--plot", ""],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [l for l in r.stdout.splitlines() if l.startswith(("natgrad K-FAC", "torch Adam"))]
    assert [l[:26].strip() for l in rows] == ["natgrad K-FAC", "torch Adam"], r.stdout
    # Trained, not just run: 40 K-FAC steps take the digits far past chance.
    assert float(rows[0][26:].split()[-6]) > 0.5, rows[0]
