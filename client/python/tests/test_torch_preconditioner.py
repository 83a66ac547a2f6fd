"""natgrad.torch.KFACPreconditioner (your optimizer does the update) and torch
LR schedulers in optimizer mode, against a real server."""
import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import natgrad  # noqa: E402
import natgrad.torch  # noqa: E402
import kfac_reference as ref  # noqa: E402


def mlp(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def data(n=96, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g, dtype=dtype)
    y = (x[:, 0] > 0).long() + (x[:, 1] + x[:, 2] > 1).long()
    return x, y


def test_preconditioned_grad_matches_numpy_reference(target):
    model = mlp()
    x, y = data(16)
    pre = natgrad.torch.KFACPreconditioner(model, target=target, damping=1e-2, inverse_period=1,
                                           state_dtype="float64")
    assert pre.param_kinds == {"0.weight": "kfac", "0.bias": "kfac", "3.weight": "kfac",
                               "3.bias": "kfac", "1.weight": "untouched", "1.bias": "untouched"}
    assert {b.name: (b.kfac_dense.learning_rate.constant.value, b.kfac_dense.momentum.constant.value)
            for b in pre.session.config.blocks} == {"0": (1.0, 0.0), "3": (1.0, 0.0)}
    # The reference: functional forward keeping pre-activations.
    l1, ln, _, l2 = model
    s1 = x @ l1.weight.T + l1.bias
    h = torch.tanh(F.layer_norm(s1, (8,), ln.weight, ln.bias, ln.eps))
    s2 = h @ l2.weight.T + l2.bias
    ds1, ds2 = torch.autograd.grad(F.cross_entropy(s2, y), [s1, s2])
    npy = lambda t: t.detach().numpy()  # noqa: E731
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    raw = {k: p.grad.clone() for k, p in model.named_parameters()}
    gw = lambda L: np.concatenate([npy(L.weight.grad), npy(L.bias.grad)[:, None]], 1)  # noqa: E731
    layers = {"0": dict(grad=gw(l1), a=npy(x), g=16 * npy(ds1), bias=True),
              "3": dict(grad=gw(l2), a=npy(h), g=16 * npy(ds2), bias=True)}
    # With lr 1, no KL clip: delta = -V, so the new .grad is V.
    want, _ = ref.first_step(layers, lr=1.0, damping=1e-2, kl_clip=None)
    grad_objs = {k: p.grad for k, p in model.named_parameters()}
    result = pre.step()
    assert result.step == 1 and set(result) == {"0", "3"}
    for name, L, d_in in (("0", l1, 6), ("3", l2, 8)):
        np.testing.assert_allclose(npy(L.weight.grad), -want[name][:, :d_in], rtol=1e-9, atol=1e-13)
        np.testing.assert_allclose(npy(L.bias.grad), -want[name][:, d_in], rtol=1e-9, atol=1e-13)
    # LayerNorm's .grad untouched; .grad tensors are updated in place.
    assert torch.equal(ln.weight.grad, raw["1.weight"]) and torch.equal(ln.bias.grad, raw["1.bias"])
    assert all(p.grad is grad_objs[k] for k, p in model.named_parameters())
    # Nothing to precondition: nothing sent.
    model.zero_grad(set_to_none=True)
    assert pre.step() is None and pre.session.next_step == 2
    pre.close(delete=True)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_preconditioner_with_sgd_and_steplr_equals_optimizer_mode(target, momentum):
    """Preconditioner + torch SGD + StepLR against KFAC + the same StepLR:
    the same trajectory over 24 steps (float64)."""
    x, y = data()
    lr = 0.2
    common = dict(target=target, damping=1e-2, inverse_period=2, ema_decay=0.9,
                  state_dtype="float64", kl_clip=None)
    m_opt = mlp()
    m_pre = copy.deepcopy(m_opt)
    opt = natgrad.torch.KFAC(m_opt, lr=lr, momentum=momentum, weight_decay=0.0, fallback="sgd",
                             fallback_lr=lr, fallback_kwargs={"momentum": momentum}, **common)
    sched_opt = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    pre = natgrad.torch.KFACPreconditioner(m_pre, **common)
    sgd = torch.optim.SGD(m_pre.parameters(), lr=lr, momentum=momentum)
    sched_pre = torch.optim.lr_scheduler.StepLR(sgd, step_size=5, gamma=0.5)
    losses = []
    for t in range(24):
        idx = torch.arange(t * 32, t * 32 + 32) % x.shape[0]
        opt.zero_grad()
        loss = F.cross_entropy(m_opt(x[idx]), y[idx])
        loss.backward()
        opt.step()
        sgd.zero_grad()
        F.cross_entropy(m_pre(x[idx]), y[idx]).backward()
        pre.step()
        sgd.step()
        want_lr = lr * 0.5 ** (t // 5)
        hp = opt.last_result.hyperparameters
        assert hp["0"]["learning_rate"] == pytest.approx(want_lr, rel=1e-15)
        assert hp["1.weight"]["learning_rate"] == pytest.approx(want_lr, rel=1e-15)
        assert pre.last_result.hyperparameters["0"]["learning_rate"] == 1.0
        for (k, a), b in zip(m_opt.state_dict().items(), m_pre.state_dict().values()):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-10, atol=1e-12,
                                       err_msg=f"step {t + 1}: {k}")
        sched_opt.step()
        sched_pre.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    opt.close(delete=True)
    pre.close(delete=True)


def test_lr_scheduler_to_zero_stops_the_weights(target):
    model = mlp(dtype=torch.float32)
    x, y = data(dtype=torch.float32)
    opt = natgrad.torch.KFAC(model, target=target, lr=0.1, damping=1e-2)
    assert [g["natgrad_blocks"] for g in opt.param_groups] == ["kfac", "fallback"]
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.0)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == [0.0, 0.0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        assert all(h["learning_rate"] == 0.0 for h in opt.last_result.hyperparameters.values())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    opt.close(delete=True)


def test_changing_a_server_side_hyperparameter_in_param_groups_raises(target):
    model = mlp(dtype=torch.float32)
    x, y = data(dtype=torch.float32)
    opt = natgrad.torch.KFAC(model, target=target, lr=0.1, damping=1e-2, momentum=0.9)
    opt.param_groups[0]["momentum"] = 0.5  # e.g. OneCycleLR(cycle_momentum=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(natgrad.FailedPrecondition, match="momentum"):
        opt.step()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    opt.param_groups[0]["momentum"] = 0.9
    opt.zero_grad()  # a failed step drops its statistics: run the batch again
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert opt.last_result.step == 1
    opt.close(delete=True)


def test_preconditioner_with_adamw_trains_a_cnn(target):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding="same"), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    g = torch.Generator().manual_seed(5)
    X = torch.randn(128, 1, 6, 6, generator=g)
    y = (X[:, :, :3].mean((1, 2, 3)) > X[:, :, 3:].mean((1, 2, 3))).long()
    pre = natgrad.torch.KFACPreconditioner(model, target=target, damping=1e-2,
                                           factor_update_steps=1, inv_update_steps=2,
                                           factor_decay=0.9)
    assert pre.param_kinds["0.weight"] == "kfac" and pre.param_kinds["1.weight"] == "untouched"
    k = {b.name: b.kfac_dense for b in pre.session.config.blocks}
    assert k["0"].inverse_period == 2 and k["0"].stats_period == 1 and k["0"].ema_decay == pytest.approx(0.9)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2)
    losses = []
    for t in range(20):
        idx = torch.arange(t * 32, t * 32 + 32) % 128
        opt.zero_grad()
        loss = F.cross_entropy(model(X[idx]), y[idx])
        loss.backward()
        pre.step(loss=loss)
        opt.step()
        losses.append(float(loss))
    assert np.mean(losses[-4:]) < np.mean(losses[:4]), losses
    pre.close(delete=True)
