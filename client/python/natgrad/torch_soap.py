"""natgrad.torch.SOAP: a torch optimizer whose SOAP state (Vyas et al. 2024:
Adam in the eigenbasis of Shampoo's factors) lives on natgrad-server. Every
trainable parameter is one ``soap`` block (its gradient viewed as
[shape[0], prod(rest)], rank > 2 merged as the shampoo kind does; 1-D
parameters are plain Adam)::

    opt = natgrad.torch.SOAP(model, target="localhost:50051", lr=3e-3)
    for x, y in loader:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

The defaults are the authors' reference (lr 3e-3, betas (0.95, 0.95),
shampoo_beta = betas[1], eps 1e-8, weight_decay 0.01, precondition_frequency
10, max_precond_dim 10000). As there, the first step only builds the
eigenbases and leaves the parameters unchanged. A numeric ``lr`` in
``param_groups`` is sent with every step (so torch LR schedulers work); a
natgrad.schedules message is evaluated on the server. The other
hyperparameters are fixed at construction (blocks.soap).
"""
import numpy as np
import torch

import natgrad
from natgrad import blocks as _blocks
from natgrad import errors

__all__ = ["SOAP"]


def _number(v):
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if torch.is_tensor(v) and v.numel() == 1:
        return float(v)
    return None


class SOAP(torch.optim.Optimizer):
    """SOAP through natgrad-server for a torch.nn.Module.

    model: the module (every parameter with requires_grad becomes a block).
    target / client: where the server is (or a natgrad.Client).
    lr, weight_decay: numbers or natgrad.schedules (weight_decay 0 turns it
    off; otherwise every step sends the parameters). betas, shampoo_beta
    (None or negative: betas[1]), eps, precondition_frequency,
    max_precond_dim, correct_bias: as the reference's keywords. refresh:
    'power_qr' (the reference: one power iteration + QR) or 'eigh'.
    state_dtype: "float32" (default) or "float64".
    """

    def __init__(self, model, target=None, *, client=None, token=None, tls=None, lr=3e-3,
                 betas=(0.95, 0.95), shampoo_beta=None, eps=1e-8, weight_decay=0.01,
                 precondition_frequency=10, max_precond_dim=10000, correct_bias=True,
                 refresh=None, state_dtype=None, display_name=None):
        self.model = model
        self.params_by_name = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not self.params_by_name:
            raise ValueError("natgrad.torch.SOAP: the model has no trainable parameters")
        if shampoo_beta is not None and shampoo_beta < 0:
            shampoo_beta = None  # the reference's "use betas[1]"
        super().__init__(list(self.params_by_name.values()), dict(lr=lr, weight_decay=weight_decay))
        self._weight_decay = weight_decay
        if client is None:
            if target is None:
                raise ValueError("natgrad.torch.SOAP: give target='host:port' or client=")
            client = natgrad.Client(target, token=token, tls=tls)
        self.client = client
        beta1, beta2 = betas
        configs = [_blocks.soap(n, list(p.shape) or [1], lr=lr, weight_decay=weight_decay,
                                beta1=beta1, beta2=beta2, shampoo_beta=shampoo_beta, eps=eps,
                                precondition_frequency=precondition_frequency,
                                max_precond_dim=max_precond_dim, refresh=refresh,
                                bias_correction=correct_bias)
                   for n, p in self.params_by_name.items()]
        self.session = client.create_session(
            configs, state_dtype=state_dtype,
            display_name=display_name or f"torch soap {type(model).__name__}")
        self.last_result = None

    def zero_grad(self, set_to_none=True):
        super().zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure=None):
        """Sends every parameter that has a gradient and applies the deltas."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        if group["weight_decay"] is not self._weight_decay and group["weight_decay"] != self._weight_decay:
            raise errors.FailedPrecondition(
                "param_groups[0]['weight_decay'] changed: natgrad applies the weight_decay given at "
                "construction on the server (only 'lr' may be changed)", field="weight_decay")
        lr = _number(group["lr"])
        inputs, lrs = {}, {}
        for name, p in self.params_by_name.items():
            if p.grad is None:
                continue  # left out: the server keeps the block's state
            g = p.grad
            if g.layout != torch.strided:
                g = g.to_dense()
            if g.dtype not in (torch.float32, torch.float64):
                g = g.float()
            x = {"gradient": g.detach().cpu().numpy().reshape(list(p.shape) or [1])}
            if self._weight_decay:
                x["params"] = p.detach().cpu().to(g.dtype).numpy().reshape(list(p.shape) or [1])
            inputs[name] = x
            if lr is not None:
                if not lr >= 0:
                    raise errors.InvalidArgument(f"block '{name}': learning rate {lr} from "
                                                 "param_groups, want >= 0", block=name,
                                                 field="learning_rate")
                lrs[name] = lr
        if not inputs:
            raise errors.FailedPrecondition("step(): no parameter has a gradient; call "
                                            "loss.backward() first")
        msgs = {}
        for name, x in inputs.items():
            bs = self.session._block_step(name, x)
            if name in lrs:
                bs.learning_rate = lrs[name]
            msgs[name] = bs
        result = self.session.step(msgs)
        updates = []
        for name in inputs:
            p = self.params_by_name[name]
            d = result[name]
            if d.size != p.numel() or not np.all(np.isfinite(d)):
                raise errors.Internal(f"step {result.step}: block '{name}': bad delta "
                                      f"(shape {list(d.shape)}, want {list(p.shape)})", block=name)
            updates.append((p, torch.as_tensor(np.ascontiguousarray(d).reshape(p.shape),
                                               dtype=p.dtype, device=p.device)))
        for p, d in updates:
            p.add_(d)
        self.last_result = result
        return loss

    def close(self, delete=False):
        if delete:
            self.session.delete()
        else:
            self.session.close()
