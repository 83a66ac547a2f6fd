"""natgrad.torch.KFAC: a torch.optim.Optimizer whose state lives on natgrad-server.

    opt = natgrad.torch.KFAC(model, target="localhost:50051", lr=0.1, damping=1e-3)
    for x, y in loader:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step(loss=loss)      # ships gradients + K-FAC statistics, applies deltas

What it captures (DESIGN.md §4.1):
  * nn.Linear and nn.Conv2d (groups=1, zero padding) are K-FAC blocks. A
    forward hook records each layer's input a (n x d_in; a Conv2d input is
    unfolded with torch.nn.functional.unfold into n*T rows of patches, T =
    output locations) and registers a hook on the layer's output tensor,
    which records the output gradient in backward. Hooking the output tensor
    (rather than a module backward hook) pairs inputs and gradients exactly
    when a layer runs several times per step (gradient accumulation, weight
    sharing).
  * Output gradients must be those of the *per-example* loss. With a
    mean-reduced loss (the default, ``loss_reduction="mean"``) backward
    yields dL/ds_i = (1/n) dl_i/ds_i, so the optimizer multiplies the
    captured gradients by the batch size n of that forward call (and by
    ``accumulation_steps`` when the loss is further divided over micro-batches).
    Use ``loss_reduction="sum"`` for a summed loss.
  * ``fisher="empirical"`` (default) takes the statistics from the same
    backward pass as the gradient. ``fisher="sampled"`` uses the true Fisher:
    after the forward pass call ``opt.sample_fisher(logits)`` (targets drawn
    from the model's predictive, categorical or Gaussian); it differentiates
    the sampled per-example losses with respect to the hooked layer outputs
    only (torch.autograd.grad, .grad untouched), then the usual
    ``loss.backward()`` provides the gradient.
  * The gradient sent is dL/dW of the mean loss with the bias gradient as W's
    last column ([d_out, d_in + 1]; conv weights flattened to
    [C_out, C_in*kh*kw]).
  * Every other trainable parameter (BatchNorm, LayerNorm, embeddings,
    skipped layers) goes to a server-side first-order block (``fallback``:
    "adam" by default, or "sgd").
  * Statistics are sent raw (rows x d_in, rows x d_out) or reduced
    (A = ā^T ā / n, G = g^T g / (n T), the server's scaling of raw rows for a
    convolution with T locations, kfac-jax's): ``reduce="auto"`` sends
    whichever is smaller.
  * ``step`` applies ``w += delta`` under torch.no_grad only after every
    block's delta arrived and was checked; any error raises before a single
    parameter changes.

Hyperparameters (lr, damping, momentum, weight_decay) may be numbers or
natgrad.schedules messages; they are evaluated on the server at each step,
so changing ``param_groups[...]["lr"]`` has no effect.
"""
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import natgrad
from natgrad import blocks as _blocks
from natgrad import errors

__all__ = ["KFAC"]


def _np(t):
    return t.detach().cpu().numpy()


class _Layer:
    """One K-FAC layer: its module, block name and the records of this step."""

    def __init__(self, name, module):
        self.name = name
        self.module = module
        self.records = []  # [a (detached input), g or None, output (sampled mode), n]
        self.conv = isinstance(module, nn.Conv2d)
        w = module.weight
        self.d_out = w.shape[0]
        self.d_in = int(np.prod(w.shape[1:]))
        self.bias = module.bias is not None and module.bias.requires_grad
        if module.bias is not None and not module.bias.requires_grad:
            self.bias = False
        self.locations = 0

    def params(self):
        return [self.module.weight] + ([self.module.bias] if self.bias else [])

    def unfold(self, x):
        m = self.module
        p = m.padding
        if isinstance(p, str):
            raise errors.InvalidArgument(f"layer '{self.name}': padding='{p}' is not supported; "
                                         "use explicit integer padding", block=self.name, field="padding")
        cols = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=p, stride=m.stride)
        # [N, C*kh*kw, L] -> [N*L, C*kh*kw]
        return cols.transpose(1, 2).reshape(-1, cols.shape[1]), cols.shape[2]


class KFAC(torch.optim.Optimizer):
    """K-FAC through natgrad-server for a torch.nn.Module.

    model: the module; its nn.Linear / nn.Conv2d layers get K-FAC blocks.
    target / client: where the server is (or a natgrad.Client).
    session: attach to an existing session (name) instead of creating one.
    lr, damping, momentum, weight_decay: numbers or natgrad.schedules.
    damping_mode: "tikhonov" (factored, pi-corrected) or "eigen".
    ema_decay, inverse_period, stats_period: K-FAC factor updates (None:
      server defaults, see docs).
    kl_clip: kappa for KL clipping (None/False: off).
    adaptive_damping: Levenberg-Marquardt damping (needs step(loss=...)).
    fisher: "empirical" or "sampled" (see sample_fisher).
    loss_reduction: "mean" or "sum" (how your loss reduces over the batch).
    accumulation_steps: micro-batches per step when the loss is divided by it.
    fallback, fallback_lr, fallback_kwargs: first-order block for other params.
    skip_layers: module names or class names that must not be K-FAC blocks.
    reduce: "auto" | True | False: send reduced factors instead of raw rows.
    state_dtype: server state precision "float32" (default) or "float64".
    """

    def __init__(self, model, target=None, *, client=None, session=None, token=None, tls=None,
                 lr=0.1, damping=1e-3, momentum=0.9, weight_decay=0.0, damping_mode="tikhonov",
                 ema_decay=None, inverse_period=None, stats_period=None, kl_clip=1e-3,
                 adaptive_damping=False, fisher="empirical", loss_reduction="mean",
                 accumulation_steps=1, fallback="adam", fallback_lr=1e-3, fallback_kwargs=None,
                 skip_layers=(), reduce="auto", state_dtype=None, session_id=None,
                 display_name=None, async_inversion=False, locations=None):
        if fisher not in ("empirical", "sampled"):
            raise ValueError(f"fisher must be 'empirical' or 'sampled', got {fisher!r}")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if fallback not in ("adam", "sgd"):
            raise ValueError(f"fallback must be 'adam' or 'sgd', got {fallback!r}")
        if reduce not in ("auto", True, False):
            raise ValueError("reduce must be 'auto', True or False")
        self.model = model
        self.fisher = fisher
        self.loss_reduction = loss_reduction
        self.accumulation_steps = int(accumulation_steps)
        self.reduce = reduce
        self.weight_decay = weight_decay
        skip = set(skip_layers)

        # K-FAC layers and fallback parameters.
        self.layers = {}
        covered = set()
        for mname, m in model.named_modules():
            if not isinstance(m, (nn.Linear, nn.Conv2d)):
                continue
            if mname in skip or type(m).__name__ in skip:
                continue
            if not m.weight.requires_grad:
                continue
            if isinstance(m, nn.Conv2d) and (m.groups != 1 or m.padding_mode != "zeros"
                                             or isinstance(m.padding, str)):
                warnings.warn(f"natgrad.torch.KFAC: conv layer '{mname}' (groups={m.groups}, "
                              f"padding={m.padding!r}, padding_mode={m.padding_mode}) is not "
                              f"supported by K-FAC; it uses the {fallback} fallback")
                continue
            bname = mname or "module"
            layer = _Layer(bname, m)
            self.layers[bname] = layer
            covered.update(id(p) for p in layer.params())
        self.fallback_params = {}
        for pname, p in model.named_parameters():
            if p.requires_grad and id(p) not in covered:
                self.fallback_params[pname] = p

        params = [p for p in model.parameters() if p.requires_grad]
        super().__init__(params, dict(lr=lr, damping=damping, momentum=momentum,
                                      weight_decay=weight_decay))

        # Session: created now, or at the first step when a conv layer's
        # number of output locations T (part of its block config) is unknown.
        if client is None:
            if target is None:
                raise ValueError("natgrad.torch.KFAC: give target='host:port' or client=")
            client = natgrad.Client(target, token=token, tls=tls)
        self.client = client
        self.session = None
        self._session_args = dict(
            lr=lr, damping=damping, momentum=momentum, weight_decay=weight_decay,
            damping_mode=damping_mode, ema_decay=ema_decay, inverse_period=inverse_period,
            stats_period=stats_period, async_inversion=async_inversion, kl_clip=kl_clip,
            adaptive_damping=adaptive_damping, state_dtype=state_dtype, session_id=session_id,
            display_name=display_name, fallback=fallback, fallback_lr=fallback_lr,
            fallback_kwargs=fallback_kwargs)
        for name, T in (locations or {}).items():
            self.layers[name].locations = int(T)
        if session is not None:
            self.session = client.get_session(session)
            self._check_session()
            for L in self.layers.values():
                if L.conv:
                    L.locations = self.session.blocks[L.name].kfac_dense.locations
        elif not any(L.conv and not L.locations for L in self.layers.values()):
            self._create_session()
        self.last_result = None
        self._handles = []
        for L in self.layers.values():
            self._handles.append(L.module.register_forward_hook(self._make_forward_hook(L)))

    # -- hooks ----------------------------------------------------------------
    def _make_forward_hook(self, L):
        def hook(module, inputs, output):
            if not (module.training and torch.is_grad_enabled() and output.requires_grad):
                return
            x = inputs[0].detach()
            # n: examples the loss is averaged over. Conv: the batch; Linear on
            # [..., d_in] inputs: every leading position (e.g. tokens).
            n = x.shape[0] if L.conv else x.numel() // max(1, x.shape[-1])
            rec = [x, None, None, n]
            L.records.append(rec)
            if self.fisher == "sampled":
                rec[2] = output
            else:
                def grad_hook(g, rec=rec):
                    rec[1] = g.detach() if rec[1] is None else rec[1] + g.detach()
                output.register_hook(grad_hook)
        return hook

    def sample_fisher(self, outputs, likelihood="categorical", sigma=1.0, generator=None):
        """For fisher="sampled": draws targets from the model's predictive at
        ``outputs`` (logits for "categorical", means for "gaussian" with std
        ``sigma``) and records the per-example gradients of their negative
        log-likelihood at every hooked layer output. Does not touch .grad; call
        it before ``loss.backward()`` (it keeps the graph)."""
        if self.fisher != "sampled":
            raise RuntimeError("sample_fisher needs KFAC(..., fisher='sampled')")
        with torch.no_grad():
            if likelihood == "categorical":
                probs = torch.softmax(outputs.detach().float(), dim=-1)
                y = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator)
                y = y.reshape(probs.shape[:-1])
            elif likelihood == "gaussian":
                y = outputs.detach() + sigma * torch.randn(outputs.shape, generator=generator,
                                                           dtype=outputs.dtype, device=outputs.device)
            else:
                raise ValueError("likelihood must be 'categorical' or 'gaussian'")
        if likelihood == "categorical":
            nll = F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), y.reshape(-1), reduction="sum")
        else:
            nll = 0.5 * ((outputs - y) ** 2).sum() / sigma ** 2
        recs = [(L, r) for L in self.layers.values() for r in L.records if r[2] is not None]
        if not recs:
            raise RuntimeError("sample_fisher: no layer outputs recorded; run the forward pass "
                               "in training mode with gradients enabled first")
        grads = torch.autograd.grad(nll, [r[2] for _, r in recs], retain_graph=True, allow_unused=True)
        for (L, r), g in zip(recs, grads):
            r[1] = g.detach() if g is not None else None
            r[2] = None
        return nll.detach()

    # -- statistics -----------------------------------------------------------
    def _grad_scale(self, n):
        if self.fisher == "sampled":
            return 1.0  # sum of sampled per-example losses: already per-example
        s = float(self.accumulation_steps)
        if self.loss_reduction == "mean":
            s *= n
        return s

    def _layer_input(self, L):
        recs = [r for r in L.records if r[1] is not None]
        if not recs:
            return None
        a_rows, g_rows, n_total = [], [], 0
        for x, g, _, n in recs:
            if L.conv:
                a, T = L.unfold(x)
                if L.locations and T != L.locations:
                    raise errors.InvalidArgument(
                        f"layer '{L.name}': {T} output locations, but the session's block was "
                        f"created for {L.locations} (input size changed)", block=L.name,
                        field="locations")
                L.locations = T
                gg = g.permute(0, 2, 3, 1).reshape(-1, g.shape[1])
            else:
                a = x.reshape(-1, x.shape[-1])
                gg = g.reshape(-1, g.shape[-1])
            a_rows.append(a)
            g_rows.append(gg * self._grad_scale(n))
            n_total += n
        a = torch.cat(a_rows)
        g = torch.cat(g_rows)
        W = L.module.weight
        if W.grad is None:
            return None
        grad = W.grad.reshape(L.d_out, -1)
        if L.bias:
            b = L.module.bias.grad
            if b is None:
                b = torch.zeros(L.d_out, dtype=grad.dtype, device=grad.device)
            grad = torch.cat([grad, b.reshape(-1, 1)], dim=1)
        x = {"gradient": _np(grad)}
        if self.weight_decay:
            w = W.detach().reshape(L.d_out, -1)
            if L.bias:
                w = torch.cat([w, L.module.bias.detach().reshape(-1, 1)], dim=1)
            x["params"] = _np(w)
        rows = a.shape[0]
        din1 = L.d_in + int(L.bias)
        reduced_size = din1 * din1 + L.d_out * L.d_out
        raw_size = rows * (L.d_in + L.d_out)
        if self.reduce is True or (self.reduce == "auto" and reduced_size < raw_size):
            a64 = a.double()
            if L.bias:
                a64 = torch.cat([a64, torch.ones(rows, 1, dtype=a64.dtype, device=a64.device)], 1)
            g64 = g.double()
            # The server's scaling for raw rows (KFC, as kfac-jax): A over the
            # n examples, G over the n*T rows (T = 1 for dense layers).
            A = a64.T @ a64 / n_total
            G = g64.T @ g64 / rows
            x["a_factor"] = _np(A).astype(np.float32) if grad.dtype != torch.float64 else _np(A)
            x["g_factor"] = _np(G).astype(np.float32) if grad.dtype != torch.float64 else _np(G)
            x["num_examples"] = n_total
        else:
            x["activations"] = _np(a)
            x["output_gradients"] = _np(g)
        return x

    def collect(self):
        """The step's inputs (block name -> dict) from the captured statistics
        and the current .grad values; blocks without a gradient are left out."""
        inputs = {}
        for L in self.layers.values():
            x = self._layer_input(L)
            if x is None:
                gw = L.module.weight.grad
                if gw is not None and bool(torch.any(gw != 0)):
                    raise errors.FailedPrecondition(
                        f"layer '{L.name}': has a gradient but no captured statistics; run the "
                        "forward pass in training mode with grad enabled"
                        + (" and call sample_fisher()" if self.fisher == "sampled" else ""),
                        block=L.name)
                continue
            inputs[L.name] = x
        for pname, p in self.fallback_params.items():
            if p.grad is None:
                continue
            g = _np(p.grad).reshape(list(p.shape) or [1])
            x = {"gradient": g}
            inputs[pname] = x
        return inputs

    def clear_statistics(self):
        for L in self.layers.values():
            L.records.clear()

    # -- the optimizer interface ---------------------------------------------
    @torch.no_grad()
    def step(self, closure=None, loss=None):
        """Sends one step and applies the returned deltas. ``loss`` (a float
        or a 0-d tensor) drives adaptive damping. Returns the closure's loss."""
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        loss_value = None
        if loss is not None:
            loss_value = float(loss.detach()) if torch.is_tensor(loss) else float(loss)
        try:
            inputs = self.collect()
            if not inputs:
                raise errors.FailedPrecondition(
                    "step(): no parameter has a gradient; call loss.backward() first")
            if self.session is None:
                self._create_session()
            result = self.session.step(inputs, loss=loss_value)
            updates = self._check_updates(result, inputs)
        finally:
            self.clear_statistics()
        for p, d in updates:
            p.add_(d)
        self.last_result = result
        return loss

    def _check_updates(self, result, inputs):
        """Turns every delta into (param, tensor) pairs, checking all first."""
        out = []
        for name in inputs:
            if name not in result:
                raise errors.Internal(f"step {result.step}: no update for block '{name}' in the response",
                                      block=name)
            d = result[name]
            if not np.all(np.isfinite(d)):
                raise errors.Internal(f"step {result.step}: block '{name}': delta contains NaN/Inf",
                                      block=name)
            if name in self.layers:
                L = self.layers[name]
                want = (L.d_out, L.d_in + int(L.bias))
                if tuple(d.shape) != want:
                    raise errors.Internal(f"block '{name}': delta shape {list(d.shape)}, expected {list(want)}",
                                          block=name)
                W = L.module.weight
                dw = torch.as_tensor(np.ascontiguousarray(d[:, :L.d_in]), dtype=W.dtype, device=W.device)
                out.append((W, dw.reshape(W.shape)))
                if L.bias:
                    b = L.module.bias
                    out.append((b, torch.as_tensor(np.ascontiguousarray(d[:, L.d_in]), dtype=b.dtype,
                                                   device=b.device)))
            else:
                p = self.fallback_params[name]
                if d.size != p.numel():
                    raise errors.Internal(f"block '{name}': delta shape {list(d.shape)}, expected "
                                          f"{list(p.shape)}", block=name)
                out.append((p, torch.as_tensor(d.reshape(p.shape), dtype=p.dtype, device=p.device)))
        return out

    def _create_session(self):
        a = self._session_args
        cfg = []
        for L in self.layers.values():
            cfg.append(_blocks.kfac_dense(
                L.name, L.d_in, L.d_out, bias=L.bias, lr=a["lr"], damping=a["damping"],
                momentum=a["momentum"], weight_decay=a["weight_decay"] or None,
                damping_mode=a["damping_mode"], ema_decay=a["ema_decay"],
                inverse_period=a["inverse_period"], stats_period=a["stats_period"],
                async_inversion=a["async_inversion"], locations=L.locations or None))
        fk = dict(a["fallback_kwargs"] or {})
        for pname, p in self.fallback_params.items():
            shape = list(p.shape) or [1]
            make = _blocks.adam if a["fallback"] == "adam" else _blocks.sgd
            cfg.append(make(pname, shape, lr=a["fallback_lr"], **fk))
        self.session = self.client.create_session(
            cfg, session_id=a["session_id"], kl_clip=a["kl_clip"] or None,
            adaptive_damping=a["adaptive_damping"], state_dtype=a["state_dtype"],
            display_name=a["display_name"] or f"torch {type(self.model).__name__}")
        return self.session

    def _check_session(self):
        blocks = self.session.blocks
        for L in self.layers.values():
            b = blocks.get(L.name)
            if b is None or b.WhichOneof("kind") != "kfac_dense" or list(b.shape) != [L.d_out, L.d_in + int(L.bias)]:
                raise errors.FailedPrecondition(f"session {self.session.name} does not match the model: "
                                                f"layer '{L.name}'", block=L.name)
        for pname, p in self.fallback_params.items():
            if pname not in blocks:
                raise errors.FailedPrecondition(f"session {self.session.name} has no block for "
                                                f"parameter '{pname}'", block=pname)

    def state_dict(self):
        """The session name and next step (the optimizer state is on the server)."""
        groups = [{**{k: v for k, v in g.items() if k != "params"},
                   "params": list(range(len(g["params"])))} for g in self.param_groups]
        return {"state": {}, "param_groups": groups,
                "natgrad": {"session": self.session and self.session.name,
                            "next_step": self.session and self.session.next_step,
                            "target": self.client.target}}

    def load_state_dict(self, state_dict):
        ng = state_dict.get("natgrad")
        if ng:
            if self.session is not None:
                self.session.close()
            self.session = self.client.get_session(ng["session"])
            self._check_session()

    def close(self, delete=False):
        """Removes hooks and closes the stream (and deletes the session if asked)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self.session is None:
            return
        if delete:
            self.session.delete()
        else:
            self.session.close()

    def __repr__(self):
        return (f"natgrad.torch.KFAC(session={self.session.name}, kfac_layers={list(self.layers)}, "
                f"fallback={list(self.fallback_params)})")
