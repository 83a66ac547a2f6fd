#!/usr/bin/env python3
"""Training comparison: torch Adam vs natgrad's K-FAC, EKFAC, Shampoo and SOAP
(all four run on natgrad-server) on three small tasks, several seeds.

    .venv/bin/python bench/training/compare.py --size full --out out/training
    .venv/bin/python bench/training/compare.py --size small --tasks mlp --methods adam,kfac

Tasks (bench/training/README.md has the details):
  mlp          digits (sklearn's bundled 8x8 images), 64-128-10 ReLU MLP
  cnn          digits, conv3x3(1->16) - conv3x3/2(16->32) - linear(512->10)
  transformer  synthetic "histogram" task: for every position of a random
               token sequence predict how often its token occurs in the
               sequence; 2-layer pre-LN encoder with hand-written attention
               made of nn.Linear projections (so K-FAC covers q, k, v, o)

Each method is tuned over a small grid on seed 0 (best by final train loss);
the best configuration then runs on the remaining seeds. Per run: the full
train-set loss (and held-out loss/accuracy) every --eval-every steps, the
training wall time (evaluation excluded), steps and wall time to the task's
target loss. The target is the median (over seeds) full train loss of the
tuned Adam at 60% of the run. A method whose optimizer class or server block
kind is missing is reported as "not available" instead of failing the run.

Writes to --out: results.json (everything), table.md (the summary table, also
printed) and training_comparison.png (loss vs step and vs wall time).
"""
import argparse
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
import traceback

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.normpath(os.path.join(_HERE, "..", ".."))
sys.path.insert(0, os.path.join(_REPO, "client", "python"))
import natgrad  # noqa: E402
import natgrad.torch  # noqa: E402

TARGET_FRACTION = 0.6  # target loss = tuned Adam's median train loss at this fraction of the run


# --------------------------------------------------------------------------- data

def digits_data():
    """sklearn's bundled digits, scaled to [0, 1]; one fixed stratified 75/25 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)
    return (torch.from_numpy(Xtr), torch.from_numpy(ytr).long(),
            torch.from_numpy(Xte), torch.from_numpy(yte).long())


SEQ_VOCAB, SEQ_LEN = 8, 12


def histogram_data(n_train=2048, n_test=512, seed=1234):
    """Random token sequences (uniform over SEQ_VOCAB, length SEQ_LEN), drawn
    with a fixed seed; the label at each position is (number of occurrences of
    that position's token in the sequence) - 1, a class in [0, SEQ_LEN)."""
    g = np.random.default_rng(seed)
    X = g.integers(0, SEQ_VOCAB, size=(n_train + n_test, SEQ_LEN))
    counts = (X[:, :, None] == X[:, None, :]).sum(-1) - 1
    X, y = torch.from_numpy(X).long(), torch.from_numpy(counts).long()
    return X[:n_train], y[:n_train], X[n_train:], y[n_train:]


# --------------------------------------------------------------------------- models

class Attention(nn.Module):
    """Multi-head self-attention from nn.Linear projections. Unlike
    nn.MultiheadAttention (whose forward uses the weights directly), every
    projection's forward hook fires, so K-FAC/EKFAC get blocks for q, k, v, o."""

    def __init__(self, d, heads):
        super().__init__()
        self.h = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        B, T, D = x.shape
        split = lambda t: t.view(B, T, self.h, D // self.h).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(D // self.h), dim=-1)
        return self.o((att @ v).transpose(1, 2).reshape(B, T, D))


class EncoderLayer(nn.Module):
    def __init__(self, d, heads, d_ff):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = Attention(d, heads)
        self.ff1, self.ff2 = nn.Linear(d, d_ff), nn.Linear(d_ff, d)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.ff2(F.relu(self.ff1(self.ln2(x))))


class Encoder(nn.Module):
    def __init__(self, vocab=SEQ_VOCAB, length=SEQ_LEN, d=32, heads=4, d_ff=64, layers=2, classes=SEQ_LEN):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(0.02 * torch.randn(length, d))
        self.layers = nn.ModuleList(EncoderLayer(d, heads, d_ff) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        h = self.tok(x) + self.pos[: x.shape[1]]
        for layer in self.layers:
            h = layer(h)
        return self.head(self.ln(h))


def make_mlp():
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def make_cnn():
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 10))


def ce(logits, y):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


class Task:
    def __init__(self, name, title, data, make_model, steps, batch_size=128):
        self.name, self.title, self._data, self.make_model = name, title, data, make_model
        self.steps, self.batch_size = steps, batch_size
        self._cache = None

    def data(self):
        if self._cache is None:
            self._cache = self._data()
        return self._cache


def make_tasks(size):
    full = size == "full"
    return {
        "mlp": Task("mlp", "digits MLP 64-128-10", digits_data, make_mlp, 200 if full else 30),
        "cnn": Task("cnn", "digits CNN (2 conv3x3 + linear)", digits_data, make_cnn, 200 if full else 30),
        "transformer": Task("transformer", f"histogram task, 2-layer encoder d=32 (T={SEQ_LEN}, V={SEQ_VOCAB})",
                            histogram_data, Encoder, 300 if full else 30, batch_size=64),
    }


# --------------------------------------------------------------------------- methods

class NotAvailable(Exception):
    """The method's optimizer class or its server block kind is missing."""


def _unavailable_kind(e):
    """True when a server error says it does not know a block kind."""
    msg = str(e).lower()
    return isinstance(e, (natgrad.InvalidArgument, natgrad.Unimplemented)) and (
        "kind" in msg or "unknown" in msg or "not set" in msg or "unsupported" in msg)


class Method:
    """name: key; label: in tables/plots; grid: configurations (the first is
    the one the small size runs)."""
    remote = True

    def __init__(self, name, label, grid):
        self.name, self.label, self.grid = name, label, grid

    def available(self):
        return True, ""

    def make(self, model, target, cfg, task_ctx):
        raise NotImplementedError

    def step(self, opt, loss):
        opt.step()

    def close(self, opt):
        if hasattr(opt, "close"):
            opt.close(delete=True)  # sessions are deleted after every run


class Adam(Method):
    remote = False

    def make(self, model, target, cfg, task_ctx):
        return torch.optim.Adam(model.parameters(), lr=cfg["lr"])

    def close(self, opt):
        pass


def _torch_class(name, module):
    cls = getattr(natgrad.torch, name, None)
    if cls is not None:
        return cls
    try:
        mod = __import__(f"natgrad.{module}", fromlist=[name])
        return getattr(mod, name, None)
    except ImportError:
        return None


class KfacLike(Method):
    """natgrad.torch.KFAC / EKFAC: nn.Linear and nn.Conv2d layers are K-FAC
    (EKFAC) blocks; the rest (embeddings, LayerNorm, the positional table) go
    to the server's Adam fallback, run at the tuned Adam lr of the task."""

    def __init__(self, name, label, grid, cls_name, module):
        super().__init__(name, label, grid)
        self.cls_name, self.module = cls_name, module

    def available(self):
        if _torch_class(self.cls_name, self.module) is None:
            return False, f"natgrad.torch.{self.cls_name} is not in this checkout"
        return True, ""

    def make(self, model, target, cfg, task_ctx):
        cls = _torch_class(self.cls_name, self.module)
        return cls(model, client=target, fallback_lr=task_ctx["adam_lr"],
                   display_name=f"compare {self.name}", **cfg)

    def step(self, opt, loss):
        opt.step(loss=loss)


class DenseRemote(Method):
    """natgrad.torch.Shampoo / SOAP: every parameter is one block."""

    def __init__(self, name, label, grid, cls_name, module):
        super().__init__(name, label, grid)
        self.cls_name, self.module = cls_name, module

    def available(self):
        if _torch_class(self.cls_name, self.module) is None:
            return False, f"natgrad.torch.{self.cls_name} is not in this checkout"
        return True, ""

    def make(self, model, target, cfg, task_ctx):
        cls = _torch_class(self.cls_name, self.module)
        return cls(model, client=target, display_name=f"compare {self.name}", **cfg)


def make_methods():
    """The grids; each one's first entry is its default (--size small runs only it)."""
    # Widened after a first full run, where the best of a narrower grid sat
    # on its edge (Adam 3e-2 on digits, Shampoo 1e-3 and SOAP 3e-3 on the
    # transformer, K-FAC damping 1e-2 on the transformer and the MLP).
    kfac_grid = [dict(lr=0.1, damping=1e-3), dict(lr=0.1, damping=1e-2), dict(lr=0.1, damping=1e-1),
                 dict(lr=0.3, damping=1e-2), dict(lr=0.03, damping=1e-3)]
    # EKFAC adds its damping to the eigenvalues of the curvature itself, where
    # kfac_dense's factored Tikhonov adds about sqrt(damping) to each factor
    # (so ~sqrt(damping) times the other factor's scale to the product): the
    # same number is far less damping in EKFAC, and 1e-3 diverged on the CNN.
    ekfac_grid = [dict(lr=0.1, damping=1e-1), dict(lr=0.3, damping=1e-1), dict(lr=0.1, damping=1e-2),
                  dict(lr=0.03, damping=1e-2), dict(lr=0.1, damping=3e-1)]
    return {
        "adam": Adam("adam", "torch Adam", [dict(lr=v) for v in (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)]),
        "kfac": KfacLike("kfac", "natgrad K-FAC", kfac_grid, "KFAC", "torch"),
        "ekfac": KfacLike("ekfac", "natgrad EKFAC", ekfac_grid, "EKFAC", "torch_ekfac"),
        # Preconditioners every 10 steps (the server's default is every step):
        # the CNN's last layer has a 512 x 512 factor, whose eigh every step
        # would dominate; 10 is SOAP's default too.
        "shampoo": DenseRemote("shampoo", "natgrad Shampoo",
                               [dict(lr=v, precondition_frequency=10) for v in (1e-3, 3e-4, 3e-3, 1e-2, 3e-2)],
                               "Shampoo", "torch_shampoo"),
        # The authors' defaults (lr 3e-3, betas (0.95, 0.95), weight decay
        # 0.01, preconditioners every 10 steps) and lr around theirs.
        "soap": DenseRemote("soap", "natgrad SOAP", [dict(lr=v) for v in (3e-3, 1e-3, 1e-2, 3e-2, 1e-1)],
                            "SOAP", "torch_soap"),
    }


# --------------------------------------------------------------------------- one run

@torch.no_grad()
def evaluate(model, X, y):
    model.eval()
    out = model(X)
    model.train()
    loss = float(ce(out, y))
    acc = float((out.argmax(-1) == y).float().mean())
    return loss, acc


def run_one(task, method, cfg, seed, target, task_ctx, steps, eval_every):
    """Trains one model; returns the run record (history, finals, error)."""
    Xtr, ytr, Xte, yte = task.data()
    torch.manual_seed(seed)
    model = task.make_model()
    g = torch.Generator().manual_seed(seed)
    hist = {"step": [], "train_loss": [], "test_loss": [], "test_acc": [], "wall": []}

    def record(t, wall):
        trl, _ = evaluate(model, Xtr, ytr)
        tel, tea = evaluate(model, Xte, yte)
        for k, v in (("step", t), ("train_loss", trl), ("test_loss", tel), ("test_acc", tea), ("wall", wall)):
            hist[k].append(v)

    rec = {"seed": seed, "config": cfg, "error": None}
    try:
        opt = method.make(model, target, cfg, task_ctx)
    except Exception as e:  # noqa: BLE001
        if _unavailable_kind(e):
            raise NotAvailable(f"the server refused the session: {e}") from None
        raise
    step_times = []
    wall = 0.0
    record(0, 0.0)
    perm, pos = torch.randperm(len(Xtr), generator=g), 0
    try:
        for t in range(1, steps + 1):
            if pos + task.batch_size > len(Xtr):
                perm, pos = torch.randperm(len(Xtr), generator=g), 0
            idx = perm[pos:pos + task.batch_size]
            pos += task.batch_size
            t0 = time.perf_counter()
            opt.zero_grad()
            loss = ce(model(Xtr[idx]), ytr[idx])
            loss.backward()
            method.step(opt, loss)
            dt = time.perf_counter() - t0
            wall += dt
            step_times.append(dt)
            if not math.isfinite(float(loss)):
                raise FloatingPointError(f"non-finite minibatch loss at step {t}")
            if t % eval_every == 0 or t == steps:
                record(t, wall)
                if not math.isfinite(hist["train_loss"][-1]):
                    raise FloatingPointError(f"non-finite train loss at step {t}")
    except (natgrad.NatgradError, FloatingPointError) as e:
        # Divergence (or the server refusing a step that would be non-finite):
        # the run counts with an infinite final loss.
        rec["error"] = f"{type(e).__name__}: {e}"
    finally:
        method.close(opt)
    fin = rec["error"] is None
    rec.update(hist=hist, wall=wall,
               ms_per_step=1e3 * float(np.median(step_times)) if step_times else None,
               final_train_loss=hist["train_loss"][-1] if fin else math.inf,
               final_test_loss=hist["test_loss"][-1] if fin else math.inf,
               final_test_acc=hist["test_acc"][-1] if fin else 0.0)
    return rec


# --------------------------------------------------------------------------- analysis

def time_to_target(rec, target_loss):
    h = rec["hist"]
    for s, l, w in zip(h["step"], h["train_loss"], h["wall"]):
        if l <= target_loss:
            return s, w
    return None, None


def loss_at(rec, step):
    h = rec["hist"]
    i = int(np.argmin([abs(s - step) for s in h["step"]]))
    return h["train_loss"][i]


def summarize(results):
    """Adds the target loss to each task and steps/time to target to each run."""
    for tname, tr in results["tasks"].items():
        adam = tr["methods"].get("adam", {})
        runs = [r for r in adam.get("runs", []) if r["error"] is None]
        if runs:
            at = round(TARGET_FRACTION * tr["steps"])
            tr["target_loss"] = float(np.median([loss_at(r, at) for r in runs]))
            tr["target_rule"] = (f"median over seeds of tuned Adam's full train loss at step {at} "
                                 f"({TARGET_FRACTION:.0%} of {tr['steps']})")
        else:
            # Without Adam: the initial loss halved (so the smoke test still has a target).
            any_run = next((r for m in tr["methods"].values() for r in m.get("runs", [])), None)
            tr["target_loss"] = 0.5 * any_run["hist"]["train_loss"][0] if any_run else None
            tr["target_rule"] = "half the initial loss (no Adam runs)"
        for m in tr["methods"].values():
            for r in m.get("runs", []):
                s, w = time_to_target(r, tr["target_loss"]) if tr["target_loss"] is not None else (None, None)
                r["steps_to_target"], r["wall_to_target"] = s, w


def _med_range(vals, fmt):
    vals = [v for v in vals if v is not None]
    if not vals:
        return "-"
    fin = [v for v in vals if math.isfinite(v)]
    if len(fin) < len(vals):
        med = float(np.median(vals))
        if not math.isfinite(med):
            return f"diverged ({len(vals) - len(fin)}/{len(vals)})"
    med = float(np.median(vals))
    if len(vals) == 1:
        return fmt.format(med)
    return f"{fmt.format(med)} [{fmt.format(min(vals))}, {fmt.format(max(vals))}]"


def _to_target(vals, fmt):
    """Median [min, max] of steps/time to target; a run that never reached it
    counts as +inf (shown as "-" when it is the max or the median)."""
    n, hit = len(vals), [v for v in vals if v is not None]
    if not hit:
        return f"not reached (0/{n})"
    full = sorted(hit) + [math.inf] * (n - len(hit))
    show = lambda v: fmt.format(v) if math.isfinite(v) else "-"  # noqa: E731
    med = float(np.median(full))
    txt = show(med) if n == 1 else f"{show(med)} [{show(full[0])}, {show(full[-1])}]"
    return txt + (f" ({len(hit)}/{n} reached)" if len(hit) < n else "")


def _cfg_str(cfg):
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in cfg.items())


def table(results):
    lines = []
    for tname, tr in results["tasks"].items():
        lines.append(f"### {tname}: {tr['title']}")
        lines.append("")
        lines.append(f"{tr['steps']} steps, batch {tr['batch_size']}, seeds {tr['seeds']}; target train loss "
                     f"{tr['target_loss']:.3g} ({tr['target_rule']}). Median over seeds [min, max].")
        lines.append("")
        lines.append("| method | config (best of grid on seed 0) | steps to target | time to target (s) "
                     "| final train loss | final held-out loss | held-out acc | ms/step |")
        lines.append("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for mname, m in tr["methods"].items():
            if not m["available"]:
                lines.append(f"| {m['label']} | not available: {m['reason']} | | | | | | |")
                continue
            runs = m["runs"]
            n = len(runs)
            st = _to_target([r["steps_to_target"] for r in runs], "{:.0f}")
            wt = _to_target([r["wall_to_target"] for r in runs], "{:.2f}")
            err = [r for r in runs if r["error"]]
            ftl = _med_range([r["final_train_loss"] for r in runs], "{:.3g}")
            if err:
                ftl += f" ({len(err)}/{n} failed)"
            lines.append(f"| {m['label']} | {_cfg_str(m['best_config'])} | {st} | {wt} | {ftl} | "
                         f"{_med_range([r['final_test_loss'] for r in runs], '{:.3g}')} | "
                         f"{_med_range([r['final_test_acc'] for r in runs], '{:.3f}')} | "
                         f"{_med_range([r['ms_per_step'] for r in runs], '{:.1f}')} |")
        lines.append("")
        grids = [(m["label"], m["grid"]) for m in tr["methods"].values() if m["available"] and len(m["grid"]) > 1]
        if grids:
            lines.append("Grid (seed 0, final train loss): " + "; ".join(
                f"{label}: " + ", ".join(f"{_cfg_str(g['config'])} → "
                                         + (f"{g['final_train_loss']:.3g}" if math.isfinite(g["final_train_loss"])
                                            else "diverged") for g in grid)
                for label, grid in grids))
            lines.append("")
    return "\n".join(lines)


def plot(results, path, dpi=80):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tasks = list(results["tasks"].items())
    fig, axes = plt.subplots(len(tasks), 2, figsize=(10, 3.1 * len(tasks)), squeeze=False)
    for row, (tname, tr) in enumerate(tasks):
        for mname, m in tr["methods"].items():
            runs = [r for r in m.get("runs", []) if r["error"] is None]
            if not runs:
                continue
            n = min(len(r["hist"]["step"]) for r in runs)
            steps = runs[0]["hist"]["step"][:n]
            loss = np.median([r["hist"]["train_loss"][:n] for r in runs], axis=0)
            wall = np.median([r["hist"]["wall"][:n] for r in runs], axis=0)
            axes[row, 0].plot(steps, loss, label=m["label"])
            axes[row, 1].plot(wall, loss, label=m["label"])
        for ax, xl in zip(axes[row], ("step", "training wall time (s)")):
            if tr.get("target_loss"):
                ax.axhline(tr["target_loss"], color="gray", lw=0.8, ls=":")
            ax.set_yscale("log")
            ax.set_xlabel(xl)
            ax.set_ylabel("train loss (full set)")
            ax.set_title(f"{tname}: {tr['title']}", fontsize=9)
        axes[row, 0].legend(fontsize=7)
    fig.suptitle(f"median over seeds {results['meta']['seeds']}; dotted: target loss", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    try:  # a 64-colour palette keeps the PNG small (line plots lose nothing visible)
        from PIL import Image
        with Image.open(path) as im:
            small = im.convert("RGB").quantize(colors=64)
        small.save(path, optimize=True)
    except ImportError:
        pass


# --------------------------------------------------------------------------- driver

def run_all(args, target):
    client = natgrad.Client(target)  # one channel for all runs; each run has its own session
    try:
        return _run_all(args, client)
    finally:
        client.close()


def _run_all(args, target):
    tasks = make_tasks(args.size)
    methods = make_methods()
    seeds = list(range(args.seeds))
    results = {"meta": {
        "size": args.size, "seeds": seeds, "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
        "cpus": os.cpu_count(), "git_commit": _git_commit(), "target_fraction": TARGET_FRACTION,
        "eval_every": args.eval_every, "argv": sys.argv[1:],
        "loadavg_start": list(os.getloadavg())}, "tasks": {}}
    for tname in args.tasks:
        task = tasks[tname]
        steps = args.steps or task.steps
        tr = results["tasks"][tname] = {"title": task.title, "steps": steps, "batch_size": task.batch_size,
                                         "seeds": seeds, "methods": {}}
        task_ctx = {"adam_lr": 1e-3}
        # Adam first: its tuned lr is K-FAC's / EKFAC's fallback lr and its
        # curve defines the target loss.
        for mname in sorted(args.methods, key=lambda n: n != "adam"):
            method = methods[mname]
            m = tr["methods"][mname] = {"label": method.label, "available": True, "reason": "",
                                        "grid": [], "runs": []}
            ok, why = method.available()
            if not ok:
                m.update(available=False, reason=why)
                print(f"[{tname}] {method.label}: not available ({why})", flush=True)
                continue
            grid = method.grid if args.size == "full" and not args.no_grid else method.grid[:1]
            try:
                best, best_rec = None, None
                for cfg in grid:
                    r = run_one(task, method, cfg, seeds[0], target, task_ctx, steps, args.eval_every)
                    m["grid"].append({"config": cfg, "final_train_loss": r["final_train_loss"],
                                      "error": r["error"]})
                    _log(tname, method, r)
                    if best_rec is None or r["final_train_loss"] < best_rec["final_train_loss"]:
                        best, best_rec = cfg, r
                m["best_config"] = best
                m["runs"].append(best_rec)
                for s in seeds[1:]:
                    r = run_one(task, method, best, s, target, task_ctx, steps, args.eval_every)
                    _log(tname, method, r)
                    m["runs"].append(r)
            except NotAvailable as e:
                m.update(available=False, reason=str(e), grid=[], runs=[])
                print(f"[{tname}] {method.label}: not available ({e})", flush=True)
                continue
            if mname == "adam":
                task_ctx["adam_lr"] = best["lr"]
    summarize(results)
    results["meta"]["loadavg_end"] = list(os.getloadavg())
    return results


def _log(tname, method, r):
    print(f"[{tname}] {method.label:<16} seed {r['seed']} {_cfg_str(r['config']):<24} "
          f"final train {r['final_train_loss']:.3g} held-out {r['final_test_loss']:.3g} "
          f"{r['wall']:.1f} s ({r['ms_per_step']:.1f} ms/step)" + (f"  {r['error']}" if r["error"] else ""),
          flush=True)


def _git_commit():
    try:
        return subprocess.run(["git", "-C", _REPO, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(type(o))


def _finite_or_str(x):
    """JSON has no inf/nan: write them as strings."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _finite_or_str(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite_or_str(v) for v in x]
    return x


def _from_json(x):
    """Inverse of _finite_or_str for the numbers (no config or message is "inf"/"nan")."""
    if isinstance(x, str) and x in ("inf", "-inf", "nan"):
        return float(x)
    if isinstance(x, dict):
        return {k: _from_json(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_from_json(v) for v in x]
    return x


def main(argv=None):
    tasks, methods = list(make_tasks("small")), list(make_methods())
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default=",".join(tasks), help=f"comma-separated, of {tasks}")
    ap.add_argument("--methods", default=",".join(methods), help=f"comma-separated, of {methods}")
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds (default: full 3, small 1)")
    ap.add_argument("--steps", type=int, default=None, help="steps per run (default: per task and size)")
    ap.add_argument("--size", choices=["small", "full"], default="small",
                    help="small: few steps, one seed, default configs only; full: the comparison")
    ap.add_argument("--no-grid", action="store_true", help="run only each method's default config")
    ap.add_argument("--eval-every", type=int, default=None, help="default: 10 (full), 5 (small)")
    ap.add_argument("--out", default=os.path.join(_REPO, "out", "training"), help="output directory")
    ap.add_argument("--target", help="a running natgrad-server host:port (default: start one)")
    ap.add_argument("--server", help="natgrad-server binary")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--plot-dpi", type=int, default=80)
    ap.add_argument("--replot", metavar="RESULTS_JSON",
                    help="only rewrite the table and the plot in --out from an earlier results.json")
    args = ap.parse_args(argv)
    args.tasks = [t for t in args.tasks.split(",") if t]
    args.methods = [m for m in args.methods.split(",") if m]
    for t in args.tasks:
        if t not in tasks:
            ap.error(f"unknown task {t!r} (have {tasks})")
    for m in args.methods:
        if m not in methods:
            ap.error(f"unknown method {m!r} (have {methods})")
    if args.replot:
        with open(args.replot) as f:
            results = _from_json(json.load(f))
        os.makedirs(args.out, exist_ok=True)
        _write(results, args)
        return 0
    if args.seeds is None:
        args.seeds = 3 if args.size == "full" else 1
    if args.eval_every is None:
        args.eval_every = 10 if args.size == "full" else 5
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    # SIGTERM unwinds like Ctrl-C, so the LocalServer context stops its server.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t0 = time.perf_counter()
    if args.target:
        results = run_all(args, args.target)
    else:
        with natgrad.LocalServer(args.server) as srv:
            print(f"natgrad-server {srv.binary} on {srv.target}", flush=True)
            try:
                results = run_all(args, srv.target)
            except BaseException:
                print(f"natgrad-server log (tail):\n{srv.log_tail()}", file=sys.stderr, flush=True)
                raise
            results["meta"]["server"] = srv.binary
    results["meta"]["total_s"] = time.perf_counter() - t0
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(_finite_or_str(results), f, indent=1, default=_json_default)
    _write(results, args)
    return 0


def _write(results, args):
    txt = table(results)
    print()
    print(txt)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(txt + "\n")
    png = os.path.join(args.out, "training_comparison.png")
    plot(results, png, dpi=args.plot_dpi)
    print(f"wrote {args.out}: results.json, table.md, training_comparison.png "
          f"({results['meta']['total_s']:.0f} s of runs)")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        traceback.print_exc()
        sys.exit(130)
