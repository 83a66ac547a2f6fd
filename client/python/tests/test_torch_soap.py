"""natgrad.torch.SOAP against a real server: each step's update equals a numpy
transcription of the authors' reference step (github.com/nikhilvyas/SOAP,
soap.py), and a tiny MLP trains."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import natgrad  # noqa: E402
import natgrad.torch  # noqa: E402
from natgrad import blocks  # noqa: E402
from torch_dense_helpers import assert_trains_mlp  # noqa: E402


class NumpySoap:
    """One parameter's reference SOAP state, transcribed in the reference's
    order (exp_avg kept in the eigenbasis and rotated back and forth at every
    preconditioner update; the first call only builds the bases)."""

    def __init__(self, shape, lr, betas, shampoo_beta, eps, wd, freq, max_dim):
        self.lr, self.b1, self.b2 = lr, betas[0], betas[1]
        self.bs, self.eps, self.wd, self.freq = shampoo_beta, eps, wd, freq
        self.vector = len(shape) == 1
        rows, cols = (shape[0], 1) if self.vector else shape
        self.on = [not self.vector and rows <= max_dim, not self.vector and cols <= max_dim]
        self.gg = [np.zeros((rows, rows)), np.zeros((cols, cols))]
        self.q = None
        self.step = 0
        self.exp_avg = np.zeros((rows, cols))
        self.exp_avg_sq = np.zeros((rows, cols))

    def project(self, x):
        if self.on[0]:
            x = self.q[0].T @ x
        if self.on[1]:
            x = x @ self.q[1]
        return x

    def project_back(self, x):
        if self.on[0]:
            x = self.q[0] @ x
        if self.on[1]:
            x = x @ self.q[1].T
        return x

    def update_preconditioner(self, g):
        if self.q is not None:
            self.exp_avg = self.project_back(self.exp_avg)
        outer = [g @ g.T, g.T @ g]
        for i in range(2):
            if self.on[i]:
                self.gg[i] = self.gg[i] + (1 - self.bs) * (outer[i] - self.gg[i])
        if self.q is None:
            self.q = [np.linalg.eigh(m)[1][:, ::-1] if on else None
                      for m, on in zip(self.gg, self.on)]
        if self.step > 0 and self.step % self.freq == 0:
            for i in range(2):
                if not self.on[i]:
                    continue
                o = self.q[i]
                est = np.diag(o.T @ self.gg[i] @ o)
                idx = np.argsort(-est, kind="stable")
                self.exp_avg_sq = np.take(self.exp_avg_sq, idx, axis=i)
                self.q[i] = np.linalg.qr(self.gg[i] @ o[:, idx])[0]
        if self.step > 0:
            self.exp_avg = self.project(self.exp_avg)

    def delta(self, g, p):
        g = g.reshape(self.exp_avg.shape)
        p = p.reshape(self.exp_avg.shape)
        if self.q is None:
            self.update_preconditioner(g)
            return np.zeros_like(g)
        gp = self.project(g)
        self.step += 1
        self.exp_avg = self.b1 * self.exp_avg + (1 - self.b1) * gp
        self.exp_avg_sq = self.b2 * self.exp_avg_sq + (1 - self.b2) * gp * gp
        denom = np.sqrt(self.exp_avg_sq) + self.eps
        s = self.lr * np.sqrt(1 - self.b2 ** self.step) / (1 - self.b1 ** self.step)
        new = p - s * self.project_back(self.exp_avg / denom)
        new = new - self.lr * self.wd * new
        self.update_preconditioner(g)
        return new - p


def test_soap_updates_equal_the_reference_transcription(client):
    torch.manual_seed(0)
    # weight 3 x 5 with max_precond_dim 4: left factor only; bias: plain Adam;
    # w2 2 x 3: both factors.
    model = nn.Sequential(nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 2, bias=False)).double()
    hp = dict(lr=0.05, betas=(0.9, 0.95), shampoo_beta=0.8, eps=1e-8, weight_decay=0.01)
    opt = natgrad.torch.SOAP(model, client=client, precondition_frequency=3, max_precond_dim=4,
                             state_dtype="float64", **hp)
    kinds = {b.name: b.WhichOneof("kind") for b in opt.session.config.blocks}
    assert kinds == {n: "soap" for n, _ in model.named_parameters()}
    ref = {n: NumpySoap(list(p.shape), hp["lr"], hp["betas"], hp["shampoo_beta"], hp["eps"],
                        hp["weight_decay"], 3, 4)
           for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(1)
    for step in range(1, 11):  # refreshes after steps 4, 7, 10
        # A fresh batch each step: the first step leaves the weights as they
        # are, and a repeated gradient would have only round-off along the
        # null space of the first (rank-deficient) factor, where Adam's ratio
        # m / (sqrt(v) + eps) is round-off over round-off.
        x = torch.randn(16, 5, generator=g, dtype=torch.float64)
        y = torch.randn(16, 2, generator=g, dtype=torch.float64)
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        before = {n: p.detach().clone().numpy() for n, p in model.named_parameters()}
        grads = {n: p.grad.detach().clone().numpy() for n, p in model.named_parameters()}
        opt.step()
        for n, p in model.named_parameters():
            got = p.detach().numpy() - before[n]
            want = ref[n].delta(grads[n], before[n]).reshape(got.shape)
            if step == 1:
                assert np.all(got == 0), n  # the first step only builds the bases
                continue
            scale = np.max(np.abs(want))
            assert scale > 0
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-9 * scale,
                                       err_msg=f"step {step} block {n}")
    snap = opt.session.export()
    w0 = next(b for b in snap.blocks if b.name == "0.weight")
    assert "left_basis" in w0.tensors and "right_basis" not in w0.tensors
    opt.close(delete=True)


def test_soap_trains_a_tiny_mlp(client):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 3))
    opt = natgrad.torch.SOAP(model, client=client, lr=0.02, precondition_frequency=5)
    assert_trains_mlp(opt, model, 30)
    opt.close(delete=True)


def test_soap_lr_from_param_groups_is_sent(client):
    torch.manual_seed(1)
    model = nn.Linear(4, 3)
    opt = natgrad.torch.SOAP(model, client=client, lr=0.1)
    for lr in (0.1, 0.0):  # the first step builds the bases; the second uses lr 0
        opt.param_groups[0]["lr"] = lr
        before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        F.mse_loss(model(torch.randn(8, 4)), torch.randn(8, 3)).backward()
        opt.step()
        for b, p in zip(before, model.parameters()):
            assert torch.equal(b, p)
    opt.param_groups[0]["lr"] = 0.1
    opt.zero_grad()
    F.mse_loss(model(torch.randn(8, 4)), torch.randn(8, 3)).backward()
    before = model.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, model.weight)
    opt.close(delete=True)


def test_soap_config_helper_validates():
    c = blocks.soap("w", [4, 3], lr=0.1, refresh="eigh", beta1=0.0, weight_decay=0,
                    bias_correction=False)
    assert c.soap.refresh == blocks.blocks_pb2.SOAP_REFRESH_EIGH
    assert c.soap.HasField("beta1") and c.soap.beta1 == 0.0
    assert not c.soap.HasField("shampoo_beta")
    assert c.soap.HasField("bias_correction") and not c.soap.bias_correction
    assert c.soap.weight_decay.constant.value == 0.0
    assert c.soap.weight_decay.WhichOneof("kind") == "constant"
    with pytest.raises(ValueError, match="refresh"):
        blocks.soap("w", [4, 3], refresh="lanczos")
    with pytest.raises(ValueError, match="max_precond_dim"):
        blocks.soap("w", [4, 3], max_precond_dim=0)


def test_server_names_block_and_field_for_a_bad_soap_config(client):
    with pytest.raises(natgrad.errors.InvalidArgument, match=r'block "w".*soap.shampoo_beta'):
        client.create_session([blocks.soap("w", [4, 3], shampoo_beta=1.5)])
