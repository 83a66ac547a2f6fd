"""natgrad.torch.EKFAC against a real server: a tiny MLP's parameters after
each step equal a numpy/torch transcription of EKFAC (docs/math.md) computed
independently of the client's hooks; a small conv net trains; reduced
statistics are refused by the server naming the block."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import natgrad  # noqa: E402
import natgrad.torch  # noqa: E402
from natgrad import blocks, errors  # noqa: E402

LR, DAMPING, MOMENTUM, KAPPA, DECAY, PERIOD = 0.2, 1e-2, 0.5, 1e-2, 0.9, 2


class EkfacTranscription:
    """EKFAC for one layer, from the paper's definitions: per-example
    gradients as dense matrices, numpy eigh of the bias-corrected EMA factors
    every PERIOD steps, the scaling E_i[(U_G^T G_i U_A)^2] as an EMA restarted
    in each new basis."""

    def __init__(self, d_a, d_out):
        self.A = np.zeros((d_a, d_a))
        self.G = np.zeros((d_out, d_out))
        self.w = 0.0
        self.S = np.zeros((d_out, d_a))
        self.sw = 0.0
        self.m = np.zeros((d_out, d_a))

    def direction(self, t, abar, g):
        n = abar.shape[0]
        self.A = DECAY * self.A + (1 - DECAY) * abar.T @ abar / n
        self.G = DECAY * self.G + (1 - DECAY) * g.T @ g / n
        self.w = DECAY * self.w + (1 - DECAY)
        if (t - 1) % PERIOD == 0:
            _, self.UA = np.linalg.eigh(self.A / self.w)
            _, self.UG = np.linalg.eigh(self.G / self.w)
            self.S[:] = 0
            self.sw = 0.0
        per_example = [np.outer(g[i], abar[i]) for i in range(n)]
        s = sum((self.UG.T @ Gi @ self.UA) ** 2 for Gi in per_example) / n
        self.S = DECAY * self.S + (1 - DECAY) * s
        self.sw = DECAY * self.sw + (1 - DECAY)
        grad = sum(per_example) / n  # the mean loss's gradient
        v = self.UG @ ((self.UG.T @ grad @ self.UA) / (self.S / self.sw + DAMPING)) @ self.UA.T
        return grad, v


def _mlp():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _batch(t):
    g = torch.Generator().manual_seed(100 + t)
    x = torch.randn(16, 4, generator=g, dtype=torch.float64)
    y = torch.randn(16, 3, generator=g, dtype=torch.float64)
    return x, y


def _statistics(model, x, y):
    """Per layer: (abar, per-example output gradients) by plain autograd on a
    functional copy of the forward pass (not the client's hooks)."""
    l1, l2 = model[0], model[2]
    h1 = x @ l1.weight.T + l1.bias
    z = torch.tanh(h1)
    out = z @ l2.weight.T + l2.bias
    loss = F.mse_loss(out, y)
    g1, g2 = torch.autograd.grad(loss, [h1, out])
    n = x.shape[0]
    ones = torch.ones(n, 1, dtype=x.dtype)
    # Per-example loss gradients: the mean loss's times n.
    return {"0": (torch.cat([x, ones], 1).detach().numpy(), (n * g1).numpy()),
            "2": (torch.cat([z, ones], 1).detach().numpy(), (n * g2).numpy())}


def test_ekfac_mlp_equals_transcription(client):
    model = _mlp()
    ref = {name: p.detach().numpy().copy() for name, p in model.named_parameters()}
    opt = natgrad.torch.EKFAC(model, client=client, lr=LR, damping=DAMPING, momentum=MOMENTUM,
                              kl_clip=KAPPA, ema_decay=DECAY, inverse_period=PERIOD,
                              state_dtype="float64")
    assert {b.WhichOneof("kind") for b in opt.session.config.blocks} == {"ekfac"}
    layers = {"0": EkfacTranscription(5, 6), "2": EkfacTranscription(7, 3)}
    for t in range(1, 7):
        x, y = _batch(t)
        # The transcription sees the parameters before this step's update.
        stats = _statistics(model, x, y)
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
        dirs = {k: L.direction(t, *stats[k]) for k, L in layers.items()}
        kl = sum(LR ** 2 * np.sum(v * g) for g, v in dirs.values())
        nu = min(1.0, np.sqrt(KAPPA / abs(kl)))
        assert opt.last_result.kl_clip_scale == pytest.approx(nu, rel=1e-9)
        for k, L in layers.items():
            L.m = MOMENTUM * L.m + nu * dirs[k][1]
            delta = -LR * L.m
            ref[f"{k}.weight"] += delta[:, :-1]
            ref[f"{k}.bias"] += delta[:, -1]
        for name, p in model.named_parameters():
            want = ref[name]
            got = p.detach().numpy()
            assert np.max(np.abs(got - want)) <= 1e-9 * np.max(np.abs(want)), (t, name)
    opt.close(delete=True)


def test_ekfac_conv_net_trains(client):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    opt = natgrad.torch.EKFAC(model, client=client, lr=0.1, damping=1e-2, inverse_period=3)
    kinds = {b.name: b.WhichOneof("kind") for b in opt.session.config.blocks}
    assert kinds == {"0": "ekfac", "3": "ekfac"}
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 2, 6, 6, generator=g)
    y = torch.randn(32, 3, generator=g)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step(loss=loss)
        losses.append(float(loss))
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.7 * losses[0], losses
    assert opt.layers["0"].locations == 16  # 4 x 4 output positions, sent raw
    opt.close(delete=True)


def test_ekfac_refuses_kfac_only_arguments(client):
    for kw in ({"reduce": True}, {"damping_mode": "eigen"}, {"stats_period": 2},
               {"async_inversion": True}):
        with pytest.raises(TypeError, match="does not take"):
            natgrad.torch.EKFAC(_mlp(), client=client, **kw)


def test_server_refuses_reduced_statistics_naming_the_block(client):
    s = client.create_session([blocks.ekfac("fc", 3, 2, bias=True, lr=0.1)])
    with pytest.raises(errors.InvalidArgument) as e:
        s.step({"fc": {"gradient": np.zeros((2, 4)), "a_factor": np.eye(4),
                       "g_factor": np.eye(2), "num_examples": 8}})
    assert 'block "fc"' in str(e.value) and "ekfac needs raw statistics" in str(e.value)
    assert s.next_step == 1
    r = s.step({"fc": {"gradient": np.ones((2, 4)), "activations": np.ones((8, 3)),
                       "output_gradients": np.ones((8, 2))}})
    assert r.step == 1 and np.all(np.isfinite(r["fc"]))
    s.delete()


def test_ekfac_config_helper():
    c = blocks.ekfac("conv", 18, 8, bias=False, lr=0.1, damping=1e-3, ema_decay=0.9,
                     inverse_period=4, locations=25)
    assert list(c.shape) == [8, 18]
    assert c.ekfac.inverse_period == 4 and c.ekfac.locations == 25 and not c.ekfac.has_bias
    assert c.ekfac.learning_rate.constant.value == pytest.approx(0.1)
    with pytest.raises(ValueError):
        blocks.ekfac("x", 3, 2, ema_decay=1.0)
