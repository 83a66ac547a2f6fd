"""natgrad.jax.KFAC against kfac_jax.Optimizer in-process, on the MNIST autoencoder.

784-1000-500-250-30 and the mirrored decoder (sigmoid hidden units, linear
code layer, logits out), loss = per-example sum of the 784 pixels' sigmoid
cross-entropies, averaged over the batch (kfac-jax's convention for
register_sigmoid_cross_entropy_loss), batch 1000, float32. In one run, on the
same model, initial parameters and batches, the full training step is timed
for

  kfac_jax       kfac_jax.Optimizer's own jitted step (in-process K-FAC)
  natgrad        natgrad.jax.KFAC, synchronous: forward + backward + layer
                 statistics jitted here, the step a round trip to a
                 natgrad-server this script starts
  natgrad_pipe   natgrad.jax.KFAC(pipelined=True): step t's round trip runs
                 while forward/backward of t+1 run; updates one step stale
  adam           optax.adam, jitted, for scale
  natgrad_shm, natgrad_pipe_shm
                 the same with shared_memory=True: the step's tensors go
                 through POSIX shared memory instead of the gRPC messages
                 (the server started here then gets --shared_memory;
                 docs/shared_memory.md)

The K-FAC settings are the same on both sides (natgrad's defaults, with the
issue's inverse period): learning rate 0.1, momentum 0.9 (kfac-jax: fixed
learning-rate and momentum schedules, delta = -lr * V + mu * delta_prev, which
is natgrad's m = mu m + V, delta = -lr m), damping 1e-3 as factored Tikhonov
with the pi correction (kfac-jax's default pi-adjusted inverses; fixed
damping schedule, no adaptive damping), KL clip 1e-3 (kfac-jax's
norm_constraint is the same rule: scale the update so lr^2 <V, grad> <= c),
factor EMA decay 0.95 (kfac-jax's curvature_ema), inverses at the first step
and every 10 steps (kfac-jax's inverse_update_period; no burn-in steps), and
the same curvature on both sides (--fisher): "empirical" (default) gives
natgrad the output gradients of the loss on the data and runs kfac-jax's
"fisher_empirical", whose statistics carry an extra 1/n, compensated exactly
by dividing its learning rate, damping and norm constraint by n
(kfac_jax_settings); "sampled" is the true Fisher on both (kfac-jax
"fisher_gradients", natgrad's client a second backward pass on sampled
targets). Each side does what it does to get there: kfac-jax runs its own
curvature estimation pass; natgrad's client reduces the factors jitted (or
sends rows, --reduce false) and the server does the rest. The "1st upd"
column shows the first updates agree.

Each kind runs --reps times (fresh parameters, optimizer and session; --warmup
untimed steps, which compile and include the first decomposition, then
--steps timed steps, a multiple of the inverse period so every rep has the
same share of decomposition steps); a rep's figure is its mean step time over
the timed window (the pipelined run's final flush included), the table the
median over reps. The loss column is the mean loss on a held-out batch after
all warmup + steps updates (median over reps; every rep sees the same
batches), so a reader can see the four optimise the same problem and what the
pipelined mode's one-step-stale updates cost in convergence.

The images are synthetic (no dataset download here), made as
bench/e2e/torch_ae_bench.py makes them: MNIST-shaped, about 19% of pixels on,
values in [0, 1].

Needs bench/jax/setup-venv's .venv-kfacjax (kfac-jax from PyPI); the model
and data builders need jax only (client/python/tests/test_jax_bench_driver.py
imports them from the main .venv):

  bench/jax/setup-venv
  .venv-kfacjax/bin/python bench/jax/kfac_jax_compare.py [--server build/server/natgrad-server]
"""
import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))
if os.path.isdir(os.path.join(ROOT, "client", "python", "natgrad")):
    # natgrad from the source tree (the venv has no natgrad installed, see setup-venv).
    sys.path.insert(0, os.path.join(ROOT, "client", "python"))

import numpy as np  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

WIDTHS = (784, 1000, 500, 250, 30, 250, 500, 1000, 784)
KINDS = ("kfac_jax", "natgrad", "natgrad_pipe", "adam")


def layer_names(widths=WIDTHS):
    return [f"dense{i}" for i in range(len(widths) - 1)]


def linear_layers(widths=WIDTHS):
    """Indices of the layers without a sigmoid after them: the code layer
    (the narrowest) and the logits."""
    n = len(widths) - 1
    return {int(np.argmin(widths[1:-1])), n - 1}


def init_params(seed, widths=WIDTHS, dtype=np.float32):
    """{"dense<i>": {"kernel": [d_in, d_out], "bias": [d_out]}}, as torch's
    nn.Linear initialises (uniform +-1/sqrt(d_in)), from numpy's RNG."""
    r = np.random.default_rng(seed)
    out = {}
    for name, d_in, d_out in zip(layer_names(widths), widths[:-1], widths[1:]):
        bound = 1.0 / np.sqrt(d_in)
        out[name] = {"kernel": jnp.asarray(r.uniform(-bound, bound, (d_in, d_out)).astype(dtype)),
                     "bias": jnp.asarray(r.uniform(-bound, bound, (d_out,)).astype(dtype))}
    return out


def images(n, seed, d=WIDTHS[0], dtype=np.float32):
    """MNIST-shaped synthetic images: about 19% of pixels on, values in [0, 1]."""
    r = np.random.default_rng(seed)
    on = r.random((n, d)) < 0.19
    return jnp.asarray(np.where(on, r.random((n, d)), 0.0).astype(dtype))


def forward(params, x, eps=None, widths=WIDTHS, register=False):
    """Logits, plus each layer's input and pre-activation. eps: zeros added
    to the pre-activations (their gradient is the pre-activations'
    cotangent). register: kfac-jax's explicit dense-layer tags."""
    lin = linear_layers(widths)
    h, acts, pres = x, [], []
    for i, name in enumerate(layer_names(widths)):
        w, b = params[name]["kernel"], params[name]["bias"]
        acts.append(h)
        s = h @ w + b
        if register:
            import kfac_jax
            s = kfac_jax.register_dense(s, h, w, b)
        if eps is not None:
            s = s + eps[i]
        pres.append(s)
        h = s if i in lin else jax.nn.sigmoid(s)
    return h, acts, pres


def per_example_loss(logits, x):
    """Sum over pixels of the sigmoid cross-entropy of logits against x."""
    return jnp.sum(jnp.maximum(logits, 0) - logits * x + jnp.log1p(jnp.exp(-jnp.abs(logits))), axis=-1)


def mean_loss(params, x, widths=WIDTHS):
    return jnp.mean(per_example_loss(forward(params, x, widths=widths)[0], x))


def make_loss_and_stats(widths=WIDTHS, fisher="empirical"):
    """A jitted (params, x, key) -> (loss, grads, {layer: (a, g)}) for
    natgrad.jax: a = the layer's inputs, g = the per-example output gradients
    of the per-example loss (n times the mean loss's cotangent of the
    pre-activations). fisher="empirical": of the loss on the data, from the
    same backward pass as grads; "sampled": of the loss on targets drawn from
    the model's Bernoulli outputs (the true Fisher), a second backward pass
    (key seeds the draw)."""
    if fisher not in ("empirical", "sampled"):
        raise ValueError("fisher must be 'empirical' or 'sampled'")
    names = layer_names(widths)

    def f(params, x, key):
        n = x.shape[0]
        eps = [jnp.zeros((n, d), x.dtype) for d in widths[1:]]

        def net(p, e):
            logits, acts, _ = forward(p, x, e, widths)
            return logits, acts

        logits, vjp, acts = jax.vjp(net, params, eps, has_aux=True)
        loss, dlogits = jax.value_and_grad(lambda z: jnp.mean(per_example_loss(z, x)))(logits)
        grads, cot = vjp(dlogits)
        if fisher == "sampled":
            y = jax.random.bernoulli(key, jax.nn.sigmoid(jax.lax.stop_gradient(logits))).astype(x.dtype)
            _, cot = vjp(jax.grad(lambda z: jnp.mean(per_example_loss(z, y)))(logits))
        return loss, grads, {nm: (a, c * n) for nm, a, c in zip(names, acts, cot)}

    return jax.jit(f)


# -- the four runs -------------------------------------------------------------

def _batches(args):
    return [images(args.batch, 1000 + i, d=args.widths[0]) for i in range(args.batches)]


def _proc_cpu_s(pid):
    """User + system CPU seconds of process pid so far (Linux /proc)."""
    if pid is None:
        return 0.0
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _Run:
    """One rep of one kind: holds the parameters, records the first update
    and times the window after the warmup."""

    def __init__(self, args, seed, first_index=0):
        self.args = args
        self.params = init_params(seed, args.widths)
        self.init = _host(init_params(seed, args.widths))  # (kfac-jax donates the params it steps)
        self.first_index = first_index        # the call whose result holds step 1's update
        self.first = None

    def record(self, i):
        if i == self.first_index:
            self.first = _host(self.params)

    def timed(self, step, finish=None, server_pid=None):
        """Runs warmup + steps calls of step(i, x); returns the timed
        window's mean wall and CPU (this process + server) seconds per step."""
        a = self.args
        data = _batches(a)
        for i in range(a.warmup + a.steps):
            if i == a.warmup:
                jax.block_until_ready(self.params)
                t0, c0, s0 = time.perf_counter(), time.process_time(), _proc_cpu_s(server_pid)
            step(i, data[i % len(data)])
            self.record(i)
        if finish is not None:
            finish()
        jax.block_until_ready(self.params)
        wall = (time.perf_counter() - t0) / a.steps
        cpu = (time.process_time() - c0) / a.steps
        return wall, cpu, (_proc_cpu_s(server_pid) - s0) / a.steps


def _host(tree):
    return [np.array(v) for v in jax.tree_util.tree_leaves(tree)]


def run_adam(args, seed, _client, _pid):
    import optax
    tx = optax.adam(args.adam_lr)
    r = _Run(args, seed)
    opt_state = tx.init(r.params)

    @jax.jit
    def update(params, opt_state, x):
        loss, g = jax.value_and_grad(mean_loss)(params, x, args.widths)
        u, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, u), opt_state, loss

    def step(i, x):
        nonlocal opt_state
        r.params, opt_state, _ = update(r.params, opt_state, x)
    return r, r.timed(step), {}


def kfac_jax_settings(args):
    """kfac_jax.Optimizer's (learning rate, damping, norm constraint,
    estimation mode) for natgrad's (lr, damping, kl_clip). kfac-jax's
    "fisher_empirical" divides its statistics by the batch size once more
    (its docs say so): with G/n in place of G, the pi-corrected damping and
    the norm constraint give natgrad's update exactly when lr, damping and
    the constraint are divided by n as well (the first-update column
    checks it)."""
    if args.fisher == "empirical":
        n = args.batch
        return args.lr / n, args.damping / n, args.kl_clip / n, "fisher_empirical"
    return args.lr, args.damping, args.kl_clip, "fisher_gradients"


def run_kfac_jax(args, seed, _client, _pid):
    import kfac_jax

    def loss_fn(params, x):
        logits, _, _ = forward(params, x, widths=args.widths, register=True)
        kfac_jax.register_sigmoid_cross_entropy_loss(logits, x)
        return jnp.mean(per_example_loss(logits, x))

    lr, damping, norm, mode = kfac_jax_settings(args)
    opt = kfac_jax.Optimizer(
        value_and_grad_func=jax.value_and_grad(loss_fn), l2_reg=0.0,
        use_adaptive_learning_rate=False, learning_rate_schedule=lambda _: lr,
        use_adaptive_momentum=False, momentum_schedule=lambda _: args.momentum,
        use_adaptive_damping=False, damping_schedule=lambda _: damping,
        norm_constraint=norm if args.kl_clip else None, num_burnin_steps=0, estimation_mode=mode,
        curvature_ema=args.ema_decay, curvature_update_period=1,
        inverse_update_period=args.inverse_period, use_automatic_registration=False,
        multi_device=False)
    r = _Run(args, seed)
    rng = jax.random.PRNGKey(seed)
    state = opt.init(r.params, rng, _batches(args)[0])

    def step(i, x):
        nonlocal state
        r.params, state, _ = opt.step(r.params, state, jax.random.fold_in(rng, i), batch=x,
                                      global_step_int=i)
    return r, r.timed(step), {}


def run_natgrad(args, seed, client, server_pid, pipelined=False, shared_memory=False):
    import natgrad.jax
    loss_and_stats = make_loss_and_stats(args.widths, fisher=args.fisher)
    r = _Run(args, seed, first_index=1 if pipelined else 0)
    opt = natgrad.jax.KFAC(r.params, client=client, lr=args.lr, damping=args.damping,
                           momentum=args.momentum, kl_clip=args.kl_clip, ema_decay=args.ema_decay,
                           inverse_period=args.inverse_period, reduce=args.reduce,
                           pipelined=pipelined, shared_memory=shared_memory,
                           display_name="kfac_jax_compare")
    timings = []
    rng = jax.random.PRNGKey(seed)

    def step(i, x):
        loss, grads, stats = loss_and_stats(r.params, x, jax.random.fold_in(rng, i))
        r.params = opt.step(r.params, grads, stats, loss=loss)
        if i >= args.warmup and opt.last_result is not None:
            timings.append(opt.last_result.timing)

    def finish():
        r.params = opt.flush(r.params)
        if pipelined:
            timings.append(opt.last_result.timing)
    try:
        times = r.timed(step, finish, server_pid)
    finally:
        opt.close(delete=True)
    # reduce="auto"'s measured choice (raw or reduced), printed per rep.
    extra = {"choice": (opt._reduce_trial.choice or "?") if args.reduce == "auto" else ""}
    for f in ("server_micros", "decode_micros", "compute_micros", "inversion_micros", "encode_micros"):
        if timings and hasattr(timings[0], f):
            extra[f] = statistics.fmean(getattr(t, f) for t in timings) / 1e3
    return r, times, extra


RUNS = {"adam": run_adam, "kfac_jax": run_kfac_jax, "natgrad": run_natgrad,
        "natgrad_pipe": lambda a, s, c, p: run_natgrad(a, s, c, p, pipelined=True),
        "natgrad_shm": lambda a, s, c, p: run_natgrad(a, s, c, p, shared_memory=True),
        "natgrad_pipe_shm": lambda a, s, c, p: run_natgrad(a, s, c, p, pipelined=True,
                                                           shared_memory=True)}


def _rel_diff(r, base):
    """||u - u_base|| / ||u_base|| of the first updates over all parameters."""
    if r.first is None or base is None or base.first is None:
        return None
    u = np.concatenate([(f - i).ravel() for f, i in zip(r.first, r.init)])
    ub = np.concatenate([(f - i).ravel() for f, i in zip(base.first, base.init)])
    return float(np.linalg.norm(u - ub) / np.linalg.norm(ub))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--server", default=None, help="natgrad-server binary (default: find it)")
    p.add_argument("--target", default=None, help="a running server instead of starting one")
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--widths", default=",".join(map(str, WIDTHS)),
                   help="layer widths, input first (the default is the MNIST autoencoder)")
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--batches", type=int, default=8, help="distinct batches, cycled")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--inverse_period", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--damping", type=float, default=1e-3)
    p.add_argument("--kl_clip", type=float, default=1e-3)
    p.add_argument("--ema_decay", type=float, default=0.95)
    p.add_argument("--fisher", choices=("empirical", "sampled"), default="empirical",
                   help="curvature statistics: output gradients of the loss on the data (one "
                        "backward pass; kfac-jax fisher_empirical) or on targets sampled from the "
                        "model (a second backward pass; kfac-jax fisher_gradients)")
    p.add_argument("--adam_lr", type=float, default=1e-3)
    p.add_argument("--reduce", default="auto", help="natgrad.jax.KFAC reduce= (auto, true, false)")
    p.add_argument("--json", default=None, help="also write the per-rep figures to this file")
    p.add_argument("--check", action="store_true",
                   help="exit non-zero unless every natgrad kind's first update matches "
                        "kfac_jax's to 1e-4 (relative; float32 rounding)")
    args = p.parse_args(argv)
    args.widths = tuple(int(w) for w in args.widths.split(","))
    args.reduce = {"true": True, "false": False}.get(str(args.reduce).lower(), args.reduce)
    kinds = args.kinds.split(",")
    unknown = set(kinds) - set(RUNS)
    if unknown:
        p.error(f"unknown kinds {sorted(unknown)} (known: {', '.join(RUNS)})")

    import natgrad
    srv = client = server_pid = None
    if any(k.startswith("natgrad") for k in kinds):
        target = args.target
        if target is None:
            extra = ["--shared_memory"] if any(k.endswith("_shm") for k in kinds) else []
            srv = natgrad.LocalServer(args.server or natgrad.find_server_binary(), extra_args=extra)
            srv.start()
            target, server_pid = srv.target, srv.proc.pid
        # No replay buffer: the bench server writes no checkpoints between
        # steps, so every step would be kept. Keeping one costs little now
        # (the messages themselves inline; with shared memory one copy of
        # the spans, about 3 ms for 46 MB once buffers are recycled and
        # 30 ms while the buffer fills: client/python/README.md), but the
        # kfac_jax side keeps nothing either.
        client = natgrad.Client(target, retry=natgrad.RetryPolicy(deadline_s=120.0),
                                max_replay_steps=0)
    held_out = images(args.batch, 999, d=args.widths[0])
    eval_loss = jax.jit(lambda p, x: mean_loss(p, x, args.widths))
    loss0 = float(eval_loss(init_params(0, args.widths), held_out))
    per_rep = {k: [] for k in kinds}
    ncpu = len(os.sched_getaffinity(0))
    choices = {}
    failures = []
    try:
        # Reps interleaved across kinds, so that load from other work on the
        # machine spreads over all of them rather than hitting one.
        for seed in range(args.reps):
            base = None
            for kind in sorted(kinds, key=lambda k: k != "kfac_jax"):
                try:
                    r, (wall, cpu, srv_cpu), extra = RUNS[kind](args, seed, client, server_pid)
                except natgrad.NatgradError as e:
                    # Reported, not hidden: the table counts the reps that ran.
                    failures.append(f"rep {seed} {kind}: {e}")
                    print(f"  rep {seed} {kind}: FAILED: {e}", file=sys.stderr, flush=True)
                    continue
                base = r if kind == "kfac_jax" else base
                choice = extra.pop("choice", "")
                choices.setdefault(kind, []).append(choice)
                # The step's CPU work (both processes) spread perfectly over
                # the cores: no overlap, pipelined or not, can go below it.
                floor_ms = (cpu + srv_cpu) * 1e3 / ncpu
                per_rep[kind].append(dict(step_ms=wall * 1e3, cpu_ms=cpu * 1e3, server_cpu_ms=srv_cpu * 1e3,
                                          floor_ms=floor_ms,
                                          loss=float(eval_loss(r.params, held_out)),
                                          first_diff=_rel_diff(r, base) if kind != "adam" else None,
                                          **extra))
                print(f"  rep {seed} {kind}: {wall * 1e3:.1f} ms/step"
                      + (f" (reduce=auto chose {choice})" if choice else ""),
                      file=sys.stderr, flush=True)
    finally:
        if client is not None:
            client.close()
        if srv is not None:
            srv.stop()
            srv.cleanup()
    rows = {}
    for kind in kinds:
        reps = per_rep[kind]
        if reps:
            rows[kind] = {k: (statistics.median(r[k] for r in reps) if reps[0][k] is not None else None)
                          for k in reps[0]}
            rows[kind]["reps_ok"] = len(reps)
    import importlib.metadata as md

    def ver(pkg):
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return "-"
    print(f"jax {jax.__version__} ({jax.default_backend()}), kfac-jax {ver('kfac-jax')}, optax "
          f"{ver('optax')}; {os.cpu_count()} cpus; widths {'-'.join(map(str, args.widths))}, batch "
          f"{args.batch}, float32, {args.fisher} Fisher; "
          f"median of {args.reps} reps x {args.steps} steps after {args.warmup} warmup; inverse_period "
          f"{args.inverse_period}, lr {args.lr}, momentum {args.momentum}, damping {args.damping}, "
          f"kl_clip {args.kl_clip}, natgrad reduce={args.reduce}")
    base = rows.get("kfac_jax", {}).get("step_ms")
    n = args.warmup + args.steps
    print(f"{'kind':<13} {'reps':>4} {'step ms':>8} {'x kfac_jax':>10} {'cpu ms':>7} {'srv cpu':>7} {'floor x':>7} {f'loss@{n}':>9} "
          f"{'1st upd':>8} | "
          f"{'server':>7} {'decode':>7} {'compute':>8} {'invert':>7} {'encode':>7}")
    for kind, r in rows.items():
        ratio = f"{r['step_ms'] / base:10.2f}" if base else f"{'-':>10}"
        floor = f"{r['floor_ms'] / base:7.2f}" if base else f"{'-':>7}"
        fd = f"{r['first_diff']:8.1e}" if r.get("first_diff") is not None else f"{'-':>8}"
        srvcols = " ".join(f"{r[f]:{w}.1f}" if f in r else f"{'':>{w}}" for f, w in
                           (("server_micros", 7), ("decode_micros", 7), ("compute_micros", 8),
                            ("inversion_micros", 7), ("encode_micros", 7)))
        print(f"{kind:<13} {r['reps_ok']:4d} {r['step_ms']:8.1f} {ratio} {r['cpu_ms']:7.1f} {r['server_cpu_ms']:7.1f} {floor} "
              f"{r['loss']:9.2f} {fd} | {srvcols}")
    for f in failures:
        print(f"failed: {f}")
    for kind, c in choices.items():
        if any(c):
            print(f"reduce=auto chose, rep by rep: {kind} {','.join(c)}")
    print(f"(held-out loss of the initial parameters {loss0:.2f}; cpu ms / srv cpu: CPU time of this "
          f"process / of the server per step; floor x: (cpu ms + srv cpu) / {ncpu} cpus over kfac_jax's step, the ratio "
          "this kind's CPU work allows with every core busy all the time (no overlap goes below it); 1st upd: relative difference of the first update from kfac_jax's; server columns: "
          "mean StepTiming per timed step, ms)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "reps": per_rep, "failures": failures,
                       "choices": choices, "loss0": loss0}, f, indent=1)
    if args.check:
        far = {k: r.get("first_diff") for k, r in rows.items() if k.startswith("natgrad")
               and not (r.get("first_diff") is not None and r["first_diff"] < 1e-4)}
        if "kfac_jax" not in rows or far:
            raise SystemExit(f"--check: first updates differ from kfac_jax's (or no kfac_jax row): {far}")
        print("--check: every natgrad kind's first update matches kfac_jax's to 1e-4")
    return rows


if __name__ == "__main__":
    main()
