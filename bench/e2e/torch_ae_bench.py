"""natgrad.torch.KFAC against torch.optim.Adam on issue 3's MNIST autoencoder.

784-1000-500-250-30 and the mirrored decoder (sigmoid hidden units, linear
code layer, logits out, binary cross-entropy), batch 1000: the full training
step (forward, backward, optimizer) timed for

  adam         torch.optim.Adam
  kfac_raw     natgrad.torch.KFAC(reduce=False): raw rows uploaded
  kfac_reduced natgrad.torch.KFAC(reduce=True): packed factors from the client
  kfac_auto    natgrad.torch.KFAC(reduce="auto"): the measured choice
  kfac_<form>_stream  the same with stream=True: each layer's block is sent
               as backward produces it (a sender thread), the rest at step()
  kfac_<form>_pipe    stream=True, pipelined=True: step() sends the step and
               applies the previous step's update (one step stale)
  kfac_..._shm the same with shared_memory=True: the step's tensors go
               through POSIX shared memory instead of the gRPC messages
               (--shared-memory on|both; the server started here then gets
               --shared_memory; docs/shared_memory.md)

Each configuration runs --reps times, the reps of all configurations
interleaved (fresh model, optimizer and session;
--warmup untimed steps, then --steps timed steps, a multiple of the inverse
period so every rep has the same share of decomposition steps); a rep's
figure is its mean step time, and the table shows the median over reps.
Server figures are the means of each timed step's StepTiming. Besides wall
time, the CPU time of the client process and of the server process per
step is reported (client + server for K-FAC): on a machine shared with other
work, wall times stretch with the load while CPU time stays close to the
work done. The client keeps no replay buffer unless --replay (torch's Adam
keeps nothing; see the comment in main for what keeping costs).

The images are synthetic (no dataset download here): MNIST-shaped, about
19% of pixels on (MNIST's share), values in [0, 1]; the cost of a step does
not depend on the pixel values.

The bench runs with OPENBLAS_THREAD_TIMEOUT=4 unless the environment sets
it (docs/torch_overlap.md, "Idle BLAS threads"): torch's OpenBLAS workers
then sleep when idle instead of spinning for 0.1 s after every product,
which on two shared cores takes a core from the server while the client
waits for it. OPENBLAS_THREAD_TIMEOUT=28 gives OpenBLAS's default.

  .venv/bin/python bench/e2e/torch_ae_bench.py [--server build/server/natgrad-server]
      [--shared-memory off|on|both]
"""
import argparse
import json
import os
import statistics
import sys
import time

# Before torch loads OpenBLAS, which reads it only then.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import natgrad  # noqa: E402
import natgrad.torch  # noqa: E402

WIDTHS = [784, 1000, 500, 250, 30, 250, 500, 1000, 784]


def autoencoder(seed):
    torch.manual_seed(seed)
    layers = []
    for i in range(len(WIDTHS) - 1):
        layers.append(nn.Linear(WIDTHS[i], WIDTHS[i + 1]))
        if i not in (3, len(WIDTHS) - 2):  # linear code layer and logits
            layers.append(nn.Sigmoid())
    return nn.Sequential(*layers)


def images(n, seed):
    g = torch.Generator().manual_seed(seed)
    on = torch.rand(n, 784, generator=g) < 0.19
    return torch.where(on, torch.rand(n, 784, generator=g), torch.zeros(()))


def server_cpu_s(pid):
    """User + system CPU seconds of process pid so far (Linux /proc)."""
    if pid is None:
        return 0.0
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(kind, args, client, seed, server_pid):
    model = autoencoder(seed)
    data = [images(args.batch, 1000 + i) for i in range(4)]
    if kind == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    else:
        shm = kind.endswith("_shm")
        form, _, mode = kind[len("kfac_"):len(kind) - 4 * shm].partition("_")
        reduce = {"raw": False, "reduced": True, "auto": "auto"}[form]
        if mode not in ("", "stream", "pipe"):
            raise SystemExit(f"unknown kind {kind!r}")
        opt = natgrad.torch.KFAC(model, client=client, lr=0.1, damping=args.damping, momentum=0.9,
                                 inverse_period=args.inverse_period, reduce=reduce,
                                 kl_clip=1e-3, stream=mode in ("stream", "pipe"),
                                 pipelined=mode == "pipe", shared_memory=shm)
    step_s, in_opt_s, timings = [], [], []
    for i in range(args.warmup + args.steps):
        x = data[i % len(data)]
        if i == args.warmup:
            cpu0, srv0 = time.process_time(), server_cpu_s(server_pid)
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(model(x), x)
        loss.backward()
        t1 = time.perf_counter()
        opt.step()
        t2 = time.perf_counter()
        if i >= args.warmup:
            step_s.append(t2 - t0)
            in_opt_s.append(t2 - t1)
            if kind != "adam" and opt.last_result is not None:
                timings.append(opt.last_result.timing)  # (pipelined: the previous step's)
    out = {"step": statistics.fmean(step_s), "opt": statistics.fmean(in_opt_s),
           "client_cpu": (time.process_time() - cpu0) / args.steps,
           "server_cpu": (server_cpu_s(server_pid) - srv0) / args.steps, "loss": float(loss)}
    if kind != "adam":
        opt.flush()  # pipelined: the last step's update (after the timed steps)
        for f in ("server_micros", "decode_micros", "queue_micros", "compute_micros",
                  "inversion_micros", "encode_micros"):
            out[f] = statistics.fmean(getattr(t, f) for t in timings) / 1e3
        trial = getattr(opt, "_reduce_trial", None)
        out["choice"] = (trial.choice or "?") if (trial and kind.startswith("kfac_auto")) else ""
        opt.close(delete=True)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--server", default=None, help="natgrad-server binary (default: find it)")
    p.add_argument("--target", default=None, help="a running server instead of starting one")
    p.add_argument("--kinds", default="adam,kfac_raw,kfac_reduced,kfac_auto,kfac_raw_stream,"
                   "kfac_reduced_stream,kfac_raw_pipe,kfac_reduced_pipe")
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=10,
                   help="untimed steps (reduce=\"auto\"'s trial takes the first 9)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--inverse_period", type=int, default=5)
    p.add_argument("--damping", type=float, default=1e-2)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", default=None, help="also write the per-rep figures to this file")
    p.add_argument("--replay", action="store_true",
                   help="keep the client's replay buffer (default: max_replay_steps=0)")
    p.add_argument("--shared-memory", default="off", choices=("off", "on", "both"),
                   help="K-FAC rows through shared memory (a kind_shm row for each), or both: "
                        "each K-FAC row with and without, side by side")
    args = p.parse_args()
    kinds = []
    for kind in args.kinds.split(","):
        shm = kind.startswith("kfac_") and not kind.endswith("_shm")
        if args.shared_memory != "on" or not shm:
            kinds.append(kind)
        if args.shared_memory != "off" and shm:
            kinds.append(kind + "_shm")
    if args.threads:
        torch.set_num_threads(args.threads)
    srv = server_pid = None
    target = args.target
    if target is None:
        extra = ["--shared_memory"] if any(k.endswith("_shm") for k in kinds) else []
        srv = natgrad.LocalServer(args.server or natgrad.find_server_binary(), extra_args=extra)
        srv.start()
        target = srv.target
        server_pid = srv.proc.pid
    # A generous retry deadline: the bench shares the machine with builds.
    # No replay buffer unless --replay: the LocalServer here writes no
    # checkpoints between steps, so the client would keep every step, and
    # a shared-memory step kept is one copy of its 46 MB of spans into
    # memory the process never touched before (35-280 ms a step on this
    # VM, where a fresh page costs 2.5-15 us) until max_replay_bytes is
    # reached and the buffers recycle (about 4 ms); each rep's fresh
    # session sits inside that transient. torch's Adam keeps nothing.
    client = natgrad.Client(target, retry=natgrad.RetryPolicy(deadline_s=120.0),
                            **({} if args.replay else {"max_replay_steps": 0}))
    try:
        all_reps = {kind: [] for kind in kinds}
        # Rep by rep across the kinds, so a change in the machine's load
        # during the run reaches every row alike.
        for seed in range(args.reps):
            for kind in kinds:
                all_reps[kind].append(run(kind, args, client, seed, server_pid))
        rows = {}
        for kind, reps in all_reps.items():
            rows[kind] = {k: (statistics.median(r[k] for r in reps) if k != "choice"
                              else ",".join(r[k] for r in reps)) for k in reps[0]}
        adam = rows.get("adam", {}).get("step")
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
              f"replay buffer {'on' if args.replay else 'off'}, "
              f"median of {args.reps} reps x {args.steps} steps (inverse_period "
              f"{args.inverse_period}, OPENBLAS_THREAD_TIMEOUT="
              f"{os.environ['OPENBLAS_THREAD_TIMEOUT']})")
        adam_cpu = rows.get("adam", {}).get("client_cpu")
        ncpu = len(os.sched_getaffinity(0))
        print(f"{'kind':<23} {'step ms':>8} {'x Adam':>7} {'opt.step':>9} {'cpu ms':>7} "
              f"{'x Adam':>7} {'floor x':>7} | {'server':>7} {'decode':>7} {'queue':>7} {'compute':>8} "
              f"{'invert':>7} {'encode':>7} | choice")
        for kind, r in rows.items():
            ratio = f"{r['step'] / adam:7.2f}" if adam else "      -"
            cpu = r["client_cpu"] + r["server_cpu"]
            cpu_cols = (f"{1e3 * cpu:7.1f} " + (f"{cpu / adam_cpu:7.2f}" if adam_cpu else "      -")
                        + (f" {cpu / ncpu / adam:7.2f}" if adam else "       -"))
            srv_cols = (f"{r['server_micros']:7.1f} {r['decode_micros']:7.1f} "
                        f"{r['queue_micros']:7.1f} {r['compute_micros']:8.1f} "
                        f"{r['inversion_micros']:7.1f} {r['encode_micros']:7.1f}"
                        if "server_micros" in r else " " * 49)
            print(f"{kind:<23} {1e3 * r['step']:8.1f} {ratio} {1e3 * r['opt']:9.1f} {cpu_cols} | {srv_cols} | "
                  f"{r.get('choice', '')}")
        print("cpu: client + server process CPU time per step (robust to a shared machine); "
              f"floor x: that CPU time spread over the {ncpu} cpus, over Adam's step: the ratio the "
              "step's work allows with every core busy all the time (no overlap goes below it); "
              "server columns: ms per step, means of StepTiming (compute includes invert)")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"threads": torch.get_num_threads(), "reps": all_reps}, f, indent=1)
    finally:
        client.close()
        if srv is not None:
            srv.stop()
            srv.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
