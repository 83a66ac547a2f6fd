"""natgrad.torch.Shampoo against a real server: a tiny MLP trains."""
import pytest

torch = pytest.importorskip("torch")
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import natgrad  # noqa: E402
import natgrad.torch  # noqa: E402
from natgrad import blocks  # noqa: E402
from torch_dense_helpers import assert_trains_mlp, train  # noqa: E402


def test_shampoo_trains_a_tiny_mlp(client):
    torch.manual_seed(0)
    # fc1.weight is 16 x 10 with max_preconditioner_dim 8: blocked factors.
    model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 3))
    opt = natgrad.torch.Shampoo(model, client=client, lr=0.05, max_preconditioner_dim=8,
                                precondition_frequency=5, start_preconditioning_step=2)
    kinds = {b.name: b.WhichOneof("kind") for b in opt.session.config.blocks}
    assert kinds == {n: "shampoo" for n, _ in model.named_parameters()}
    losses = assert_trains_mlp(opt, model, 30)
    assert all(b < a for a, b in zip(losses[::10], losses[10::10])), losses
    opt.close(delete=True)


def test_shampoo_lr_from_param_groups_is_sent(client):
    torch.manual_seed(1)
    model = nn.Linear(4, 3)
    opt = natgrad.torch.Shampoo(model, client=client, lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    opt.param_groups[0]["lr"] = 0.0
    F.mse_loss(model(torch.randn(8, 4)), torch.randn(8, 3)).backward()
    opt.step()
    for b, p in zip(before, model.parameters()):
        assert torch.equal(b, p)  # lr 0 from param_groups: no change
    opt.close(delete=True)


def test_shampoo_config_helper_validates():
    c = blocks.shampoo("w", [4, 3], lr=0.1, grafting="sgd", inverse_root=2, beta1=0.0)
    assert c.shampoo.grafting == blocks.blocks_pb2.SHAMPOO_GRAFTING_SGD
    assert c.shampoo.inverse_root_override == 2
    assert c.shampoo.HasField("beta1") and c.shampoo.beta1 == 0.0
    with pytest.raises(ValueError, match="grafting"):
        blocks.shampoo("w", [4, 3], grafting="lion")
    with pytest.raises(ValueError, match="max_preconditioner_dim"):
        blocks.shampoo("w", [4, 3], max_preconditioner_dim=0)


def test_server_names_block_and_field_for_a_bad_config(client):
    with pytest.raises(natgrad.errors.InvalidArgument, match=r'block "w".*shampoo.beta2'):
        client.create_session([blocks.shampoo("w", [4, 3], beta2=1.5)])


def test_shampoo_trains_a_conv_net_with_rank4_weights(client):
    # conv.weight [4, 2, 3, 3] merges (max 16) to [8, 9]: two Shampoo factors.
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    opt = natgrad.torch.Shampoo(model, client=client, lr=0.05, max_preconditioner_dim=16,
                                state_dtype="float64")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(32, 2, 6, 6, generator=g)
    y = (x.mean(dim=(1, 2, 3)) > 0).long()
    losses = train(opt, model, x, y, 25)
    assert losses[-1] < 0.5 * losses[0], losses
    snap = opt.session.export()
    conv = next(b for b in snap.blocks if b.name == "0.weight")
    assert list(conv.tensors["left_factor.0"].shape) == [8, 8]
    opt.close(delete=True)
