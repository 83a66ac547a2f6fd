"""Shared by the tests of the torch optimizers built on
natgrad.torch_dense.DenseBlockOptimizer (Shampoo, SOAP): the tiny-MLP
classification data and the training loop."""
import numpy as np
import torch
import torch.nn.functional as F


def mlp_data():
    """64 points in 10-D, labels from a random linear map to 3 classes."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 10, generator=g)
    w = torch.randn(10, 3, generator=g)
    y = (x @ w).argmax(dim=1)
    return x, y


def train(opt, model, x, y, steps):
    """steps full-batch cross-entropy steps; the losses before each."""
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return losses


def assert_trains_mlp(opt, model, steps=30):
    """Trains on mlp_data: every step applied, finite, loss at least halved."""
    x, y = mlp_data()
    losses = train(opt, model, x, y, steps)
    assert opt.last_result.step == steps
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0], losses
    return losses
