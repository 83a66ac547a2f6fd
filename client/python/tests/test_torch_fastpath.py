"""Issue 13's statistics fast path: reduced factors in the client's dtype,
packed upper triangles on the wire, the PSD test at decomposition,
statistics only on statistics steps, reduce="auto" by measured cost."""
import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import natgrad  # noqa: E402
import natgrad.torch  # noqa: E402
from natgrad import blocks, errors  # noqa: E402
from natgrad._pb import step_pb2  # noqa: E402
from natgrad.tensor import to_tensor  # noqa: E402
import kfac_reference as ref  # noqa: E402

from test_torch import batch, mlp, reference_update, snapshot  # noqa: E402


def unpack(p, d):
    """The symmetric matrix of a packed upper triangle (row by row)."""
    m = np.zeros((d, d), p.dtype)
    m[np.triu_indices(d)] = p
    return m + np.triu(m, 1).T


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 2e-6), (torch.float64, 1e-13)])
def test_packed_factors_equal_the_float64_reference(bias, dtype, rtol):
    gen = torch.Generator().manual_seed(3)
    a = torch.rand(300, 40, generator=gen, dtype=dtype)
    g = torch.randn(300, 17, generator=gen, dtype=dtype)
    pa, pg = natgrad.torch._packed_factors(a, g, bias, 300, dtype)
    assert pa.dtype == (np.float32 if dtype == torch.float32 else np.float64)
    d = 40 + int(bias)
    assert pa.shape == (d * (d + 1) // 2,) and pg.shape == (17 * 18 // 2,)
    A, G = ref.factors(a.double().numpy(), g.double().numpy(), bias)
    np.testing.assert_allclose(unpack(pa, d), A, rtol=0, atol=rtol * np.abs(A).max())
    np.testing.assert_allclose(unpack(pg, 17), G, rtol=0, atol=rtol * np.abs(G).max())


def test_packed_factors_keep_the_convolution_scaling():
    # n examples of T = 4 locations: A over n, G over the n*T rows.
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(40, 6, generator=gen)
    g = torch.randn(40, 3, generator=gen)
    pa, pg = natgrad.torch._packed_factors(a, g, True, 10, torch.float32)
    abar = np.concatenate([a.double().numpy(), np.ones((40, 1))], 1)
    np.testing.assert_allclose(unpack(pa, 7), abar.T @ abar / 10, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(unpack(pg, 3), g.double().numpy().T @ g.double().numpy() / 40,
                               rtol=1e-5, atol=1e-5)
    assert unpack(pa, 7)[6, 6] == 4.0  # the bias entry is T


def capture(opt):
    """Records the BlockStep messages of every step the optimizer sends."""
    sent = []
    real = opt.session.step

    def step(msgs, loss=None):
        sent.append({k: copy.deepcopy(v) for k, v in msgs.items()})
        return real(msgs, loss=loss)
    opt.session.step = step
    return sent


def form(bs):
    return bs.kfac.WhichOneof("statistics") if bs.HasField("kfac") else None


@pytest.mark.parametrize("mode", ["tikhonov", "eigen"])
def test_float32_reduced_first_update_matches_the_reference(target, mode):
    model = mlp(torch.float32)
    x, y = batch(dtype=torch.float32)
    hp = dict(lr=0.3, damping=1e-2, kl_clip=1e-3, adam_lr=1e-3)
    want, nu, _ = reference_update(copy.deepcopy(model).double(), x.double(), y, mode=mode, **hp)
    before = snapshot(model)
    opt = natgrad.torch.KFAC(model, target=target, lr=hp["lr"], damping=hp["damping"], momentum=0.9,
                             damping_mode=mode, ema_decay=0.95, inverse_period=1,
                             kl_clip=hp["kl_clip"], fallback_lr=hp["adam_lr"], reduce=True)
    sent = capture(opt)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    for name, d in (("0", 7), ("3", 6)):
        r = sent[0][name].kfac.reduced
        assert r.packed and list(r.a_factor.shape) == [d * (d + 1) // 2]
        assert r.a_factor.dtype == natgrad.tensor.tensor_pb2.FLOAT32
    assert opt.last_result.kl_clip_scale == pytest.approx(nu, rel=2e-3)
    for k, p in model.state_dict().items():
        got = (p - before[k]).double().numpy()
        np.testing.assert_allclose(got, want[k], rtol=2e-3, atol=2e-3 * np.abs(want[k]).max(),
                                   err_msg=f"parameter {k}")
    opt.close(delete=True)


def reduced_inputs(seed, packed):
    rng = np.random.default_rng(seed)
    a = rng.random((50, 8)).astype(np.float32)
    g = rng.standard_normal((50, 5)).astype(np.float32)
    A, G = ref.factors(a, g, True)
    grad = rng.standard_normal((5, 9)).astype(np.float32)
    return {"gradient": grad, "a_factor": A.astype(np.float32), "g_factor": G.astype(np.float32),
            "num_examples": 50, "packed": packed}


@pytest.mark.parametrize("mode", ["tikhonov", "eigen"])
def test_packed_equals_unpacked_bit_for_bit_through_the_server(client, mode):
    cfg = [blocks.kfac_dense("fc", 8, 5, lr=0.5, damping=1e-2, momentum=0.9, damping_mode=mode,
                             inverse_period=2)]
    s_full, s_packed = client.create_session(cfg), client.create_session(cfg)
    try:
        for t in range(1, 4):
            full = s_full.step({"fc": reduced_inputs(t, packed=False)})
            packed = s_packed.step({"fc": reduced_inputs(t, packed=True)})
            assert np.array_equal(full["fc"], packed["fc"]), f"step {t}"
    finally:
        s_full.delete()
        s_packed.delete()


def test_wrong_packed_lengths_are_refused(client):
    s = client.create_session([blocks.kfac_dense("fc", 8, 5)])
    try:
        x = reduced_inputs(1, packed=True)
        with pytest.raises(errors.InvalidArgument, match="g_factor.*expected"):
            s.step({"fc": {**x, "g_factor": np.ones(14, np.float32)}})
        # Past the client's own checks: the server refuses, naming the field.
        bs = s._block_step("fc", x)
        to_tensor(np.ones(44, np.float32), out=bs.kfac.reduced.a_factor)  # want 45
        with pytest.raises(errors.InvalidArgument, match="kfac.reduced.a_factor is packed"):
            s.step({"fc": bs})
        bs = s._block_step("fc", {**x, "packed": False})
        bs.kfac.reduced.packed = True  # square tensors flagged packed
        with pytest.raises(errors.InvalidArgument, match="rank-1 tensor of d\\(d\\+1\\)/2 = 45"):
            s.step({"fc": bs})
        assert client.get_session_info(s.name).last_step == 0
        s.step({"fc": x})  # and the session still steps
    finally:
        s.delete()


def test_indefinite_reduced_factor_is_refused(client):
    s = client.create_session([blocks.kfac_dense("fc", 3, 2, damping_mode="eigen")])
    try:
        # Every 2x2 minor is positive, v = (1, -1, 1, 0) gives v^T A v < 0.
        A = np.eye(4, dtype=np.float32)
        A[0, 1] = A[1, 0] = A[1, 2] = A[2, 1] = 0.9
        A[0, 2] = A[2, 0] = -0.9
        x = {"gradient": np.ones((2, 4), np.float32), "a_factor": A,
             "g_factor": np.eye(2, dtype=np.float32), "num_examples": 10}
        with pytest.raises(errors.InvalidArgument,
                           match="kfac.reduced.a_factor is not positive semidefinite"):
            s.step({"fc": x})
        assert client.get_session_info(s.name).last_step == 0
        A[:3, :3] = 0.5 + 0.5 * np.eye(3)  # now PSD
        s.step({"fc": {**x, "a_factor": A}})
    finally:
        s.delete()


def small_ae(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 6), nn.Tanh(), nn.Linear(6, 12))


def ae_batch(i):
    g = torch.Generator().manual_seed(100 + i)
    return torch.rand(32, 12, generator=g)


def train(opt, model, steps):
    for i in range(steps):
        x = ae_batch(i)
        opt.zero_grad()
        F.mse_loss(model(x), x).backward()
        opt.step()


def test_statistics_are_sent_only_on_statistics_steps(target):
    model = small_ae()
    opt = natgrad.torch.KFAC(model, target=target, stats_period=3, inverse_period=3, reduce=True)
    sent = capture(opt)
    train(opt, model, 7)
    forms = [form(m["0"]) for m in sent]
    assert forms == ["reduced", None, None, "reduced", None, None, "reduced"]
    assert all(m["0"].HasField("gradient") for m in sent)
    opt.close(delete=True)


def test_auto_times_both_forms_then_keeps_the_cheaper(target):
    model = small_ae()
    opt = natgrad.torch.KFAC(model, target=target, reduce="auto")
    sent = capture(opt)
    trial = opt._reduce_trial
    train(opt, model, trial.PLAN_STEPS + 2)
    k = trial.TRIALS
    assert len(trial.costs["raw"]) == k and len(trial.costs["reduced"]) == k
    assert all(c > 0 for c in trial.costs["raw"] + trial.costs["reduced"])
    assert trial.choice == min(("raw", "reduced"), key=lambda f: min(trial.costs[f]))
    forms = [form(m["0"]) for m in sent]
    # Step 1 by bytes (the packed 91 + 21 values < 32 rows of 12 + 6), then
    # a warm-up step per form, then the forms alternating.
    assert forms[:trial.PLAN_STEPS] == ["reduced"] + ["raw", "reduced"] * (k + 1)
    assert trial.warm == ["raw", "reduced"]
    assert set(forms[trial.PLAN_STEPS:]) == {trial.choice}
    opt.close(delete=True)


def test_preconditioner_mode_sends_packed_factors(target):
    model = small_ae()
    pre = natgrad.torch.KFACPreconditioner(model, target=target, reduce=True)
    sent = capture(pre)
    x = ae_batch(0)
    F.mse_loss(model(x), x).backward()
    pre.step()
    assert all(m.kfac.reduced.packed for m in sent[0].values())
    pre.close(delete=True)
