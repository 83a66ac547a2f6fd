"""natgrad.torch.KFAC against a real server."""
import copy
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import natgrad  # noqa: E402
import natgrad.torch  # noqa: E402
import kfac_reference as ref  # noqa: E402


def mlp(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)


def batch(n=16, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, snap):
    for k, v in model.state_dict().items():
        assert torch.equal(v, snap[k]), f"parameter {k} changed"


def reference_update(model, x, y, *, lr, damping, mode, kl_clip, adam_lr):
    """Independent of the optimizer's hooks: a functional forward that keeps
    the pre-activations, autograd for their gradients, numpy K-FAC."""
    l1, ln, _, l2 = model
    n = x.shape[0]
    s1 = x @ l1.weight.T + l1.bias
    h = torch.tanh(F.layer_norm(s1, (5,), ln.weight, ln.bias, ln.eps))
    s2 = h @ l2.weight.T + l2.bias
    loss = F.cross_entropy(s2, y)  # mean over the batch
    ds1, ds2, gW1, gb1, gW2, gb2, glw, glb = torch.autograd.grad(
        loss, [s1, s2, l1.weight, l1.bias, l2.weight, l2.bias, ln.weight, ln.bias])
    np_ = lambda t: t.detach().numpy().astype(np.float64)  # noqa: E731
    layers = {
        "0": dict(grad=np.concatenate([np_(gW1), np_(gb1)[:, None]], 1), a=np_(x), g=n * np_(ds1), bias=True),
        "3": dict(grad=np.concatenate([np_(gW2), np_(gb2)[:, None]], 1), a=np_(h), g=n * np_(ds2), bias=True),
    }
    deltas, nu = ref.first_step(layers, lr=lr, damping=damping, mode=mode, kl_clip=kl_clip)
    out = {
        "0.weight": deltas["0"][:, :6], "0.bias": deltas["0"][:, 6],
        "3.weight": deltas["3"][:, :5], "3.bias": deltas["3"][:, 5],
        "1.weight": ref.adam_first_step(np_(glw), adam_lr), "1.bias": ref.adam_first_step(np_(glb), adam_lr),
    }
    return out, nu, float(loss)


@pytest.mark.parametrize("mode,dtype,reduce,rtol", [
    ("tikhonov", torch.float64, False, 1e-7),
    ("eigen", torch.float64, True, 1e-7),
    ("tikhonov", torch.float32, "auto", 2e-3),
])
def test_first_update_matches_numpy_reference(target, mode, dtype, reduce, rtol):
    model = mlp(dtype)
    x, y = batch(dtype=dtype)
    hp = dict(lr=0.3, damping=1e-2, kl_clip=1e-3, adam_lr=1e-3)
    want, nu, _ = reference_update(copy.deepcopy(model).double(), x.double(), y, mode=mode, **hp)
    before = snapshot(model)
    opt = natgrad.torch.KFAC(model, target=target, lr=hp["lr"], damping=hp["damping"], momentum=0.9,
                             weight_decay=0.0, damping_mode=mode, ema_decay=0.95, inverse_period=1,
                             kl_clip=hp["kl_clip"], fallback_lr=hp["adam_lr"], reduce=reduce,
                             state_dtype="float64" if dtype == torch.float64 else "float32")
    assert set(opt.layers) == {"0", "3"} and set(opt.fallback_params) == {"1.weight", "1.bias"}
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert opt.last_result.kl_clip_scale == pytest.approx(nu, rel=max(rtol, 1e-9))
    for k, p in model.state_dict().items():
        got = (p - before[k]).double().numpy()
        np.testing.assert_allclose(got, want[k], rtol=rtol, atol=rtol * np.abs(want[k]).max(),
                                   err_msg=f"parameter {k}")
    opt.close(delete=True)


def test_training_reduces_loss(target):
    torch.manual_seed(0)
    X = torch.randn(256, 10)
    w = torch.randn(10, 4)
    y = (X @ w).argmax(1)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = natgrad.torch.KFAC(model, target=target, lr=0.2, damping=1e-2)
    losses = []
    for t in range(40):
        idx = torch.arange(t * 32, t * 32 + 32) % 256
        opt.zero_grad()
        loss = F.cross_entropy(model(X[idx]), y[idx])
        loss.backward()
        opt.step(loss=loss)
        losses.append(float(loss))
    with torch.no_grad():
        final = float(F.cross_entropy(model(X), y))
    assert final < 0.5 * losses[0], (losses[0], final)
    assert opt.session.next_step == 41
    opt.close(delete=True)


def test_conv_net_and_unsupported_layer_fallback(target):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.BatchNorm2d(4), nn.ReLU(),  # grouped: fallback
        nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    X = torch.randn(64, 1, 6, 6)
    y = (X.mean((1, 2, 3)) > 0).long() + (X[:, 0, 0, 0] > 1).long()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        opt = natgrad.torch.KFAC(model, target=target, lr=0.1, damping=1e-2)
    assert any("'2'" in str(x.message) for x in w)
    assert set(opt.layers) == {"0", "6"}
    assert {"2.weight", "2.bias", "3.weight", "3.bias"} <= set(opt.fallback_params)
    assert opt.param_kinds["2.weight"] == "adam" and "groups=2" in dict(
        (r.block, r.reason) for r in opt.report)["2.weight"]
    losses = []
    for t in range(25):
        opt.zero_grad()
        loss = F.cross_entropy(model(X), y)
        loss.backward()
        opt.step(loss=loss)
        losses.append(float(loss))
    assert opt.layers["0"].locations == 36
    assert losses[-1] < losses[0]
    # A different input size changes T: sent with the step (raw statistics).
    opt.zero_grad()
    model[0](torch.randn(4, 1, 8, 8)).sum().backward()
    opt.step()
    assert opt.layers["0"].locations == 64 and set(opt.last_result) == {"0"}
    opt.close(delete=True)


def test_sampled_fisher(target):
    torch.manual_seed(0)
    X = torch.randn(128, 8)
    y = (X[:, 0] > 0).long()
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
    opt = natgrad.torch.KFAC(model, target=target, lr=0.1, damping=1e-2, fisher="sampled")
    # sample_fisher leaves .grad alone.
    logits = model(X)
    loss = F.cross_entropy(logits, y)
    opt.zero_grad()
    opt.sample_fisher(logits, generator=torch.Generator().manual_seed(0))
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in model.parameters())
    loss.backward()
    g_expected = torch.autograd.grad(F.cross_entropy(model(X), y), model[0].weight)[0]
    assert torch.allclose(model[0].weight.grad, g_expected)
    opt.step()
    first = float(loss)
    for _ in range(20):
        logits = model(X)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad()
        opt.sample_fisher(logits)
        loss.backward()
        opt.step()
    assert float(loss) < first
    # Forgetting sample_fisher is an error naming the layer; nothing applied.
    snap = snapshot(model)
    opt.zero_grad()
    F.cross_entropy(model(X), y).backward()
    with pytest.raises(natgrad.FailedPrecondition, match="layer '0'"):
        opt.step()
    assert_unchanged(model, snap)
    opt.close(delete=True)


def test_errors_leave_the_model_unchanged(target):
    model = mlp()
    x, y = batch()
    opt = natgrad.torch.KFAC(model, target=target, lr=0.1, damping=1e-2)
    # No backward yet.
    with pytest.raises(natgrad.FailedPrecondition, match="backward"):
        opt.step()
    # A NaN gradient: rejected before sending, naming the layer and field.
    snap = snapshot(model)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    model[3].weight.grad[0, 0] = float("nan")
    with pytest.raises(natgrad.InvalidArgument) as e:
        opt.step()
    assert e.value.block == "3" and e.value.field == "gradient"
    assert_unchanged(model, snap)
    # The same step succeeds afterwards (the step number was not consumed).
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert opt.last_result.step == 1
    # Session deleted underneath: NotFound, nothing applied.
    opt.session.close()
    opt.client.delete_session(opt.session.name)
    snap = snapshot(model)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(natgrad.NotFound):
        opt.step()
    assert_unchanged(model, snap)
    opt.close()


def test_server_unreachable_raises_at_construction():
    model = mlp()
    c = natgrad.Client("127.0.0.1:1", timeout=2.0, retry=natgrad.RetryPolicy(max_attempts=1, deadline_s=1))
    with pytest.raises(natgrad.Unavailable, match="127.0.0.1:1"):
        natgrad.torch.KFAC(model, client=c)
    assert not model[0]._forward_hooks  # nothing left behind


def test_resume_from_state_dict(target):
    model = mlp()
    x, y = batch()
    opt = natgrad.torch.KFAC(model, target=target, lr=0.1, damping=1e-2)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    sd = opt.state_dict()
    assert sd["natgrad"]["next_step"] == 4 and sd["natgrad"]["step"] == 3
    opt.close()
    opt2 = natgrad.torch.KFAC(model, target=target, session=sd["natgrad"]["session"])
    opt2.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt2.step()
    assert opt2.last_result.step == 4
    opt2.close(delete=True)
