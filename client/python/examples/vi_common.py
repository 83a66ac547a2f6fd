"""Shared pieces of the variational-inference examples (linear_gaussian_vi.py,
logistic_regression_vi.py): the Gaussian q = N(m, L Lᵀ) algebra, the
compositional likelihood gradient, step-size tuning over a small grid,
the printed table, the plot and the JSON record.

Every method is a function run(step_size, seed, S, steps) -> curve (the
metric after 0, ..., steps steps, length steps + 1); a run that fails (a
step the server rejects, a non-finite value) is marked diverged. The step
size of each (method, S) is the grid value with the fewest diverged seeds
and, among those, the lowest mean over the other seeds of the metric
averaged over the last quarter of the steps.
"""
import contextlib
import json
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import natgrad  # noqa: E402
from natgrad import blocks  # noqa: E402
from natgrad import gaussian as ng  # noqa: E402


# ---------------------------------------------------------------- q = N(m, LLᵀ)

def kl_to_isotropic_prior(m, L, alpha=1.0):
    """KL(N(m, LLᵀ) || N(0, I/alpha)) and its gradients w.r.t. m and L
    (lower triangular; log|L_ii| so a negative diagonal, which Adam may
    produce, is still a valid factor)."""
    d = m.shape[-1]
    diag = np.diagonal(L)
    kl = 0.5 * (alpha * np.sum(L * L) + alpha * m @ m - d - d * math.log(alpha)) - np.sum(np.log(np.abs(diag)))
    gL = np.tril(alpha * L) - np.diag(1.0 / diag)
    return kl, alpha * m, gL


def reparam_gradients(eps, lik_grads):
    """Gradients w.r.t. (m, L) of mean_s l(z_s), z_s = m + L eps_s, from
    g_s = grad l(z_s): (mean_s g_s, tril(mean_s g_s eps_sᵀ))."""
    S = eps.shape[0]
    return lik_grads.mean(0), np.tril(lik_grads.T @ eps / S)


def compositional_gradient_numpy(eps, lik_grads, fisher, form, damping):
    """Dense numpy reference of the Gaussian block's compositional gradient:
    u_s = (F_s + damping I)^-1 g_s, returned as (mean_s u_s,
    tril(mean_s u_s eps_sᵀ)) — the (m, L) gradient the block then steps on.
    form: 'full' (fisher [S, M, M]), 'diagonal' ([S, M]) or 'shared' ([M, M])."""
    S, M = eps.shape
    if form == "shared":
        u = np.linalg.solve(fisher + damping * np.eye(M), lik_grads.T).T
    elif form == "full":
        u = np.linalg.solve(fisher + damping * np.eye(M), lik_grads[..., None])[..., 0]
    elif form == "diagonal":
        u = lik_grads / (fisher + damping)
    else:
        raise ValueError(f"form must be full, diagonal or shared, got {form!r}")
    return reparam_gradients(eps, u)


class Diverged(Exception):
    pass


def is_pd(S):
    try:
        np.linalg.cholesky(S)
        return True
    except np.linalg.LinAlgError:
        return False


# ---------------------------------------------------------------- the service

@contextlib.contextmanager
def service(args):
    """A Client to --target, or to a LocalServer started for the run."""
    if args.target:
        c = natgrad.Client(args.target)
        try:
            yield c
        finally:
            c.close()
        return
    with natgrad.LocalServer(args.server, extra_args=["--worker_threads=2"]) as srv:
        c = natgrad.Client(srv.target)
        try:
            yield c
        finally:
            c.close()


def server_has_compositional():
    """Whether this natgrad build has the Gaussian block's compositional input."""
    from natgrad._pb import step_pb2
    return "compositional" in step_pb2.GaussianStepInput.DESCRIPTOR.fields_by_name


def gaussian_session(client, d, gamma, likelihood_damping=None):
    kw = {} if likelihood_damping is None else {"likelihood_damping": likelihood_damping}
    return client.create_session([blocks.gaussian("q", d, parametrization="mean_cholesky", gamma=gamma, **kw)],
                                 state_dtype="float64")


def compositional_step(sess, m, L, eps, lik_grads, fisher, form, rest_m, rest_L):
    """One server step with a compositional gradient
    (natgrad.gaussian.compositional_input): eps [S, M], grad l(z_s) [S, M],
    the likelihood Fisher in `form` ('full', 'diagonal', 'shared'), and the
    rest of the objective's (m, L) gradient (the KL). Raises Diverged when
    the server rejects the step."""
    x = ng.compositional_input(m, L, eps, lik_grads, fisher, fisher_form=form, rest_grad1=rest_m,
                               rest_grad2=rest_L, gradient_space="parametrization")
    try:
        u = sess.step({"q": x})["q"]
    except natgrad.NatgradError as e:
        raise Diverged(str(e)) from e
    return u.param1.reshape(m.shape), np.tril(u.param2.reshape(L.shape))


def adam_session(client, d, lr):
    return client.create_session([blocks.adam("m", [d], lr=lr), blocks.adam("L", [d, d], lr=lr)],
                                 state_dtype="float64")


def ng_step(sess, m, L, gm, gL):
    """One server natural-gradient step on the (m, L) gradient; raises
    Diverged when the server rejects it."""
    try:
        u = sess.step({"q": {"param1": m, "param2": L, "grad1": gm, "grad2": gL,
                             "gradient_space": "parametrization"}})["q"]
    except natgrad.NatgradError as e:
        raise Diverged(str(e)) from e
    return u.param1.reshape(m.shape), np.tril(u.param2.reshape(L.shape))


def adam_step(sess, m, L, gm, gL):
    r = sess.step({"m": {"gradient": gm, "params": m}, "L": {"gradient": np.tril(gL), "params": L}})
    return m + r["m"].reshape(m.shape), np.tril(L + r["L"].reshape(L.shape))


def close_quietly(sess):
    with contextlib.suppress(natgrad.NatgradError):
        sess.delete()


# ---------------------------------------------------------------- tuning, report

def tune(methods, grids, sample_counts, seeds, steps, log=print):
    """methods: {name: run(step_size, seed, S, steps)}; grids: {name: [step sizes]}.
    Returns {name: {S: {"grid": {step: {"curves", "score", "diverged"}}, "best": step}}}."""
    out = {}
    tail = max(1, steps // 4)
    for name, run in methods.items():
        out[name] = {}
        for S in sample_counts:
            entry = {"grid": {}}
            for lr in grids[name]:
                curves, diverged = [], 0
                for seed in seeds:
                    try:
                        c = np.asarray(run(lr, seed, S, steps), np.float64)
                        if not np.all(np.isfinite(c)):
                            raise Diverged("non-finite metric")
                    except Diverged:
                        diverged += 1
                        c = np.full(steps + 1, np.nan)
                    curves.append(c)
                curves = np.array(curves)
                ok = curves[~np.isnan(curves).any(1)]
                score = float(np.mean(ok[:, -tail:])) if len(ok) else math.inf
                entry["grid"][lr] = {"curves": curves, "score": score, "diverged": diverged}
            # Fewest diverged seeds first, then the lowest score.
            ranked = sorted((e["diverged"], e["score"], lr) for lr, e in entry["grid"].items()
                            if math.isfinite(e["score"]))
            entry["best"] = ranked[0][2] if ranked else None
            out[name][S] = entry
            if log:
                b = entry["best"]
                log(f"  {name:<28s} S={S:<3d} best step {fmt_step(b)}  score "
                    f"{entry['grid'][b]['score'] if b is not None else math.inf:.4g}")
    return out


def fmt_step(x):
    """A grid point: a step size, or (gamma, lambda_z) for the compositional method."""
    if isinstance(x, tuple):
        return "/".join(f"{v:g}" for v in x)
    return "None" if x is None else f"{x:g}"


def steps_to(curve, level):
    hit = np.nonzero(curve <= level)[0]
    return int(hit[0]) if hit.size else None


def summary_rows(results, checkpoints, level=None):
    """One row per (method, S) at its best step size: mean (std) of the metric
    over seeds after each checkpoint step, and the first step the seed-mean
    curve is at or below `level`."""
    rows = []
    for name, per_S in results.items():
        for S, e in per_S.items():
            b = e["best"]
            row = {"method": name, "S": S, "step_size": fmt_step(b)}
            if b is None:
                row.update({"diverged": True})
                rows.append(row)
                continue
            c = e["grid"][b]["curves"]
            row["diverged_seeds"] = e["grid"][b]["diverged"]
            c = c[~np.isnan(c).any(1)]
            for t in checkpoints:
                t = min(t, c.shape[1] - 1)
                row[f"mean@{t}"] = float(np.mean(c[:, t]))
                row[f"std@{t}"] = float(np.std(c[:, t]))
            if level is not None:
                row["steps_to_level"] = steps_to(np.mean(c, 0), level)
            rows.append(row)
    return rows


def print_table(rows, checkpoints, metric, level=None):
    """checkpoints: steps present in every row (summary_rows' checkpoints
    clipped to the run's length)."""
    head = f"{'method':<28s} {'S':>3s} {'step':>9s}" + "".join(f" {metric + '@' + str(t):>21s}" for t in checkpoints)
    if level is not None:
        head += f" {'steps to ' + format(level, 'g'):>13s}"
    print(head)
    for r in rows:
        line = f"{r['method']:<28s} {r['S']:>3d} {r['step_size']:>9s}"
        if r.get("diverged"):
            print(line + "  diverged at every step size")
            continue
        for t in checkpoints:
            line += f" {r[f'mean@{t}']:>12.4g} ±{r[f'std@{t}']:<7.2g}"
        if level is not None:
            s = r.get("steps_to_level")
            line += f" {('>' + str(max(checkpoints))) if s is None else s:>13}"
        if r.get("diverged_seeds"):
            line += f"  ({r['diverged_seeds']} seed(s) diverged)"
        print(line)


def plot(results, path, ylabel, title, logy=True, shift=0.0):
    """One panel per S: the seed mean (line) and min-max (band) of the metric
    at each method's best step size. shift is added before a log scale."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    Ss = sorted({S for per_S in results.values() for S in per_S})
    fig, axes = plt.subplots(1, len(Ss), figsize=(4.2 * len(Ss), 3.4), squeeze=False, sharey=True)
    for ax, S in zip(axes[0], Ss):
        for name, per_S in results.items():
            e = per_S.get(S)
            if e is None or e["best"] is None:
                continue
            c = e["grid"][e["best"]]["curves"]
            c = c[~np.isnan(c).any(1)] + shift
            x = np.arange(c.shape[1])
            line, = ax.plot(x, c.mean(0), label=f"{name} ({fmt_step(e['best'])})", lw=1.4)
            ax.fill_between(x, c.min(0), c.max(0), color=line.get_color(), alpha=0.2, lw=0)
        ax.set_title(f"S = {S}")
        ax.set_xlabel("step")
        if logy:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel(ylabel)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    try:  # a 64-colour palette keeps the committed plots (docs/img) small
        from PIL import Image
        Image.open(path).convert("RGB").quantize(colors=64).save(path, optimize=True)
    except ImportError:
        pass


def to_json(results, rows, config, path):
    def enc(e):
        return {"best_step_size": fmt_step(e["best"]),
                "grid": {fmt_step(lr): {"score": g["score"] if math.isfinite(g["score"]) else None,
                                   "diverged_seeds": g["diverged"],
                                   "mean_curve": [None if not math.isfinite(v) else v
                                                  for v in np.nanmean(g["curves"], 0).tolist()]
                                   if g["diverged"] < len(g["curves"]) else None}
                         for lr, g in e["grid"].items()}}
    doc = {"config": config, "summary": rows,
           "results": {name: {str(S): enc(e) for S, e in per_S.items()} for name, per_S in results.items()}}
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    return doc


def common_args(ap, steps, seeds, samples):
    ap.add_argument("--target", help="natgrad-server host:port (default: start one)")
    ap.add_argument("--server", help="natgrad-server binary (default: $NATGRAD_SERVER or build/server/natgrad-server)")
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--seeds", type=int, default=seeds, help="number of seeds (0, 1, ...)")
    ap.add_argument("--samples", type=int, nargs="+", default=samples, help="Monte Carlo sample counts S")
    ap.add_argument("--out", default=".", help="directory for the PNG and JSON")
    ap.add_argument("--quiet", action="store_true")
