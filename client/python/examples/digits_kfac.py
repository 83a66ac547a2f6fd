#!/usr/bin/env python3
"""Train a small network on scikit-learn's bundled digits (8x8 images, 10
classes) with K-FAC running on natgrad-server, synchronous and pipelined
(natgrad.torch.KFAC(pipelined=True): each step's update is applied one step
late, so the round trip overlaps the next forward/backward), and the same
network with torch.optim.Adam as the baseline. Prints steps and wall time to
a target test accuracy, the final accuracy and the wall time per step, and
writes a plot of loss and accuracy.

    .venv/bin/python client/python/examples/digits_kfac.py            # starts a server
    .venv/bin/python client/python/examples/digits_kfac.py --quick    # < 1 minute
    .venv/bin/python client/python/examples/digits_kfac.py --target localhost:50051 --model cnn

Without --target it starts natgrad-server (--server, $NATGRAD_SERVER or
build/server/natgrad-server) on 127.0.0.1 with port 0, a --port_file and a
temporary --checkpoint_dir, and stops it at the end.
"""
import argparse
import copy
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import natgrad  # noqa: E402
import natgrad.torch  # noqa: E402

DEFAULT_PLOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                             "..", "..", "..", "out", "digits_kfac.png"))


def load_data(seed=0):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.25, random_state=seed, stratify=y)
    return (torch.from_numpy(Xtr), torch.from_numpy(ytr).long(),
            torch.from_numpy(Xte), torch.from_numpy(yte).long())


def make_model(kind, seed=0):
    torch.manual_seed(seed)
    if kind == "mlp":
        return nn.Sequential(
            nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(),
            nn.Linear(128, 64), nn.ReLU(),
            nn.Linear(64, 10))
    if kind == "cnn":
        return nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)),
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Flatten(), nn.Linear(32 * 4 * 4, 10))
    raise ValueError(kind)


@torch.no_grad()
def evaluate(model, X, y):
    model.eval()
    out = model(X)
    model.train()
    return float(F.cross_entropy(out, y)), float((out.argmax(1) == y).float().mean())


def train(name, model, opt, data, steps, batch_size, eval_every, target_acc, seed, is_natgrad,
          sampled_fisher=False, progress=True, scheduler=None):
    """Trains and evaluates every eval_every steps. Pipelined K-FAC is
    evaluated as it trains (the last step's update still in flight), and
    flushed before the final evaluation; the flush counts as training time."""
    from tqdm import tqdm
    Xtr, ytr, Xte, yte = data
    g = torch.Generator().manual_seed(seed)
    hist = {"step": [], "train_loss": [], "test_loss": [], "test_acc": [], "time": []}
    hit = None
    perm, pos = torch.randperm(len(Xtr), generator=g), 0
    wall = 0.0
    smooth = None
    bar = tqdm(range(1, steps + 1), desc=f"{name:<16}", disable=not progress, leave=True,
               dynamic_ncols=True, file=sys.stdout)
    for t in bar:
        if pos + batch_size > len(Xtr):
            perm, pos = torch.randperm(len(Xtr), generator=g), 0
        idx = perm[pos:pos + batch_size]
        pos += batch_size
        t0 = time.perf_counter()
        opt.zero_grad()
        logits = model(Xtr[idx])
        loss = F.cross_entropy(logits, ytr[idx])
        if sampled_fisher:
            opt.sample_fisher(logits)
        loss.backward()
        if is_natgrad:
            opt.step(loss=loss)
        else:
            opt.step()
            if scheduler is not None:
                scheduler.step()
        wall += time.perf_counter() - t0
        lv = float(loss)
        smooth = lv if smooth is None else 0.9 * smooth + 0.1 * lv
        if t == steps and is_natgrad:
            t0 = time.perf_counter()
            opt.flush()  # pipelined: the last step's update
            wall += time.perf_counter() - t0
        if t % eval_every == 0 or t == steps:
            tl, ta = evaluate(model, Xte, yte)
            for k, v in (("step", t), ("train_loss", smooth), ("test_loss", tl), ("test_acc", ta), ("time", wall)):
                hist[k].append(v)
            if hit is None and ta >= target_acc:
                hit = (t, wall)
            bar.set_postfix(loss=f"{smooth:.3f}", test_acc=f"{ta:.3f}")
    bar.close()
    return {"name": name, "hist": hist, "hit": hit, "final_acc": hist["test_acc"][-1],
            "final_loss": hist["test_loss"][-1], "wall": wall, "steps": steps}


def print_table(runs, target_acc):
    head = (f"{'optimizer':<26}{'steps to ' + format(target_acc, '.0%'):>14}{'time to ' + format(target_acc, '.0%'):>14}"
            f"{'final test acc':>16}{'final test loss':>17}{'steps':>7}{'train time':>12}{'ms/step':>9}")
    print()
    print(head)
    print("-" * len(head))
    for r in runs:
        s = f"{r['hit'][0]}" if r["hit"] else "not reached"
        w = f"{r['hit'][1]:.2f} s" if r["hit"] else "-"
        print(f"{r['name']:<26}{s:>14}{w:>14}{r['final_acc']:>16.4f}{r['final_loss']:>17.4f}"
              f"{r['steps']:>7}{r['wall']:>10.2f} s{1e3 * r['wall'] / r['steps']:>9.2f}")
    adam = next((r for r in runs if r["name"] == "torch Adam"), None)
    if adam is not None:
        per = {r["name"]: r["wall"] / r["steps"] for r in runs}
        print("wall time per step (zero_grad, forward, backward, optimizer step), relative to Adam: "
              + ", ".join(f"{n} {v / per[adam['name']]:.2f}x" for n, v in per.items() if n != adam["name"]))
    print()


def plot(runs, path, target_acc):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for r in runs:
        h = r["hist"]
        ax[0].plot(h["step"], h["train_loss"], label=f"{r['name']} (train, smoothed)")
        ax[0].plot(h["step"], h["test_loss"], "--", label=f"{r['name']} (test)")
        ax[1].plot(h["step"], h["test_acc"], label=r["name"])
    ax[0].set_yscale("log")
    ax[0].set_xlabel("step")
    ax[0].set_ylabel("cross-entropy")
    ax[0].legend(fontsize=8)
    ax[1].axhline(target_acc, color="gray", lw=0.8, ls=":")
    ax[1].set_xlabel("step")
    ax[1].set_ylabel("test accuracy")
    ax[1].set_ylim(0.5, 1.0)
    ax[1].legend(fontsize=8)
    fig.suptitle("digits: natgrad K-FAC (synchronous, pipelined) vs torch Adam")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(target, args):
    data = load_data(args.seed)
    base = make_model(args.model, args.seed)
    runs = []
    # Learning rates: constant, or cosine decay to 5% over the run (the same
    # shape for both optimizers; a natgrad schedule on the server, a torch
    # LambdaLR for Adam).
    lr = (natgrad.schedules.cosine_decay(args.lr, args.steps, alpha=0.05) if args.cosine else args.lr)
    modes = [("natgrad K-FAC", False)] + ([("natgrad K-FAC pipelined", True)] if args.pipelined else [])
    for name, pipelined in modes:
        kfac_model = copy.deepcopy(base)
        opt = natgrad.torch.KFAC(
            kfac_model, target=target, lr=lr, damping=args.damping, momentum=args.momentum,
            weight_decay=args.weight_decay,
            kl_clip=args.kl_clip, inverse_period=args.inverse_period, fisher=args.fisher,
            fallback_lr=args.adam_lr, display_name=f"digits {args.model}", pipelined=pipelined,
            stream=args.stream, shared_memory=args.shared_memory)
        try:
            runs.append(train(name, kfac_model, opt, data, args.steps, args.batch_size,
                              args.eval_every, args.target_acc, args.seed, True,
                              sampled_fisher=args.fisher == "sampled", progress=not args.no_progress))
        finally:
            opt.close(delete=True)
    adam_model = copy.deepcopy(base)
    adam = torch.optim.Adam(adam_model.parameters(), lr=args.adam_lr)
    sched = None
    if args.cosine:
        sched = torch.optim.lr_scheduler.LambdaLR(adam, lambda t: natgrad.schedules.evaluate(
            natgrad.schedules.cosine_decay(1.0, args.steps, alpha=0.05), t + 1))
    runs.append(train("torch Adam", adam_model, adam, data, args.steps, args.batch_size,
                      args.eval_every, args.target_acc, args.seed, False, progress=not args.no_progress,
                      scheduler=sched))
    print_table(runs, args.target_acc)
    if args.plot:
        plot(runs, args.plot, args.target_acc)
        print(f"plot: {args.plot}")
    return runs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", help="natgrad-server host:port (default: start one)")
    ap.add_argument("--server", help="natgrad-server binary")
    ap.add_argument("--model", choices=["mlp", "cnn"], default="mlp")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--quick", action="store_true", help="250 steps per optimizer (well under a minute)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--target-acc", type=float, default=0.95)
    ap.add_argument("--lr", type=float, default=0.1, help="K-FAC learning rate")
    ap.add_argument("--damping", type=float, default=3e-2)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--kl-clip", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=1e-3, help="K-FAC weight decay")
    ap.add_argument("--cosine", action=argparse.BooleanOptionalAction, default=True,
                    help="cosine learning-rate decay for both optimizers (default on)")
    ap.add_argument("--inverse-period", type=int, default=None)
    ap.add_argument("--fisher", choices=["empirical", "sampled"], default="empirical")
    ap.add_argument("--pipelined", action=argparse.BooleanOptionalAction, default=True,
                    help="also run K-FAC pipelined (updates one step stale; default on)")
    ap.add_argument("--stream", action=argparse.BooleanOptionalAction, default=False,
                    help="K-FAC sends each layer's block as backward produces it")
    ap.add_argument("--shared-memory", action=argparse.BooleanOptionalAction, default=False,
                    help="K-FAC steps' tensors through /dev/shm (a server on this host with "
                         "--shared_memory; docs/shared_memory.md)")
    ap.add_argument("--adam-lr", type=float, default=1e-3, help="baseline Adam (and K-FAC fallback) lr")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", default=DEFAULT_PLOT, help="PNG path ('' for none; default: out/ at the repository root)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps = min(args.steps, 250)
    torch.set_num_threads(args.threads)
    if args.target:
        run(args.target, args)
    else:
        extra = ["--shared_memory"] if args.shared_memory else []
        with natgrad.LocalServer(args.server, extra_args=extra) as srv:
            print(f"natgrad-server {srv.binary} on {srv.target}")
            run(srv.target, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
