"""The shared body of natgrad's torch optimizers in which every trainable
parameter is one server block fed a plain dense gradient (natgrad.torch.Shampoo,
natgrad.torch.SOAP). A subclass names itself and builds each parameter's
block config; session creation, step() and close() are the same for all.
"""
import numpy as np
import torch

import natgrad
from natgrad import errors

__all__ = ["DenseBlockOptimizer"]


def _number(v):
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if torch.is_tensor(v) and v.numel() == 1:
        return float(v)
    return None


class DenseBlockOptimizer(torch.optim.Optimizer):
    """A torch optimizer with one dense-gradient server block per parameter.

    Subclasses set ``_public_name`` (as in error messages:
    "natgrad.torch.Shampoo"), ``_display_kind`` (the session's default
    display name: "torch shampoo ...") and call ``_setup`` with
    ``make_config(name, shape)`` returning the block config.
    """

    _public_name = "natgrad.torch.DenseBlockOptimizer"
    _display_kind = "dense"

    def _setup(self, model, target, client, token, tls, lr, weight_decay, state_dtype,
               display_name, make_config, shared_memory=False):
        self.model = model
        self.params_by_name = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not self.params_by_name:
            raise ValueError(f"{self._public_name}: the model has no trainable parameters")
        super().__init__(list(self.params_by_name.values()), dict(lr=lr, weight_decay=weight_decay))
        self._weight_decay = weight_decay
        if client is None:
            if target is None:
                raise ValueError(f"{self._public_name}: give target='host:port' or client=")
            client = natgrad.Client(target, token=token, tls=tls)
        self.client = client
        configs = [make_config(n, list(p.shape) or [1]) for n, p in self.params_by_name.items()]
        self.session = client.create_session(
            configs, state_dtype=state_dtype, shared_memory=shared_memory,
            display_name=display_name or f"torch {self._display_kind} {type(model).__name__}")
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
