"""natgrad.torch.KFAC on models that real training jobs use: a Transformer
encoder (nn.MultiheadAttention), a CNN whose input size changes, a branch
unused on alternate steps, a tied-embedding LM, sparse embeddings, a layer
used functionally. Real server; tiny models so that each test takes seconds."""
import logging
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import natgrad  # noqa: E402
import natgrad.torch  # noqa: E402
import kfac_reference as ref  # noqa: E402


def train(opt, model, batches, steps, loss_fn):
    losses = []
    for t in range(steps):
        opt.zero_grad()
        loss = loss_fn(model, batches(t))
        loss.backward()
        opt.step(loss=loss)
        losses.append(float(loss))
    return losses


def reasons(opt):
    return {p: r.reason for r in opt.report for p in r.params}


class Encoder(nn.Module):
    def __init__(self, vocab=10, d=16, classes=2):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.enc = nn.TransformerEncoderLayer(d, nhead=2, dim_feedforward=32, dropout=0.0,
                                              batch_first=True)
        self.head = nn.Linear(d, classes)

    def forward(self, tokens):
        return self.head(self.enc(self.emb(tokens)))


def test_transformer_encoder(target, caplog):
    torch.manual_seed(0)
    model = Encoder()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 10, (256, 6), generator=g)
    # Per token: is it larger than the sequence's mean (needs attention).
    labels = (tokens.float() > tokens.float().mean(1, keepdim=True)).long()
    with caplog.at_level(logging.INFO, logger="natgrad.torch"), \
            warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        opt = natgrad.torch.KFAC(model, target=target, lr=0.1, damping=1e-2, fallback_lr=3e-3)
    kinds = opt.param_kinds
    assert {k: kinds[k] for k in ("enc.linear1.weight", "enc.linear1.bias", "enc.linear2.weight",
                                  "head.weight", "head.bias")} == dict.fromkeys(
        ["enc.linear1.weight", "enc.linear1.bias", "enc.linear2.weight", "head.weight", "head.bias"],
        "kfac")
    for p in ("enc.self_attn.out_proj.weight", "enc.self_attn.out_proj.bias",
              "enc.self_attn.in_proj_weight", "enc.self_attn.in_proj_bias",
              "enc.norm1.weight", "emb.weight"):
        assert kinds[p] == "adam", p
    assert "MultiheadAttention" in reasons(opt)["enc.self_attn.out_proj.weight"]
    assert "MultiheadAttention" in reasons(opt)["enc.self_attn.in_proj_weight"]
    # Every trainable parameter is in the report exactly once.
    listed = [p for r in opt.report for p in r.params]
    assert sorted(listed) == sorted(n for n, _ in model.named_parameters())
    # Reported once: one INFO record with the table, one warning naming out_proj.
    recs = [r for r in caplog.records if r.name == "natgrad.torch"]
    assert len(recs) == 1 and "enc.self_attn.out_proj" in recs[0].getMessage()
    assert "enc.self_attn.out_proj.weight" in opt.format_report()
    ws = [x for x in w if "natgrad.torch" in str(x.message)]
    assert len(ws) == 1 and "'enc.self_attn.out_proj'" in str(ws[0].message)

    def loss_fn(m, idx):
        return F.cross_entropy(m(tokens[idx]).reshape(-1, 2), labels[idx].reshape(-1))

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no hook-did-not-fire warnings while training
        losses = train(opt, model, lambda t: torch.arange(t * 32, t * 32 + 32) % 256, 30, loss_fn)
    with torch.no_grad():
        final = float(loss_fn(model, torch.arange(256)))
    assert final < 0.8 * losses[0], (losses[0], final)
    # Every parameter moved: out_proj / in_proj through their Adam blocks.
    assert set(opt.last_result) == {r.block for r in opt.report}
    opt.close(delete=True)


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 2))


def images(n, size, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, size, size, generator=g)
    y = (x[:, :, : size // 2].mean((1, 2, 3)) > x[:, :, size // 2:].mean((1, 2, 3))).long()
    return x, y


def test_cnn_input_size_changes_between_steps(target):
    model = small_cnn()
    opt = natgrad.torch.KFAC(model, target=target, lr=0.1, damping=1e-2, reduce=False)
    assert opt.param_kinds == {"0.weight": "kfac", "0.bias": "kfac", "2.weight": "kfac",
                               "2.bias": "kfac", "6.weight": "kfac", "6.bias": "kfac"}
    sizes = [8, 12, 10]
    data = {s: images(64, s, s) for s in sizes}
    losses = {s: [] for s in sizes}
    for t in range(24):
        s = sizes[t % 3]
        opt.zero_grad()
        loss = F.cross_entropy(model(data[s][0]), data[s][1])
        loss.backward()
        opt.step(loss=loss)
        assert opt.layers["0"].locations == s * s
        assert opt.layers["2"].locations == ((s - 3) // 2 + 1) ** 2
        losses[s].append(float(loss))
    for s in sizes:  # each size's loss went down
        assert losses[s][-1] < losses[s][0], losses
    # Two micro-batches of different sizes in one step: reduced factors.
    opt.accumulation_steps = 2
    opt.zero_grad()
    for s in (8, 12):
        (F.cross_entropy(model(data[s][0]), data[s][1]) / 2).backward()
    inputs = opt.collect()
    assert "a_factor" in inputs["0"] and inputs["0"]["num_examples"] == 128
    opt.step()
    assert set(opt.last_result) == set(opt.layers)
    opt.close(delete=True)


def test_conv_raw_statistics_with_per_step_locations_match_reduced(target):
    """Raw rows at a spatial size other than the block's configured one are
    scaled by that step's T (A over n, G over n*T), exactly like the factors
    the client reduces itself: two steps at 8x8 then 12x12, both ways."""
    deltas = {}
    for reduce in (False, True):
        model = small_cnn().double()
        opt = natgrad.torch.KFAC(model, target=target, lr=0.1, damping=1e-2, reduce=reduce,
                                 state_dtype="float64", inverse_period=1, kl_clip=None)
        got = []
        for s in (8, 12):
            x, y = images(16, s, s)
            opt.zero_grad()
            F.cross_entropy(model(x.double()), y).backward()
            opt.step()
            got.append({k: opt.last_result[k] for k in ("0", "2")})
        deltas[reduce] = got
        opt.close(delete=True)
    for raw, red in zip(deltas[False], deltas[True]):
        for k in raw:
            np.testing.assert_allclose(raw[k], red[k], rtol=1e-9, atol=1e-12, err_msg=k)


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Linear(6, 8)
        self.head_a = nn.Linear(8, 3)
        self.head_b = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 2))

    def forward(self, x, task):
        h = torch.tanh(self.trunk(x))
        return self.head_a(h) if task == "a" else self.head_b(h)


def test_branch_unused_on_alternate_steps(target):
    torch.manual_seed(0)
    model = TwoHeads().double()
    g = torch.Generator().manual_seed(2)
    X = torch.randn(128, 6, generator=g, dtype=torch.float64)
    ya = (X[:, 0] + X[:, 1] > 0).long() + (X[:, 2] > 1).long()
    yb = (X[:, 3] * X[:, 4] > 0).long()
    lr, adam_lr = 0.2, 1e-3
    opt = natgrad.torch.KFAC(model, target=target, lr=lr, damping=1e-2, kl_clip=None, momentum=0.0,
                             inverse_period=1, fallback_lr=adam_lr, state_dtype="float64")
    assert opt.param_kinds["head_b.1.weight"] == "kfac"
    assert opt.param_kinds["head_b.0.weight"] == "adam"

    # Step 1 trains task a: head_b is not in the request, so it is untouched.
    b_before = {k: v.clone() for k, v in model.head_b.state_dict().items()}
    opt.zero_grad()
    F.cross_entropy(model(X, "a"), ya).backward()
    opt.step()
    assert set(opt.last_result) == {"trunk", "head_a"}
    for k, v in model.head_b.state_dict().items():
        assert torch.equal(v, b_before[k]), k

    # Step 2 trains task b for the first time: its blocks' state and counters
    # did not advance in step 1, so their update is a first update (EMA
    # factors = this batch's, Adam's bias correction at its first step).
    xb, n = X, X.shape[0]
    h = torch.tanh(model.trunk(xb)).detach()
    ln, lin = model.head_b
    z = F.layer_norm(h, (8,), ln.weight, ln.bias, ln.eps)
    s = z @ lin.weight.T + lin.bias
    loss = F.cross_entropy(s, yb)
    ds, gW, gb, glw = torch.autograd.grad(loss, [s, lin.weight, lin.bias, ln.weight])
    npy = lambda t: t.detach().numpy()  # noqa: E731
    want, _ = ref.first_step({"b": dict(grad=np.concatenate([npy(gW), npy(gb)[:, None]], 1), a=npy(z),
                                        g=n * npy(ds), bias=True)}, lr=lr, damping=1e-2, kl_clip=None)
    opt.zero_grad()
    F.cross_entropy(model(X, "b"), yb).backward()
    opt.step()
    assert "head_a.weight" not in opt.last_result and "head_a" not in opt.last_result
    np.testing.assert_allclose(opt.last_result["head_b.1"], want["b"], rtol=1e-7, atol=1e-12)
    np.testing.assert_allclose(opt.last_result["head_b.0.weight"], ref.adam_first_step(npy(glw), adam_lr),
                               rtol=1e-7, atol=1e-12)

    # Alternate for 20+ more steps: both tasks' losses go down.
    first = {"a": None, "b": None}
    last = {}
    for t in range(24):
        task = "ab"[t % 2]
        y = ya if task == "a" else yb
        opt.zero_grad()
        loss = F.cross_entropy(model(X, task), y)
        loss.backward()
        opt.step(loss=loss)
        first[task] = first[task] if first[task] is not None else float(loss)
        last[task] = float(loss)
    assert last["a"] < first["a"] and last["b"] < first["b"], (first, last)
    opt.close(delete=True)


class TiedLM(nn.Module):
    def __init__(self, vocab=12, d=16):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mix = nn.Linear(2 * d, d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.emb.weight  # tied

    def forward(self, prev2, prev1):
        h = torch.tanh(self.mix(torch.cat([self.emb(prev2), self.emb(prev1)], -1)))
        return self.lm_head(h)


def test_tied_embedding_language_model(target):
    torch.manual_seed(0)
    model = TiedLM()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        opt = natgrad.torch.KFAC(model, target=target, lr=0.1, damping=1e-2, fallback_lr=1e-2)
    assert opt.param_kinds == {"mix.weight": "kfac", "mix.bias": "kfac", "emb.weight": "adam"}
    r = {x.module: x for x in opt.report}
    assert r["emb"].reason.startswith("tied") and "'lm_head.weight'" in r["emb"].reason
    assert "lm_head" not in opt.layers
    assert any("'lm_head'" in str(x.message) and "tied" in str(x.message) for x in w)
    # A deterministic language: next = (2 * prev1 + prev2) mod 12.
    g = torch.Generator().manual_seed(3)
    seq = [int(v) for v in torch.randint(0, 12, (2,), generator=g)]
    for _ in range(600):
        seq.append((2 * seq[-1] + seq[-2]) % 12)
    s = torch.tensor(seq)
    p2, p1, nxt = s[:-2], s[1:-1], s[2:]

    def loss_fn(m, idx):
        return F.cross_entropy(m(p2[idx], p1[idx]), nxt[idx])

    losses = train(opt, model, lambda t: torch.arange(t * 64, t * 64 + 64) % len(nxt), 30, loss_fn)
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses
    assert model.lm_head.weight is model.emb.weight
    opt.close(delete=True)


def test_sparse_embedding_gradient_is_densified(target):
    torch.manual_seed(0)
    model = nn.Sequential(nn.EmbeddingBag(20, 8, mode="mean", sparse=True), nn.Linear(8, 2))
    opt = natgrad.torch.KFAC(model, target=target, lr=0.1, damping=1e-2, fallback_lr=1e-2)
    assert opt.param_kinds["0.weight"] == "adam" and "densified" in reasons(opt)["0.weight"]
    g = torch.Generator().manual_seed(4)
    bags = torch.randint(0, 20, (128, 4), generator=g)
    y = ((bags < 10).sum(1) > 2).long()
    losses = train(opt, model, lambda t: torch.arange(t * 32, t * 32 + 32) % 128, 20,
                   lambda m, i: F.cross_entropy(m(bags[i]), y[i]))
    assert losses[-1] < losses[0]
    assert opt.last_result["0.weight"].shape == (20, 8)
    opt.close(delete=True)
    # Preconditioner mode: the sparse .grad is the user's optimizer's business.
    pre = natgrad.torch.KFACPreconditioner(model, target=target, damping=1e-2)
    assert pre.param_kinds == {"0.weight": "untouched", "1.weight": "kfac", "1.bias": "kfac"}
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    sgd.zero_grad()
    F.cross_entropy(model(bags[:32]), y[:32]).backward()
    raw = model[1].weight.grad.clone()
    pre.step()
    assert model[0].weight.grad.is_sparse
    assert not torch.equal(model[1].weight.grad, raw)
    sgd.step()
    pre.close(delete=True)


class Functional(nn.Module):
    """Uses fc's weights without calling fc.forward: the hook never fires."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(torch.tanh(F.linear(x, self.fc.weight, self.fc.bias)))


def test_layer_whose_hook_does_not_fire_is_left_out_with_one_warning(target):
    torch.manual_seed(0)
    model = Functional()
    opt = natgrad.torch.KFAC(model, target=target, lr=0.1, damping=1e-2)
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    fc_before = model.fc.weight.detach().clone()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    msgs = [str(m.message) for m in w if "layer 'fc'" in str(m.message)]
    assert len(msgs) == 1 and "skip_layers" in msgs[0]
    assert set(opt.last_result) == {"out"}
    assert torch.equal(model.fc.weight, fc_before)
    opt.close(delete=True)
    # skip_layers gives it the first-order block: it trains.
    opt = natgrad.torch.KFAC(model, target=target, lr=0.1, damping=1e-2, skip_layers=["fc"])
    assert opt.param_kinds["fc.weight"] == "adam" and reasons(opt)["fc.weight"] == "in skip_layers"
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert not torch.equal(model.fc.weight, fc_before)
    opt.close(delete=True)
