"""Issue 13's overlap in the torch client: per-layer streaming (each K-FAC
layer's block sent as backward produces it, over a step of several
messages) and the pipelined mode (step t's update applied at step t+1).

Oracles: streaming must change nothing, so the unstreamed optimizer on
the same model and data is the oracle, bit for bit. The pipelined mode is
checked against a hand-written loop over natgrad.Session.step that builds
the inputs itself (its own hooks) and applies each step's deltas one step
late. Real natgrad-server processes throughout."""
import copy
import threading
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import natgrad  # noqa: E402
import natgrad.torch  # noqa: E402
from natgrad import blocks  # noqa: E402


# -- the Session's streamed steps ---------------------------------------------

CFG = [blocks.kfac_dense("fc", 4, 3, lr=0.2, damping=1e-2, momentum=0.9, inverse_period=2),
       blocks.adam("w", [3, 2], lr=0.05)]


def session_inputs(t, dtype=np.float32):
    r = np.random.default_rng(t)
    return {"fc": {"gradient": r.standard_normal((3, 5)).astype(dtype),
                   "activations": r.standard_normal((8, 4)).astype(dtype),
                   "output_gradients": r.standard_normal((8, 3)).astype(dtype)},
            "w": r.standard_normal((3, 2)).astype(dtype)}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_streamed_session_step_equals_the_one_message_step(client, dtype):
    whole, streamed = client.create_session(CFG, kl_clip=1e-2), client.create_session(CFG, kl_clip=1e-2)
    try:
        for t in range(1, 5):
            x = session_inputs(t, dtype)
            want = whole.step(x, loss=1.5)
            assert streamed.begin_step() == t and streamed.step_open == t
            streamed.send_blocks({"fc": x["fc"]})
            got = streamed.finish_step({"w": x["w"]}, loss=1.5)
            assert streamed.step_open is None and streamed.next_step == t + 1
            assert got.step == t and got.kl_clip_scale == want.kl_clip_scale
            for k in want:
                assert np.array_equal(got[k], want[k]), (t, k)
        # Every block in its own message, nothing at the end.
        streamed.begin_step()
        x = session_inputs(5, dtype)
        streamed.send_blocks({"w": x["w"]})
        streamed.send_blocks({"fc": x["fc"]})
        got = streamed.finish_step()
        want = whole.step(x)
        for k in want:
            assert np.array_equal(got[k], want[k]), k
    finally:
        whole.delete()
        streamed.delete()


def test_streamed_step_misuse_and_errors_leave_the_counter_alone(client):
    s = client.create_session(CFG)
    try:
        with pytest.raises(natgrad.FailedPrecondition, match="begin_step"):
            s.send_blocks({"w": session_inputs(1)["w"]})
        with pytest.raises(natgrad.FailedPrecondition, match="begin_step"):
            s.finish_step()
        s.begin_step()
        with pytest.raises(natgrad.FailedPrecondition, match="still open"):
            s.begin_step()
        with pytest.raises(natgrad.FailedPrecondition, match="is open"):
            s.step(session_inputs(1))
        # A client-side error abandons the open step.
        bad = session_inputs(1)
        bad["w"] = np.full((3, 2), np.nan, np.float32)
        s.send_blocks({"fc": session_inputs(1)["fc"]})
        with pytest.raises(natgrad.InvalidArgument, match="'w'.*NaN"):
            s.send_blocks({"w": bad["w"]})
        assert s.step_open is None and s.next_step == 1
        # A server-side error (client validation off) raises at finish_step.
        s.validate = False
        s.begin_step()
        s.send_blocks({"fc": session_inputs(1)["fc"]})
        with pytest.raises(natgrad.InvalidArgument, match='block "w"'):
            s.finish_step({"w": bad["w"]})
        assert s.step_open is None and s.next_step == 1
        s.validate = True
        # abort_step drops a step whose first messages are on the stream.
        s.begin_step()
        s.send_blocks({"fc": session_inputs(1)["fc"]})
        s.abort_step()
        assert s.step_open is None
        # The same step number goes through now, streamed or not.
        s.begin_step()
        s.send_blocks({"fc": session_inputs(1)["fc"]})
        r = s.finish_step({"w": session_inputs(1)["w"]})
        assert r.step == 1 and s.info().last_step == 1
        assert s.step(session_inputs(2)).step == 2
    finally:
        s.delete()


def test_streamed_step_survives_a_server_restart_mid_step(fresh_server):
    """SIGKILL with half of a streamed step on the stream: the step is sent
    again whole after reconnecting, and the answer is the uninterrupted one."""
    c = natgrad.Client(fresh_server.target, retry=natgrad.RetryPolicy(
        deadline_s=60, max_attempts=200, max_backoff=0.2))
    ref = c.create_session(CFG)
    s = c.create_session(CFG)
    try:
        for t in range(1, 4):
            want = ref.step(session_inputs(t))
            s.begin_step()
            s.send_blocks({"fc": session_inputs(t)["fc"]})
            if t == 2:
                fresh_server.kill()
                fresh_server.start()
            got = s.finish_step({"w": session_inputs(t)["w"]})
            for k in want:
                assert np.array_equal(got[k], want[k]), (t, k)
        assert s.retries >= 1
        # The kept step holds both of its messages.
        assert s.info().last_step == 3
    finally:
        ref.delete()
        s.delete()


# -- natgrad.torch.KFAC(stream=True): bit-identical to the unstreamed step ------

class Shared(nn.Module):
    """A conv, a dense layer, and a dense layer used twice in one forward
    (the same weights applied in a loop), plus a LayerNorm (fallback)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 5 * 5, 8)
        self.norm = nn.LayerNorm(8)
        self.loop = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3, bias=False)

    def forward(self, x):
        h = torch.tanh(self.norm(self.fc(F.relu(self.conv(x)).flatten(1))))
        for _ in range(2):
            h = torch.tanh(self.loop(h))
        return self.head(h)


def shared_data(t, dtype):
    g = torch.Generator().manual_seed(100 + t)
    x = torch.randn(12, 1, 5, 5, generator=g, dtype=dtype)
    return x, (x.mean((1, 2, 3)) > 0).long() + (x[:, 0, 2, 2] > 0.5).long()


def train_shared(target, dtype, reduce, steps, **kw):
    torch.manual_seed(0)
    model = Shared().to(dtype)
    opt = natgrad.torch.KFAC(model, target=target, lr=0.1, damping=1e-2, momentum=0.9,
                             weight_decay=1e-3, inverse_period=2, kl_clip=1e-2, reduce=reduce,
                             state_dtype="float64" if dtype == torch.float64 else "float32", **kw)
    trajectory = []
    for t in range(1, steps + 1):
        x, y = shared_data(t, dtype)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step(loss=loss)
        trajectory.append([p.detach().clone() for p in model.parameters()])
    opt.flush()
    return opt, model, trajectory


@pytest.mark.parametrize("reduce", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_streamed_steps_are_bit_identical_to_unstreamed_ones(target, dtype, reduce):
    steps = 4
    a, _, want = train_shared(target, dtype, reduce, steps)
    b, _, got = train_shared(target, dtype, reduce, steps, stream=True)
    try:
        assert a.streamed_blocks == 0
        # Every K-FAC layer streamed every step, the loop layer included
        # (its AccumulateGrad runs after both uses have contributed).
        assert b.streamed_blocks == len(b.layers) * steps and "loop" in b.layers
        assert b.session.next_step == a.session.next_step == steps + 1
        for t in range(steps):
            for i, (p, q) in enumerate(zip(want[t], got[t])):
                assert torch.equal(p, q), f"step {t + 1}, parameter {i}"
    finally:
        a.close(delete=True)
        b.close(delete=True)


def test_streamed_preconditioner_is_bit_identical(target):
    def run(stream):
        torch.manual_seed(0)
        model = Shared()
        pre = natgrad.torch.KFACPreconditioner(model, target=target, damping=1e-2, reduce=False,
                                               stream=stream)
        sgd = torch.optim.SGD(model.parameters(), lr=0.1)
        for t in range(1, 4):
            x, y = shared_data(t, torch.float32)
            sgd.zero_grad()
            F.cross_entropy(model(x), y).backward()
            pre.step()
            sgd.step()
        out = [p.detach().clone() for p in model.parameters()]
        streamed = pre.streamed_blocks
        pre.close(delete=True)
        return out, streamed
    want, n0 = run(False)
    got, n1 = run(True)
    assert n0 == 0 and n1 == 4 * 3
    for p, q in zip(want, got):
        assert torch.equal(p, q)


def test_streamed_ekfac_is_bit_identical(target):
    def run(stream):
        torch.manual_seed(0)
        model = Shared()
        opt = natgrad.torch.EKFAC(model, target=target, lr=0.1, damping=1e-2, inverse_period=2,
                                  stream=stream)
        for t in range(1, 4):
            x, y = shared_data(t, torch.float32)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        out = [p.detach().clone() for p in model.parameters()]
        streamed = opt.streamed_blocks
        opt.close(delete=True)
        return out, streamed
    want, _ = run(False)
    got, n = run(True)
    assert n == 4 * 3
    for p, q in zip(want, got):
        assert torch.equal(p, q)


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3))


def mlp_batch(t, n=16):
    g = torch.Generator().manual_seed(1000 + t)
    x = torch.randn(n, 6, generator=g)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()


def kfac(model, target, **kw):
    return natgrad.torch.KFAC(model, target=target, lr=0.1, damping=1e-2, momentum=0.9,
                              inverse_period=2, kl_clip=1e-2, reduce=False, **kw)


@pytest.mark.parametrize("meddle", ["clip", "two_backward", "lr"])
def test_streaming_steps_aside_when_backward_and_step_disagree(target, meddle):
    """Gradient clipping between backward and step(), a second backward pass,
    or a learning rate changed after backward: the streamed blocks are stale,
    so the step is sent whole (with one warning) and streaming stays off;
    the run equals the unstreamed one."""
    def run(stream):
        model = mlp()
        opt = kfac(model, target, stream=stream)
        for t in range(1, 4):
            x, y = mlp_batch(t)
            opt.zero_grad()
            if meddle == "two_backward":
                F.cross_entropy(model(x[:8]), y[:8]).backward()
                F.cross_entropy(model(x[8:]), y[8:]).backward()
            else:
                F.cross_entropy(model(x), y).backward()
            if meddle == "clip":
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
            elif meddle == "lr":
                opt.param_groups[0]["lr"] = 0.1 / t
            opt.step()
        out = [p.detach().clone() for p in model.parameters()]
        opt.close(delete=True)
        return out
    want = run(False)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        got = run(True)
    hits = [x for x in w if "stream=True turned off" in str(x.message)]
    assert len(hits) == 1, [str(x.message) for x in w]
    for p, q in zip(want, got):
        assert torch.equal(p, q)


def test_accumulation_steps_are_sent_at_step(target):
    model = mlp()
    opt = kfac(model, target, stream=True, accumulation_steps=2)
    x, y = mlp_batch(1)
    for half in (slice(0, 8), slice(8, 16)):
        (F.cross_entropy(model(x[half]), y[half]) / 2).backward()
    opt.step()
    assert opt.streamed_blocks == 0 and opt.session.next_step == 2
    opt.close(delete=True)


@pytest.mark.parametrize("pipelined", [False, True])
def test_a_streamed_block_that_fails_to_build_fails_the_step_only(target, pipelined):
    """A NaN weight gradient of the first layer makes its block invalid
    (client-side validation, on the builder thread, after the last layer's
    block went out): step() raises InvalidArgument naming it, nothing is
    applied, and the next step goes through with the same number."""
    model = mlp()
    opt = kfac(model, target, stream=True, pipelined=pipelined)
    poison = []
    sent = threading.Event()  # the last layer's block of the poisoned step is on the stream

    def streamed(event, session, stream, step):
        if event == "streamed" and poison:
            sent.set()
    opt.session._test_hook = streamed

    def nan_grad(g):
        # Backward reaches the first layer after the last layer's gradients
        # are accumulated; waiting here makes its block go out first.
        assert sent.wait(30)
        return torch.full_like(g, float("nan"))

    def nan_below(module, inputs, output):  # runs after natgrad's hook: its records stay finite
        if poison:
            output.register_hook(nan_grad)
    model[0].register_forward_hook(nan_below)

    def step(t, nan=False):
        x, y = mlp_batch(t)
        poison[:] = [True] if nan else []
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    step(1)
    opt.flush()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(natgrad.InvalidArgument, match="block '0'.*NaN"):
        step(2, nan=True)
    assert sent.is_set() and opt.streamed_blocks == 3
    assert opt.session.next_step == 2 and opt.session.step_open is None
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)
    step(3)
    opt.flush()
    assert opt.last_result.step == 2 and opt.session.info().last_step == 2
    opt.close(delete=True)


# -- pipelined=True -------------------------------------------------------------

def oracle_pipelined(client, config, steps):
    """Session.step by hand, each step's inputs from this loop's own hooks
    at the current parameters, its deltas applied one step late. Returns
    the parameters after each step (before that step's own update) and at
    the end (everything applied)."""
    model = mlp()
    l1, norm, _, l2 = model
    s = client.create_session(config)
    seen = {}

    def keep(name):
        def hook(m, inp, out):
            seen[name] = [inp[0].detach(), None]
            out.register_hook(lambda g: seen[name].__setitem__(1, g.detach()))
        return hook
    l1.register_forward_hook(keep("0"))
    l2.register_forward_hook(keep("3"))
    pending, after = None, []

    def apply(result):
        with torch.no_grad():
            for name, lin in (("0", l1), ("3", l2)):
                d = torch.from_numpy(result[name])
                lin.weight += d[:, :-1]
                lin.bias += d[:, -1]
            norm.weight += torch.from_numpy(result["1.weight"])
            norm.bias += torch.from_numpy(result["1.bias"])
    for t in range(1, steps + 1):
        x, y = mlp_batch(t)
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        n = x.shape[0]
        inputs = {}
        for name, lin in (("0", l1), ("3", l2)):
            a, g = seen[name]
            inputs[name] = {"gradient": torch.cat([lin.weight.grad, lin.bias.grad[:, None]], 1).numpy(),
                            "activations": a.numpy(), "output_gradients": (g * float(n)).numpy()}
        inputs["1.weight"] = norm.weight.grad.numpy()
        inputs["1.bias"] = norm.bias.grad.numpy()
        result = s.step(inputs, loss=float(loss))
        if pending is not None:
            apply(pending)
        pending = result
        after.append([p.detach().clone() for p in model.parameters()])
    apply(pending)
    s.delete()
    return after, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("stream", [False, True])
def test_pipelined_equals_the_sync_trajectory_applied_one_step_late(target, client, stream):
    steps = 6
    model = mlp()
    opt = kfac(model, target, pipelined=True, stream=stream)
    want_after, want_end = oracle_pipelined(client, opt.session.config, steps)
    for t in range(1, steps + 1):
        x, y = mlp_batch(t)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step(loss=loss)
        for i, (p, q) in enumerate(zip(model.parameters(), want_after[t - 1])):
            assert torch.equal(p, q), f"after step() {t}, parameter {i}"
    assert opt.flush().step == steps
    assert opt.flush() is None
    for p, q in zip(model.parameters(), want_end):
        assert torch.equal(p, q)
    assert opt.streamed_blocks == (2 * steps if stream else 0)
    # The oracle tells the modes apart: a synchronous run ends elsewhere.
    sync_model = mlp()
    sync = kfac(sync_model, target)
    for t in range(1, steps + 1):
        x, y = mlp_batch(t)
        sync.zero_grad()
        F.cross_entropy(sync_model(x), y).backward()
        sync.step()
    assert not all(torch.equal(p, q) for p, q in zip(sync_model.parameters(), want_end))
    sync.close(delete=True)
    opt.close(delete=True)


def test_pipelined_state_dict_with_a_step_in_flight(target, client):
    def train(opt, model, ts):
        for t in ts:
            x, y = mlp_batch(t)
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step(loss=loss)

    model = mlp()
    opt = kfac(model, target, pipelined=True, stream=True)
    train(opt, model, range(1, 4))  # step 3 in flight
    sd = opt.state_dict()  # drains it: the update of step 3 is applied
    assert sd["natgrad"]["step"] == 3 and opt.last_result.step == 3
    params = copy.deepcopy(model.state_dict())
    train(opt, model, range(4, 7))
    opt.flush()
    want = [p.detach().clone() for p in model.parameters()]
    opt.close()
    client.delete_session(sd["natgrad"]["session"])

    model2 = mlp(seed=5)
    model2.load_state_dict(params)
    opt2 = kfac(model2, target, pipelined=True, stream=True)
    opt2.load_state_dict(sd)  # imported: the server no longer has it
    assert opt2.session.next_step == 4
    train(opt2, model2, range(4, 7))
    opt2.close(delete=True)  # drains step 6
    for p, q in zip(model2.parameters(), want):
        assert torch.equal(p, q)


def test_pipelined_error_of_the_step_in_flight_surfaces_at_the_next_step(target):
    model = mlp()
    opt = kfac(model, target, pipelined=True, stream=True)

    def step(t, poison=False):
        x, y = mlp_batch(t)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if poison:  # a NaN only the server sees (client validation off): a fallback block
            model[1].weight.grad[0] = float("nan")
            opt.session.validate = False
        opt.step(loss=loss)
        opt.session.validate = True

    step(1)
    step(2)
    step(3, poison=True)  # applies step 2's update and returns: step 3 is in flight
    assert opt.last_result.step == 2
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(natgrad.InvalidArgument, match=r'block "1\.weight"'):
        step(4)  # raises step 3's error; sends nothing of its own
    assert opt.session.next_step == 3 and opt.session.step_open is None
    assert opt.last_result.step == 2
    for p, q in zip(model.parameters(), before):  # step 3's update never came
        assert torch.equal(p, q)
    assert opt.flush() is None  # nothing in flight
    # Training goes on from step 3.
    step(5)
    step(6)
    assert opt.flush().step == 4
    assert opt.session.info().last_step == 4
    opt.close(delete=True)


def test_pipelined_close_raises_the_error_of_the_step_in_flight(target):
    model = mlp()
    opt = kfac(model, target, pipelined=True)
    x, y = mlp_batch(1)
    F.cross_entropy(model(x), y).backward()
    model[1].bias.grad[0] = float("inf")
    opt.session.validate = False
    opt.step()
    name = opt.session.name
    with pytest.raises(natgrad.InvalidArgument):
        opt.close()
    assert not opt._handles and opt._sender_pool is None
    opt.client.delete_session(name)


# -- a server killed with a streamed step on the stream --------------------------

@pytest.mark.parametrize("pipelined", [False, True])
def test_streamed_torch_run_survives_sigkills_bit_for_bit(target, server_binary, tmp_path, pipelined):
    every = 4
    srv = natgrad.LocalServer(server_binary, log_path=str(tmp_path / "server.log"),
                              checkpoint_dir=str(tmp_path / "ckpt"),
                              extra_args=[f"--checkpoint_every_steps={every}", "--worker_threads=2",
                                          "--shutdown_grace_s=2"])
    srv.start()
    steps = 12
    kills = {4: "streamed", 8: "streamed", 6: "between"}  # step -> when

    def run(tgt, hook=None):
        # (Only the run with the hook is interrupted.)
        c = natgrad.Client(tgt, retry=natgrad.RetryPolicy(deadline_s=60, max_attempts=200,
                                                         max_backoff=0.2))
        model = mlp()
        opt = kfac(model, None, client=c, stream=True, pipelined=pipelined)
        if hook is not None:
            opt.session._test_hook = hook
        for t in range(1, steps + 1):
            x, y = mlp_batch(t)
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step(loss=loss)
            if hook is not None and kills.get(t) == "between":
                # (Pipelined: with step t in flight, answered or not.)
                kills[t] = "done"
                srv.kill()
                srv.start()
        opt.flush()
        return opt, [p.detach().clone() for p in model.parameters()]

    try:
        ref, want = run(target)
        ref.close(delete=True)

        def hook(event, session, stream, step):
            # The first streamed block of the step is on the stream.
            if event == "streamed" and kills.get(step) == "streamed":
                kills[step] = "done"
                srv.kill()
                srv.start()
        opt, got = run(srv.target, hook)
        assert set(kills.values()) == {"done"}
        assert opt.session.retries >= 3 and opt.session.replayed_steps >= 1
        assert opt.streamed_blocks == 2 * steps
        for p, q in zip(want, got):
            assert torch.equal(p, q)
        assert opt.session.info().last_step == steps
        opt.close(delete=True)
    finally:
        srv.stop()
        srv.cleanup()
