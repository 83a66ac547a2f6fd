"""natgrad.jax.KFAC(reduce="auto"): raw rows or reduced factors by measured cost."""
import pytest

jax = pytest.importorskip("jax", reason="jax not installed (scripts/setup-python installs jax[cpu])")

import natgrad  # noqa: E402
import natgrad.jax  # noqa: E402

from test_jax import data, init, loss_and_stats  # noqa: E402  (enables x64)


def trial_plan_steps():
    from natgrad._reduce_trial import ReduceTrial
    return ReduceTrial.PLAN_STEPS


def _capture(opt):
    """The statistics form of every block sent: "raw" or "reduced"."""
    sent = []
    real = opt.session._block_step

    def block_step(name, inp, step=None, out=None):
        bs = real(name, inp, step, out)
        if bs.HasField("kfac"):
            sent.append((name, bs.kfac.WhichOneof("statistics")))
        return bs
    opt.session._block_step = block_step
    return sent


@pytest.mark.parametrize("pipelined", [False, True])
def test_auto_times_both_forms_then_keeps_the_cheaper(target, pipelined):
    params = init(jax.random.PRNGKey(0))
    x, y = data()
    opt = natgrad.jax.KFAC(params, target=target, lr=0.1, damping=1e-2, inverse_period=1,
                           reduce="auto", pipelined=pipelined)
    sent = _capture(opt)
    layers = sorted(opt.layers)
    steps = 1 + trial_plan_steps() + 2
    for _ in range(steps):
        _, grads, stats = loss_and_stats(params, x, y)
        params = opt.step(params, grads, stats)
    if pipelined:
        params = opt.flush(params)
    trial = opt._reduce_trial
    k = trial.TRIALS
    assert len(trial.costs["raw"]) == k and len(trial.costs["reduced"]) == k
    assert all(c > 0 for c in trial.costs["raw"] + trial.costs["reduced"])
    assert trial.choice == min(("raw", "reduced"), key=lambda f: min(trial.costs[f]))
    per_step = [[f for (n, f) in sent[i * len(layers):(i + 1) * len(layers)]] for i in range(steps)]
    assert all(len(set(p)) == 1 for p in per_step), per_step  # one form per step
    seq = [p[0] for p in per_step]
    # A warm-up step per form, then the forms alternate.
    assert seq[1:1 + 2 * (k + 1)] == ["raw", "reduced"] * (k + 1), seq
    assert trial.warm == ["raw", "reduced"]
    # Pipelined: the choice lands one step after the last trial's response.
    tail = seq[1 + 2 * (k + 1) + (1 if pipelined else 0):]
    assert tail and set(tail) == {trial.choice}, seq
    opt.close(delete=True)
