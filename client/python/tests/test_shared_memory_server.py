"""Steps through POSIX shared memory against a real natgrad-server started
with --shared_memory (docs/shared_memory.md): each equals the same step sent
inline, bit for bit, and the reply comes back through the session's reply
buffer. Also: a server without the flag refuses clearly and nothing moves,
regrowth, retries and replay after SIGKILLs, and natgrad.torch/natgrad.jax
with shared_memory=True against the same runs without."""
import os

import numpy as np
import pytest

import natgrad
from natgrad import blocks
from natgrad import shared_memory as shm
from natgrad._pb import step_pb2

from conftest import crashable_server, patient_client


@pytest.fixture(scope="module")
def shm_server(server_binary, tmp_path_factory):
    log = tmp_path_factory.mktemp("shm-server") / "server.log"
    srv = natgrad.LocalServer(server_binary, log_path=str(log),
                              extra_args=["--shared_memory", "--worker_threads=2",
                                          "--shutdown_grace_s=2"])
    srv.start()
    yield srv
    srv.stop()
    srv.cleanup()


@pytest.fixture()
def client(shm_server):
    c = natgrad.Client(shm_server.target, retry=natgrad.RetryPolicy(deadline_s=30.0))
    yield c
    c.close()


def config(dtype):
    state = "float64" if dtype == np.float64 else None
    return dict(config=[
        blocks.sgd("b", [3], lr=0.1, momentum=0.9),
        blocks.adam("w", [4, 3], lr=0.05),
        blocks.kfac_dense("raw", 5, 3, bias=True, lr=0.1, damping=1e-2, inverse_period=2),
        blocks.kfac_dense("red", 6, 2, bias=False, lr=0.1, damping=1e-2, momentum=0.5),
        blocks.gaussian("q", 3, 2, parametrization="mean_covariance", gamma=0.5),
        blocks.gaussian_diag("d", 4, parametrization="mean_variance", gamma=0.5),
    ], state_dtype=state)


def inputs(t, dtype, rows=7):
    r = np.random.default_rng(t)
    f = lambda *s: r.standard_normal(s).astype(dtype)  # noqa: E731
    a = f(rows, 6)
    B = f(2, 3, 3)
    return {
        "b": f(3),
        "w": {"gradient": f(4, 3)},
        "raw": {"gradient": f(3, 6), "activations": f(rows, 5), "output_gradients": f(rows, 3)},
        "red": {"gradient": f(2, 6), "a_factor": a.T @ a / rows, "g_factor": np.eye(2, dtype=dtype),
                "num_examples": rows},
        "q": {"param1": f(2, 3), "param2": B @ B.transpose(0, 2, 1) + 2 * np.eye(3, dtype=dtype),
              "grad1": 0.1 * f(2, 3), "grad2": 0.01 * f(2, 3, 3), "gradient_space": "parametrization"},
        "d": {"param1": f(4), "param2": 1.0 + r.random(4).astype(dtype), "grad1": 0.1 * f(4),
              "grad2": 0.01 * f(4), "gradient_space": "parametrization"},
    }


def same(a, b):
    """StepResults equal bit for bit (arrays, dtypes, Gaussian fields, scalars)."""
    assert set(a) == set(b)
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, natgrad.GaussianResult):
            for f in ("param1", "param2", "delta1", "delta2", "direction1", "direction2"):
                u, v = getattr(x, f), getattr(y, f)
                assert (u is None) == (v is None), (k, f)
                if u is not None:
                    assert u.dtype == v.dtype and np.array_equal(u, v), (k, f)
            assert (x.gamma_used, x.halvings) == (y.gamma_used, y.halvings), k
        else:
            assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), k
    assert a.step == b.step and a.kl_clip_scale == b.kl_clip_scale and a.damping == b.damping
    assert a.hyperparameters == b.hyperparameters


def reply_spans(result):
    return [t for t in shm.tensors(result.response) if is_set(t)]


def is_set(t):
    return natgrad.tensor.is_set(t)


def check_reply_in_buffer(result, session):
    """Every update tensor came through the reply buffer, 64-byte aligned, in order."""
    ts = reply_spans(result)
    assert ts
    end = 0
    regions = set()
    for t in ts:
        sp = t.shared_memory
        assert t.HasField("shared_memory") and not t.data, t
        assert sp.offset % 64 == 0 and sp.offset >= end
        end = sp.offset + sp.length
        regions.add(sp.region)
    assert len(regions) == 1 and regions <= set(session.shared_memory_regions)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_steps_through_shared_memory_equal_inline_bit_for_bit(client, dtype):
    a = client.create_session(**config(dtype))
    b = client.create_session(**config(dtype), shared_memory=True)
    assert b.shared_memory and not a.shared_memory
    for t in range(1, 7):
        ra, rb = a.step(inputs(t, dtype), loss=1.0 / t), b.step(inputs(t, dtype), loss=1.0 / t)
        same(ra, rb)
        assert ra["raw"].dtype == dtype
        assert not any(x.HasField("shared_memory") for x in reply_spans(ra))
        check_reply_in_buffer(rb, b)
    assert b.next_step == 7 and b.info().last_step == 6
    names = b.shared_memory_regions
    assert len(names) == 4  # two slots, each a request and a reply region
    b.delete()
    a.delete()
    assert not any(os.path.exists(f"/dev/shm/{n}") for n in names)


def test_streamed_steps_through_shared_memory_equal_inline(client):
    a = client.create_session(**config(np.float32))
    b = client.create_session(**config(np.float32), shared_memory=True)
    for t in range(1, 5):
        x = inputs(t, np.float32)
        ra = a.step(x, loss=0.5)
        assert b.begin_step() == t
        b.send_blocks({k: x[k] for k in ("raw", "red")})
        b.send_blocks({"q": x["q"]})
        rb = b.finish_step({k: x[k] for k in ("b", "w", "d")}, loss=0.5)
        same(ra, rb)
        check_reply_in_buffer(rb, b)
    a.delete()
    b.delete()


def test_a_server_without_shared_memory_refuses_and_nothing_moves(target):
    c = natgrad.Client(target)  # conftest's server: no --shared_memory
    s = c.create_session(**config(np.float64), shared_memory=True)
    with pytest.raises(natgrad.FailedPrecondition, match="shared.memory") as e:
        s.step(inputs(1, np.float64))
    assert "--shared_memory" in str(e.value) and "shared_memory=False" in str(e.value)
    assert s.next_step == 1 and s.info().last_step == 0
    # The same step inline goes through (the failed one changed nothing).
    inline = c.get_session(s.name, shared_memory=False)
    assert inline.step(inputs(1, np.float64)).step == 1
    s.delete()


def test_a_bad_span_is_invalid_argument_naming_the_field(client):
    s = client.create_session([blocks.sgd("b", [3], lr=0.1)], shared_memory=True)
    bs = step_pb2.BlockStep(name="b")
    g = bs.gradient
    g.dtype, g.shape[:] = natgrad.tensor.FLOAT64, [3]
    g.shared_memory.region, g.shared_memory.length = "natgrad-no-such-region", 24
    with pytest.raises(natgrad.InvalidArgument, match=r"gradient\.shared_memory"):
        s.step({"b": bs})
    assert s.next_step == 1
    assert s.step({"b": np.ones(3)}).step == 1
    s.delete()


def test_a_step_that_outgrows_the_region_regrows_and_matches(client):
    a = client.create_session(**config(np.float64))
    b = client.create_session(**config(np.float64), shared_memory=True)
    made = []
    for t, rows in enumerate([7, 7, 20000, 20000, 60000, 7, 60000], start=1):
        same(a.step(inputs(t, np.float64, rows)), b.step(inputs(t, np.float64, rows)))
        made.append(b._shm.regions_created)
    # Steps 3 (the first big one) and 5 (bigger) outgrew their slots' regions.
    assert made[2] > made[1] and made[4] > made[3]
    # Then every step fits: the last ones made nothing new.
    assert made[6] == made[5]
    a.delete()
    b.delete()


def test_a_reply_that_outgrows_its_buffer_comes_inline_then_the_buffer_grows(client, monkeypatch):
    cfg = [blocks.sgd("big", [600, 600], lr=0.1), blocks.sgd("small", [3], lr=0.1)]
    a = client.create_session(cfg)
    b = client.create_session(cfg, shared_memory=True)
    r = np.random.default_rng(0)
    x = {"big": r.standard_normal((600, 600)), "small": r.standard_normal(3)}
    # An estimate of 1 byte: the smallest (1 MiB) buffer, while the big
    # delta takes 2.9 MB.
    monkeypatch.setattr(natgrad.client, "_reply_estimate", lambda reqs: 1)
    rb = b.step(x)
    same(a.step(x), rb)
    by_name = {u.name: u.delta for u in rb.response.updates}
    assert not by_name["big"].HasField("shared_memory") and len(by_name["big"].data) == 600 * 600 * 8
    assert by_name["small"].HasField("shared_memory")
    # The next reply buffer is sized for the whole reply.
    rb = b.step(x)
    same(a.step(x), rb)
    check_reply_in_buffer(rb, b)
    a.delete()
    b.delete()


def test_a_dropped_stream_resends_the_same_spans(client):
    a = client.create_session(**config(np.float32))
    b = client.create_session(**config(np.float32), shared_memory=True)
    drops = {2: "before", 4: "before"}

    def drop(event, s, stream, step):
        if event == "sent" and drops.pop(step, None):
            stream.cancel()  # gone with the step queued; maybe applied, maybe not
    b._test_hook = drop
    for t in range(1, 6):
        same(a.step(inputs(t, np.float32)), b.step(inputs(t, np.float32)))
    assert b.retries >= 2 and not drops
    a.delete()
    b.delete()


# -- replay after SIGKILLs ----------------------------------------------------------

EVERY = 5


@pytest.fixture()
def every5(server_binary, tmp_path):
    srv = crashable_server(server_binary, tmp_path, EVERY, ["--shared_memory"])
    yield srv
    srv.stop()
    srv.cleanup()


def test_replay_after_sigkills_with_shared_memory_matches_bit_for_bit(client, every5):
    ref = client.create_session(**config(np.float64))
    s = patient_client(every5.target).create_session(**config(np.float64), shared_memory=True)
    plan = {3: "between", 7: "in_flight", 8: "between", 14: "in_flight"}

    def in_flight(event, sess, stream, step):
        if event == "sent" and plan.get(step) == "in_flight":
            plan[step] = "done"
            every5.crash()
    s._test_hook = in_flight
    for t in range(1, 17):
        r = s.step(inputs(t, np.float64), loss=1.0 / t)
        same(ref.step(inputs(t, np.float64), loss=1.0 / t), r)
        check_reply_in_buffer(r, s)
        # Kept steps hold copies of their spans' bytes (the regions are
        # reused every other step); a replay sends them inline, with no
        # reply buffer.
        for kept in s._kept.values():
            assert not any(x.HasField("reply_buffer") or shm.has_spans(x) for x in kept.requests(s))
            assert not shm.has_spans(kept.answer(s))
        if plan.get(t) == "between":
            plan[t] = "done"
            every5.crash()
    assert every5.kills == 4 and set(plan.values()) == {"done"}
    assert s.replayed_steps >= 3 + 3  # 3 after step 3, 3 after step 8, more in flight
    assert s.info().last_step == 16
    ref.delete()
    s.delete()


# -- natgrad.torch and natgrad.jax ------------------------------------------------


def torch_run(target, steps, shared_memory, clip_at=None, **kw):
    torch = pytest.importorskip("torch")
    import torch.nn as nn
    import torch.nn.functional as F
    import natgrad.torch as ntorch
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 3))
    c = natgrad.Client(target)
    opt = ntorch.KFAC(model, client=c, lr=0.1, momentum=0.9, damping=1e-2, inverse_period=2,
                      fallback="adam", fallback_lr=1e-2, shared_memory=shared_memory, **kw)
    assert opt.session.shared_memory == bool(shared_memory)
    for t in range(steps):
        g = torch.Generator().manual_seed(100 + t)
        x = torch.randn(32, 6, generator=g)
        y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if t == clip_at:  # .grad changed after backward: streamed blocks dropped, step sent whole
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
        opt.step(loss=loss)
    opt.flush()
    out = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt.close(delete=True)
    c.close()
    return out


@pytest.mark.parametrize("mode", ["sync", "stream", "pipelined", "pipelined_stream"])
@pytest.mark.parametrize("reduce", [False, True])
def test_torch_kfac_with_shared_memory_equals_without(shm_server, mode, reduce):
    torch = pytest.importorskip("torch")
    kw = dict(reduce=reduce, stream="stream" in mode, pipelined="pipelined" in mode)
    want = torch_run(shm_server.target, 8, False, **kw)
    got = torch_run(shm_server.target, 8, True, **kw)
    for k in want:
        assert torch.equal(want[k], got[k]), k


@pytest.mark.parametrize("pipelined", [False, True])
def test_torch_streamed_blocks_dropped_and_resent_with_shared_memory(shm_server, pipelined):
    torch = pytest.importorskip("torch")
    kw = dict(reduce=False, stream=True, pipelined=pipelined, clip_at=3)
    with pytest.warns(UserWarning, match="stream=True turned off"):
        want = torch_run(shm_server.target, 6, False, **kw)
    with pytest.warns(UserWarning, match="stream=True turned off"):
        got = torch_run(shm_server.target, 6, True, **kw)
    for k in want:
        assert torch.equal(want[k], got[k]), k


@pytest.mark.parametrize("kind", ["EKFAC", "KFACPreconditioner"])
def test_torch_ekfac_and_preconditioner_with_shared_memory_equal_without(shm_server, kind):
    torch = pytest.importorskip("torch")
    import natgrad.torch as ntorch

    def run(flag):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        kw = dict(damping=1e-2, inverse_period=2, shared_memory=flag, stream=True)
        if kind == "EKFAC":
            opt = ntorch.EKFAC(model, target=shm_server.target, lr=0.1, **kw)
            sgd = None
        else:
            opt = ntorch.KFACPreconditioner(model, target=shm_server.target, reduce=False, **kw)
            sgd = torch.optim.SGD(model.parameters(), lr=0.1)
        assert opt.session.shared_memory == flag
        for t in range(5):
            x = torch.randn(16, 6, generator=torch.Generator().manual_seed(t))
            (sgd or opt).zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
            if sgd is not None:
                sgd.step()
        opt.close(delete=True)
        return [p.detach().clone() for p in model.parameters()]
    for u, v in zip(run(False), run(True)):
        assert torch.equal(u, v)


def test_torch_shampoo_with_shared_memory_equals_without(shm_server):
    torch = pytest.importorskip("torch")
    import natgrad.torch as ntorch

    def run(flag):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        opt = ntorch.Shampoo(model, target=shm_server.target, lr=1e-2, shared_memory=flag)
        for t in range(4):
            x = torch.randn(16, 5, generator=torch.Generator().manual_seed(t))
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
        assert opt.session.shared_memory == flag
        opt.close(delete=True)
        return [p.detach().clone() for p in model.parameters()]
    for u, v in zip(run(False), run(True)):
        assert torch.equal(u, v)


@pytest.mark.parametrize("pipelined", [False, True])
def test_jax_kfac_with_shared_memory_equals_without(shm_server, pipelined):
    jax = pytest.importorskip("jax")
    import natgrad.jax as njax
    from test_jax import data, init, loss_and_stats

    def run(flag):
        p = init(jax.random.PRNGKey(3))
        opt = njax.KFAC(p, target=shm_server.target, lr=0.2, damping=1e-2, inverse_period=2,
                        state_dtype="float64", reduce=False, pipelined=pipelined,
                        shared_memory=flag)
        assert opt.session.shared_memory == flag
        for i in range(5):
            x, y = data(seed=i)
            loss, grads, stats = loss_and_stats(p, x, y)
            p = opt.step(p, grads, stats, loss=float(loss))
        p = opt.flush(p)
        opt.close(delete=True)
        return jax.tree_util.tree_leaves(p)
    for u, v in zip(run(False), run(True)):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def test_regions_are_gone_after_close_and_a_later_step_makes_new_ones(client):
    s = client.create_session(**config(np.float32), shared_memory=True)
    s.step(inputs(1, np.float32))
    names = s.shared_memory_regions
    assert names and all(os.path.exists(f"/dev/shm/{n}") for n in names)
    s.close()
    assert not any(os.path.exists(f"/dev/shm/{n}") for n in names)
    r = s.step(inputs(2, np.float32))  # reopens the stream; new regions
    assert r.step == 2 and set(s.shared_memory_regions).isdisjoint(names)
    s.delete()
