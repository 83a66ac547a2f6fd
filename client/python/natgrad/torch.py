"""natgrad.torch: K-FAC on natgrad-server for torch.nn.Module models.

Two modes:

* ``KFAC``, a torch.optim.Optimizer whose state lives on the server: it ships
  gradients + K-FAC statistics and applies the returned deltas::

    opt = natgrad.torch.KFAC(model, target="localhost:50051", lr=0.1, damping=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, 10, 0.5)    # torch schedulers work
    for x, y in loader:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step(loss=loss)
        sched.step()

* ``KFACPreconditioner`` (as in kfac-pytorch): ``step()`` replaces each K-FAC
  layer's ``.grad`` with its preconditioned gradient and leaves every other
  ``.grad`` alone, so your own optimizer and LR scheduler do the update::

    pre = natgrad.torch.KFACPreconditioner(model, target=..., damping=1e-3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ...
    loss.backward()
    pre.step()
    opt.step()

Which parameter gets which block is decided at construction and reported
once (``report``, ``format_report()``, logged at INFO on the "natgrad.torch"
logger; fallbacks of layers one would expect to be K-FAC also warn once):

  * nn.Linear and nn.Conv2d (groups=1, zero padding) are K-FAC blocks. A
    forward hook records each layer's input a (n x d_in; a Conv2d input is
    unfolded with F.unfold into n*T rows of patches, T = output locations,
    sent with every step so the spatial size may change between steps) and
    hooks the layer's output tensor, which records the output gradient in
    backward. Hooking the output tensor (rather than a module backward hook)
    pairs inputs and gradients exactly when a layer runs several times per
    step (gradient accumulation, weight sharing).
  * Fallbacks (a first-order server block, ``fallback="adam"`` or "sgd"; in
    preconditioner mode no block, ``.grad`` untouched): every other
    parameter (norms, embeddings, ...), layers in ``skip_layers``,
    unsupported convolutions, the projections of nn.MultiheadAttention (its
    forward calls F.multi_head_attention_forward with out_proj.weight, so
    out_proj's forward hook never fires), and tied parameters (one Parameter
    reachable from several modules, e.g. an LM head tied to an embedding: one
    layer's factors would precondition a gradient summed over all its uses).
    Sparse gradients (nn.Embedding(sparse=True)) are densified.
  * A parameter whose ``.grad`` is None in a step (a branch not used, a
    task head not trained this step) is left out of that step; the server
    leaves the omitted block's state alone. ``KFAC.zero_grad`` sets grads to
    None by default (as torch >= 2.0 does), so unused layers are detected.
  * A K-FAC layer with a gradient but no captured statistics (its weights
    used without calling its forward) is left out of the step with a warning
    (once per layer) instead of failing; put it in ``skip_layers`` to give it
    a first-order block.
  * Output gradients must be those of the *per-example* loss. With a
    mean-reduced loss (the default, ``loss_reduction="mean"``) backward
    yields dL/ds_i = (1/n) dl_i/ds_i, so the captured gradients are
    multiplied by the batch size n of that forward call (Linear on
    [..., d_in] inputs: every leading position, e.g. tokens) and by
    ``accumulation_steps``. Use ``loss_reduction="sum"`` for a summed loss.
  * ``fisher="sampled"``: after the forward pass call
    ``opt.sample_fisher(logits)``; it differentiates the sampled per-example
    losses with respect to the hooked layer outputs only (.grad untouched).
  * The gradient sent is dL/dW of the mean loss with the bias gradient as W's
    last column ([d_out, d_in + 1]; conv weights flattened to
    [C_out, C_in*kh*kw]).
  * Statistics are sent raw (rows x d_in, rows x d_out) or reduced
    (A = ā^T ā / n, G = g^T g / (n T), the server's scaling of raw rows,
    computed by torch matmuls on the layer's device in the gradient's
    precision, float32 unless float64, and sent as packed upper
    triangles). ``reduce="auto"`` times both forms on the first statistics
    steps and keeps the cheaper one (_ReduceTrial; ``opt._reduce_trial``
    holds the measured costs and the choice). Statistics are sent only on
    the blocks' statistics steps (``stats_period``).

Overlap (docs/torch_overlap.md):

  * ``stream=True``: each K-FAC layer's block is built and sent as soon as
    backward has finished that layer (a hook on the accumulation of each of
    its parameters' gradients, which runs after every use of a layer shared
    within the forward), by a builder and a sender thread, as messages of
    the current step (Session.begin_step / send_blocks); step() sends the
    rest (fallback blocks, layers not streamed) with the loss and waits.
    The update is bit-identical to the unstreamed step. When backward and
    step() disagree (a second backward pass before step(), gradients or
    weights changed in between, e.g. by gradient clipping, or a learning
    rate changed) the streamed blocks are dropped, the step is sent whole
    and streaming is turned off with a warning. With accumulation_steps >
    1 blocks are sent at step().
  * ``pipelined=True`` (optimizer mode): step() sends step t and returns at
    once; step t's update is applied by the next step() (after the next
    backward), so the round trip overlaps the next forward/backward and
    every gradient is taken one update behind (one step stale). The update
    of step t equals the synchronous session's answer to the same inputs
    (tested against a hand-written loop applying Session.step results one
    step late). An error of the step in flight is raised by the next
    step() (which then sends nothing; the session's step counter is where
    the failed step left it). flush() applies the step in flight (do it
    before evaluating); state_dict() and close() flush, load_state_dict()
    waits for it and drops its update.

Checkpoints: ``state_dict()`` holds the exported session (the server's
optimizer state) and its step; ``load_state_dict()`` imports it into a server
that does not have the session, or checks that one that does is at the same
step, and raises a natgrad error on any mismatch.
"""
import concurrent.futures
import dataclasses
import logging
import numbers
import time
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import natgrad
from natgrad import blocks as _blocks
from natgrad import errors
from natgrad._reduce_trial import ReduceTrial as _ReduceTrial
from natgrad._pb import session_pb2

__all__ = ["KFAC", "KFACPreconditioner", "BlockReport", "Shampoo", "SOAP", "EKFAC"]

log = logging.getLogger("natgrad.torch")

_STATE_FORMAT = 1


def _np(t):
    return t.detach().cpu().numpy()


def _dense_grad(name, g):
    """A strided float32/float64 copy-free view of a gradient, or a natgrad error."""
    if g.layout != torch.strided:
        try:
            g = g.to_dense()
        except Exception as e:  # noqa: BLE001
            raise errors.InvalidArgument(f"parameter '{name}': cannot densify its {g.layout} "
                                         f"gradient: {e}", block=name, field="gradient") from None
    if g.dtype not in (torch.float32, torch.float64):
        g = g.float()
    return g


def _number(v):
    """v as a float when it is a plain number (or 0-d tensor), else None."""
    if isinstance(v, bool):
        return None
    if isinstance(v, numbers.Real):
        return float(v)
    if torch.is_tensor(v) and v.numel() == 1:
        return float(v)
    return None


@dataclasses.dataclass(frozen=True)
class BlockReport:
    """One row of the construction report.

    block: the server block name ("" for a parameter left to your optimizer
      in preconditioner mode). kind: "kfac", "adam", "sgd" or "untouched"
      (preconditioner mode: .grad left as is). module / module_type: the
      owning module. params: parameter names. reason: why it is not K-FAC.
    """
    block: str
    kind: str
    module: str
    module_type: str
    params: tuple
    reason: str = ""


class _Layer:
    """One K-FAC layer: its module, block name and the records of this step."""

    def __init__(self, name, module, param_names, padding):
        self.name = name
        self.module = module
        self.param_names = param_names
        self.records = []  # [a (detached input), g or None, output (sampled mode), n]
        self.conv = isinstance(module, nn.Conv2d)
        self.padding = padding
        w = module.weight
        self.d_out = w.shape[0]
        self.d_in = int(np.prod(w.shape[1:]))
        self.bias = module.bias is not None and module.bias.requires_grad
        self.locations = 0
        self.warned = False
        self.stats_sent = False  # the server has statistics of this layer

    def params(self):
        return [self.module.weight] + ([self.module.bias] if self.bias else [])

    def unfold(self, x):
        m = self.module
        if x.dim() == 3:  # unbatched [C, H, W]
            x = x.unsqueeze(0)
        cols = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=self.padding, stride=m.stride)
        # [N, C*kh*kw, L] -> [N*L, C*kh*kw]
        return cols.transpose(1, 2).reshape(-1, cols.shape[1]), cols.shape[2]


class _StreamedStep:
    """The step being collected, as far as backward has streamed it."""

    def __init__(self, step):
        self.step = step    # its number
        self.fired = {}     # layer -> ids of its parameters accumulated in this backward
        self.queued = {}    # layer -> (lr, [(param, grad, grad version)], [(param, version)])
        self.futures = []   # the builder thread's jobs for the queued layers
        self.names = []     # blocks built and handed to the sender (builder thread)
        self.stats = []     # layers whose statistics they carry
        self.first_stats = []  # those whose first statistics they are
        self.build_s = 0.0
        self.invalid = None  # why the streamed blocks are not to be used
        self.error = None    # a block's error, raised by step()


class _InFlight:
    """Pipelined: the step sent and not yet applied."""

    def __init__(self, future, st, tail):
        self.future, self._st, self._tail = future, st, tail
        self.step = st.step

    def names(self):
        return self._st.names + self._tail


def _conv_padding(m):
    """Explicit symmetric padding for F.unfold, or (None, reason)."""
    if m.groups != 1:
        return None, f"groups={m.groups} (K-FAC blocks need groups=1)"
    if m.padding_mode != "zeros":
        return None, f"padding_mode='{m.padding_mode}' (K-FAC blocks need zero padding)"
    p = m.padding
    if p == "valid":
        return (0, 0), ""
    if p == "same":
        total = [d * (k - 1) for d, k in zip(m.dilation, m.kernel_size)]
        if any(t % 2 for t in total):
            return None, "padding='same' with an even kernel pads asymmetrically (F.unfold cannot)"
        return tuple(t // 2 for t in total), ""
    return tuple(p), ""


class _KfacModel:
    """What both modes share: the block plan, hooks, statistics, the session
    and checkpoints. Subclasses set ``_mode`` and ``_fallback_kind``."""

    _mode = None

    # -- construction ---------------------------------------------------------
    def _plan(self, model, skip_layers, fallback_kind):
        """Decides each trainable parameter's block; fills self.layers,
        self.fallback_params and self.report."""
        skip = set(skip_layers)
        primary = {}  # id(param) -> its name in model.named_parameters() (deduplicated)
        for pname, p in model.named_parameters():
            primary.setdefault(id(p), pname)
        # Every (module, attribute) a Parameter is reachable from; two or more
        # distinct ones is weight tying (a module reused is not).
        owners = {}
        for mname, m in model.named_modules(remove_duplicate=False):
            for an, p in m._parameters.items():
                if p is not None:
                    owners.setdefault(id(p), {})[(id(m), an)] = f"{mname}.{an}" if mname else an
        tied = {pid: sorted(set(o.values())) for pid, o in owners.items() if len(o) > 1}
        modules = dict(model.named_modules())
        mha = [n for n, m in modules.items() if isinstance(m, nn.MultiheadAttention)]

        def in_mha(mname):
            for n in mha:
                if n == mname or n == "" or mname.startswith(n + "."):
                    return n
            return None

        self.layers = {}
        reasons = {}  # id(param) -> reason it is not K-FAC
        for mname, m in modules.items():
            if not isinstance(m, (nn.Linear, nn.Conv2d)):
                continue
            w, b = m.weight, m.bias
            reason = ""
            padding = None
            if mname in skip or type(m).__name__ in skip:
                reason = "in skip_layers"
            elif in_mha(mname) is not None:
                reason = (f"inside nn.MultiheadAttention '{in_mha(mname)}', whose forward uses the "
                          "weights directly (F.multi_head_attention_forward), so this layer's "
                          "forward hook never fires")
            elif not w.requires_grad:
                reason = "weight is frozen"
            elif id(w) in tied or (b is not None and b.requires_grad and id(b) in tied):
                pid = id(w) if id(w) in tied else id(b)
                reason = "tied: the same Parameter is " + " and ".join(f"'{x}'" for x in tied[pid])
            elif isinstance(m, nn.Conv2d):
                padding, reason = _conv_padding(m)
            if reason:
                for p in (w, b):
                    if p is not None:
                        reasons.setdefault(id(p), reason)
                continue
            bname = mname or "module"
            names = (primary[id(w)],) + ((primary[id(b)],) if b is not None and b.requires_grad else ())
            self.layers[bname] = _Layer(bname, m, names, padding)

        covered = {id(p) for L in self.layers.values() for p in L.params()}
        owner_of = {}
        for mname, m in modules.items():
            for an, p in m._parameters.items():
                if p is not None:
                    owner_of.setdefault(id(p), (mname, m))
        self.fallback_params = {}
        self.report = []
        for L in self.layers.values():
            mname = L.name if L.module is not model else ""
            self.report.append(BlockReport(L.name, "kfac", mname, type(L.module).__name__, L.param_names))
        for pname, p in model.named_parameters():
            if not p.requires_grad or id(p) in covered:
                continue
            mname, m = owner_of[id(p)]
            reason = reasons.get(id(p))
            if reason is None:
                if id(p) in tied:
                    reason = "tied: the same Parameter is " + " and ".join(f"'{x}'" for x in tied[id(p)])
                elif isinstance(m, nn.MultiheadAttention):
                    reason = ("nn.MultiheadAttention parameter, used directly by "
                              "F.multi_head_attention_forward (no layer statistics to capture)")
                else:
                    reason = f"{type(m).__name__} is not a K-FAC layer (nn.Linear / nn.Conv2d)"
            if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse:
                reason += ("; sparse gradient left to your optimizer" if fallback_kind == "untouched"
                           else "; sparse gradient densified")
            self.fallback_params[pname] = p
            block = "" if fallback_kind == "untouched" else pname
            self.report.append(BlockReport(block, fallback_kind, mname, type(m).__name__, (pname,), reason))
        self._announce(model, reasons, modules, fallback_kind)

    def _announce(self, model, reasons, modules, fallback_kind):
        who = type(self).__name__
        log.info("natgrad.torch.%s for %s: %d K-FAC blocks, %d fallback parameters\n%s", who,
                 type(model).__name__, len(self.layers), len(self.fallback_params), self.format_report())
        # Warn (once, here) about layers a user would expect to be K-FAC.
        surprising = []
        for mname, m in modules.items():
            if isinstance(m, (nn.Linear, nn.Conv2d)) and id(m.weight) in reasons:
                r = reasons[id(m.weight)]
                if r not in ("in skip_layers", "weight is frozen"):
                    surprising.append(f"'{mname}' ({r})")
        if surprising:
            what = ("are not preconditioned (.grad left as is)" if fallback_kind == "untouched"
                    else f"use the {fallback_kind} fallback instead of K-FAC")
            warnings.warn(f"natgrad.torch.{who}: {len(surprising)} layer(s) {what}: "
                          + "; ".join(surprising), stacklevel=4)

    def format_report(self):
        """The block table as text: block, kind, module type, parameters, reason."""
        rows = [("block", "kind", "module", "parameters", "reason")]
        for r in self.report:
            rows.append((r.block or "-", r.kind, r.module_type, ", ".join(r.params), r.reason))
        w = [max(len(row[i]) for row in rows) for i in range(4)]
        return "\n".join("  ".join(c.ljust(w[i]) if i < 4 else c for i, c in enumerate(row)).rstrip()
                         for row in rows)

    @property
    def param_kinds(self):
        """parameter name -> block kind ("kfac", "adam", "sgd", "untouched")."""
        return {p: r.kind for r in self.report for p in r.params}

    def _connect(self, target, client, token, tls):
        if client is None:
            if target is None:
                raise ValueError(f"natgrad.torch.{type(self).__name__}: give target='host:port' or client=")
            client = natgrad.Client(target, token=token, tls=tls)
        self.client = client

    def _attach_hooks(self):
        self._handles = []
        for L in self.layers.values():
            self._handles.append(L.module.register_forward_hook(self._make_forward_hook(L)))
        self._ensure_trial()
        if self.stream:
            self._attach_grad_hooks()

    def _init_streaming(self, stream, pipelined):
        if stream not in (True, False):
            raise ValueError(f"stream must be True or False, got {stream!r}")
        if pipelined not in (True, False):
            raise ValueError(f"pipelined must be True or False, got {pipelined!r}")
        self.stream = stream
        self.pipelined = pipelined
        # With several micro-batches per step a layer's gradient is final
        # only at the last backward, which the hooks cannot tell.
        self._streaming = stream and self.accumulation_steps == 1
        self._st = None          # _StreamedStep of the step being collected
        self._inflight = None    # pipelined: _InFlight, the step sent and not yet applied
        self._inflight_failed = False
        self._grad_nodes = []
        self._sender_pool = None
        self._builder_pool = None
        self.streamed_blocks = 0  # blocks sent during backward so far (monitoring/tests)

    # -- hooks ----------------------------------------------------------------
    def _make_forward_hook(self, L):
        def hook(module, inputs, output):
            if not (module.training and torch.is_grad_enabled() and torch.is_tensor(output)
                    and output.requires_grad and inputs and torch.is_tensor(inputs[0])):
                return  # nothing to record (a step with a gradient then warns and omits it)
            x = inputs[0].detach()
            # n: examples the loss is averaged over. Conv: the batch; Linear on
            # [..., d_in] inputs: every leading position (e.g. tokens).
            if L.conv:
                n = x.shape[0] if x.dim() == 4 else 1
            else:
                n = x.numel() // max(1, x.shape[-1])
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
            raise RuntimeError("sample_fisher needs fisher='sampled'")
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

    def _layer_input(self, L, step):
        """(inputs dict, locations or None, carries statistics) for one layer
        in step number ``step``, or None to leave it out of the step (no
        gradient, or no complete statistics). Called on the sender thread for
        streamed layers: it reads only L's own tensors."""
        W, bmod = L.module.weight, L.module.bias
        gw = W.grad
        gb = bmod.grad if L.bias else None
        if gw is None and gb is None:
            return None  # not used in this step
        recs = [r for r in L.records if r[1] is not None]
        if not recs:
            nonzero = any(g is not None and bool(torch.any(g != 0)) for g in (gw, gb))
            if not nonzero:
                return None
            if self.fisher == "sampled" and L.records:
                raise errors.FailedPrecondition(
                    f"layer '{L.name}': has a gradient but no sampled statistics; call "
                    "sample_fisher(outputs) after the forward pass", block=L.name)
            if not L.warned:
                L.warned = True
                msg = (f"natgrad.torch: layer '{L.name}' has a gradient but its forward hook did not "
                       "record statistics (its weights were used without calling its forward, or "
                       "it ran in eval mode / under no_grad); it is left out of this step (and of "
                       "later ones like it). Put it in skip_layers to give it a first-order block.")
                log.warning(msg)
                warnings.warn(msg, stacklevel=4)
            return None
        a_rows, g_rows, n_total, Ts = [], [], 0, set()
        for x, g, _, n in recs:
            if L.conv:
                a, T = L.unfold(x)
                if g.dim() == 3:
                    g = g.unsqueeze(0)
                gg = g.permute(0, 2, 3, 1).reshape(-1, g.shape[1])
                Ts.add(T)
            else:
                a = x.reshape(-1, x.shape[-1])
                gg = g.reshape(-1, g.shape[-1])
            a_rows.append(a)
            g_rows.append(gg * self._grad_scale(n))
            n_total += n
        # (One record, the usual case: no copy.)
        a = a_rows[0] if len(a_rows) == 1 else torch.cat(a_rows)
        g = g_rows[0] if len(g_rows) == 1 else torch.cat(g_rows)
        if gw is None:
            gw = torch.zeros_like(W)
        grad = _dense_grad(L.param_names[0], gw).reshape(L.d_out, -1)
        if L.bias:
            if gb is None:
                gb = torch.zeros(L.d_out, dtype=grad.dtype, device=grad.device)
            grad = torch.cat([grad, _dense_grad(L.param_names[1], gb).to(grad.dtype).reshape(-1, 1)], dim=1)
        x = {"gradient": _np(grad)}
        if self.weight_decay:
            w = W.detach().reshape(L.d_out, -1)
            if L.bias:
                w = torch.cat([w, bmod.detach().reshape(-1, 1)], dim=1)
            x["params"] = _np(w.to(grad.dtype))
        rows = a.shape[0]
        # Mixed spatial sizes in one step (a conv run on two input sizes):
        # raw rows are no longer n*T, so send the factors.
        mixed = len(Ts) > 1
        T = next(iter(Ts)) if len(Ts) == 1 else None
        if T is not None:
            L.locations = T  # the last step's T (informational)
        if not self._sends_statistics(L, step):
            return x, None, False  # the server folds none this step
        if mixed or self._reduces(L, rows):
            x["a_factor"], x["g_factor"] = _packed_factors(a, g, L.bias, n_total, grad.dtype)
            x["num_examples"] = n_total
            return x, None, True
        x["activations"] = _np(a.to(grad.dtype))
        x["output_gradients"] = _np(g.to(grad.dtype))
        return x, T, True

    def _sends_statistics(self, L, step):
        """Whether step ``step`` carries L's statistics: on the block's
        statistics steps (stats_period) and until the server has some; the
        server folds none on the other steps, so they are not sent."""
        if not L.stats_sent:
            return True
        cfg = self.session.blocks.get(L.name)
        period = cfg.kfac_dense.stats_period if cfg is not None else 0
        return period <= 1 or (step - 1) % period == 0

    def _reduces(self, L, rows):
        """Raw rows or reduced factors for L this step (see _ReduceTrial)."""
        if self.reduce is not True and self.reduce != "auto":
            return False
        if self.reduce is True:
            return True
        form = self._reduce_trial.form()
        if form is None:  # the warm-up step: the smaller message
            din1 = L.d_in + int(L.bias)
            packed = din1 * (din1 + 1) // 2 + L.d_out * (L.d_out + 1) // 2
            return packed < rows * (L.d_in + L.d_out)
        return form == "reduced"

    def _send_step(self, inputs, locs, lrs, loss, stats, collect_s):
        """session.step, timed for reduce="auto"'s trial; marks the layers
        whose statistics the server now has."""
        t0 = time.perf_counter()
        result = self.session.step(self._messages(inputs, locs, lrs), loss=loss)
        self._stepped(result, stats, time.perf_counter() - t0 + collect_s)
        return result

    def _stepped(self, result, stats, seconds):
        """After an acknowledged step: the trial's cost, and the layers whose
        statistics the server now has."""
        if stats:
            self._reduce_trial.record(seconds - result.timing.inversion_micros * 1e-6)
        for L in stats:
            L.stats_sent = True

    def _collect(self, fallback, skip=(), step=None):
        """(inputs, locations, statistics layers, seconds): block name -> step
        input dict for every block used in step ``step`` (default: the next)
        except those in ``skip``, conv block -> this step's T (raw
        statistics), the layers whose statistics are included, and the time
        it took."""
        t0 = time.perf_counter()
        self._ensure_trial()
        step = self.session.next_step if step is None else step
        inputs, locs, stats = {}, {}, []
        for L in self.layers.values():
            if L.name in skip:
                continue
            r = self._layer_input(L, step)
            if r is None:
                continue
            inputs[L.name], T, has = r
            if T is not None:
                locs[L.name] = T
            if has:
                stats.append(L)
        if fallback:
            for pname, p in self.fallback_params.items():
                if p.grad is None:
                    continue
                g = _dense_grad(pname, p.grad)
                inputs[pname] = {"gradient": _np(g).reshape(list(p.shape) or [1])}
        return inputs, locs, stats, time.perf_counter() - t0

    def _ensure_trial(self):
        if not hasattr(self, "_reduce_trial"):
            self._reduce_trial = _ReduceTrial()

    def collect(self):
        """The step's inputs (block name -> dict) from the captured statistics
        and the current .grad values; blocks without a gradient are left out."""
        return self._collect(fallback=self._mode == "optimizer")[0]

    def _messages(self, inputs, locs, lrs=None, step=None):
        """BlockStep messages of step ``step`` (default: the session's next):
        the per-step conv locations and learning rates are set on the
        messages built (and validated) by the session."""
        msgs = {}
        for name, x in inputs.items():
            bs = self.session._block_step(name, x, step)
            if name in locs and bs.kfac.HasField("raw"):
                bs.kfac.raw.locations = int(locs[name])
            lr = (lrs or {}).get(name)
            if lr is not None:
                bs.learning_rate = lr
            msgs[name] = bs
        return msgs

    def clear_statistics(self):
        for L in self.layers.values():
            L.records.clear()

    # -- streaming (stream=True) and the pipeline (pipelined=True) ------------
    # Two threads, each doing its work in order. The builder turns a layer's
    # tensors into its block as backward finishes it (_build_block); the
    # sender does every session call of a streamed or pipelined step
    # (_send_block, _finish_job). Pipelined, the sender may still be waiting
    # for step t's response while the builder prepares step t+1 (numbered
    # t+1 in advance; if step t fails, step t+1 is dropped unsent).
    def _sender(self):
        if self._sender_pool is None:
            self._sender_pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="natgrad-torch-sender")
        return self._sender_pool

    def _builder(self):
        if self._builder_pool is None:
            self._builder_pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="natgrad-torch-builder")
        return self._builder_pool

    def _attach_grad_hooks(self):
        for L in self.layers.values():
            for p in L.params():
                if hasattr(p, "register_post_accumulate_grad_hook"):  # torch >= 2.1
                    self._handles.append(p.register_post_accumulate_grad_hook(
                        lambda p, L=L: self._accumulated(L, p)))
                    continue
                # Older torch: a post-hook of the parameter's AccumulateGrad
                # node, which runs once per backward, after .grad holds the
                # contributions of every use of the layer. The parameter
                # holds its node weakly, so it is kept alive here.
                with torch.enable_grad():
                    node = p.expand_as(p).grad_fn.next_functions[0][0]
                self._grad_nodes.append(node)
                self._handles.append(node.register_hook(
                    lambda *_, L=L, p=p: self._accumulated(L, p)))

    def _next_number(self):
        """The number the step being collected will have."""
        inflight = self._inflight
        return inflight.step + 1 if inflight is not None else self.session.next_step

    def _accumulated(self, L, p):
        """Backward finished p's gradient; once all of L's parameters have
        theirs (and L's statistics are complete) its block goes to the
        builder thread. A second backward pass before step() invalidates
        the streamed step (its blocks would be stale)."""
        if not self._streaming:
            return
        st = self._st
        if st is None:
            st = self._st = _StreamedStep(self._next_number())
        if st.invalid:
            return
        fired = st.fired.setdefault(L.name, set())
        if id(p) in fired or L.name in st.queued:
            st.invalid = (f"layer '{L.name}' got gradients from a second backward pass before "
                          "step() (several backward passes per step)")
            return
        fired.add(id(p))
        if len(fired) < len(L.params()):
            return
        if any(r[2] is not None for r in L.records):
            return  # sampled statistics not drawn yet (sample_fisher): sent at step()
        lr = self._block_lr(L.name)
        grads = [(q, q.grad, q.grad._version) for q in L.params()]
        weights = [(q, q._version) for q in L.params()] if self.weight_decay else []
        st.queued[L.name] = (lr, grads, weights)
        st.futures.append(self._builder().submit(self._build_block, st, L, lr))

    def _block_lr(self, name):
        """The per-step learning rate a step sends for block ``name`` (None: none)."""
        return None

    def _step_lrs(self, inputs):
        return None

    @torch.no_grad()
    def _build_block(self, st, L, lr):
        """Builder thread: L's block of the streamed step, handed to the sender."""
        if st.error is not None or st.invalid:
            return
        t0 = time.perf_counter()
        try:
            r = self._layer_input(L, st.step)
            if r is None:
                return
            x, T, has = r
            msg = self._messages({L.name: x}, {L.name: T} if T is not None else {},
                                 {L.name: lr} if lr is not None else None, step=st.step)
            if has:
                st.stats.append(L)
                if not L.stats_sent:  # decided now for the next step; undone if this one fails
                    L.stats_sent = True
                    st.first_stats.append(L)
            st.names.append(L.name)
            self._sender().submit(self._send_block, st, msg)
        except BaseException as e:  # noqa: BLE001  (raised by step())
            st.error = e
        finally:
            st.build_s += time.perf_counter() - t0

    def _begin(self, st):
        if self.session.step_open is None:
            n = self.session.begin_step()
            if n != st.step:
                self.session.abort_step()
                raise errors.Internal(f"natgrad.torch: the session is at step {n}, the streamed "
                                      f"step was numbered {st.step}")

    def _send_block(self, st, msg):
        """Sender thread: one block into the open step."""
        if st.error is not None or st.invalid or self._inflight_failed:
            return
        try:
            self._begin(st)
            self.session.send_blocks(msg)
            self.streamed_blocks += 1
        except BaseException as e:  # noqa: BLE001  (raised by step())
            st.error = e
            self.session.abort_step()

    def _finish_job(self, st, msgs, loss, stats, collect_s):
        """Sender thread: the rest of the step, ``last = true``; the result."""
        t0 = time.perf_counter()
        try:
            if st.error is not None:
                self.session.abort_step()  # blocks of it may be on the stream
                raise st.error
            if not msgs and not st.names:
                self.session.abort_step()
                raise errors.FailedPrecondition(
                    "step(): no parameter has a gradient; call loss.backward() first")
            self._begin(st)
            result = self.session.finish_step(msgs, loss=loss)
        except BaseException:
            for L in st.first_stats:
                L.stats_sent = False
            if self.pipelined:
                self._inflight_failed = True  # the next step's blocks are not sent
            raise
        self._stepped(result, st.stats + stats, st.build_s + collect_s + time.perf_counter() - t0)
        return result

    def _streamed_ok(self, st):
        """Whether the blocks streamed in backward are still what step()
        would send; if not, streaming is turned off (with a warning) and the
        step is sent whole."""
        reason = st.invalid
        for name, (lr, grads, weights) in st.queued.items():
            if reason:
                break
            if any(q.grad is not g or g._version != v for q, g, v in grads):
                reason = (f"the gradient of layer '{name}' changed between backward and step() "
                          "(e.g. gradient clipping)")
            elif any(q._version != v for q, v in weights):
                reason = f"the weights of layer '{name}' changed between backward and step()"
            elif lr != self._block_lr(name):
                reason = f"the learning rate of layer '{name}' changed between backward and step()"
        if not reason:
            return True
        self._streaming = False
        msg = (f"natgrad.torch.{type(self).__name__}: stream=True turned off: {reason}; this "
               "and later steps are sent whole at step()")
        log.warning(msg)
        warnings.warn(msg, stacklevel=4)
        return False

    def _discard(self, st):
        """Drops a streamed step's blocks (those on the stream are dropped
        with it by the server) once its builds are done."""
        st.invalid = st.invalid or "discarded"
        concurrent.futures.wait(st.futures)
        for L in st.first_stats:
            L.stats_sent = False
        # Behind every block the builds handed over.
        self._sender().submit(self.session.abort_step).result()
        self.session._shared_memory_discard(st.step)

    def _drop_streamed(self):
        """Forgets the blocks streamed since the last step() (zero_grad, load_state_dict, close)."""
        st, self._st = self._st, None
        if st is not None and st.queued:
            self._discard(st)

    def _take_streamed(self):
        """The streamed step to finish in this step(), or None (nothing
        streamed, or its blocks stale: then it is dropped)."""
        st, self._st = self._st, None
        if st is not None and not st.queued:
            st = None
        if st is not None and not self._streamed_ok(st):
            self._discard(st)
            st = None
        if st is not None:
            # They read .grad, the weights and the records.
            concurrent.futures.wait(st.futures)
        return st

    def _step_sync(self, loss, fallback):
        """One synchronous step (streamed or not): (result, block names), or
        (None, []) when there is nothing to send in preconditioner mode."""
        st = self._take_streamed()
        if st is None:
            inputs, locs, stats, collect_s = self._collect(fallback=fallback)
            if not inputs:
                return None, []
            result = self._send_step(inputs, locs, self._step_lrs(inputs), loss, stats, collect_s)
            return result, list(inputs)
        try:
            inputs, locs, stats, collect_s = self._collect(fallback=fallback, skip=st.queued,
                                                           step=st.step)
            msgs = self._messages(inputs, locs, self._step_lrs(inputs), step=st.step)
        except BaseException:
            self._discard(st)
            raise
        result = self._sender().submit(self._finish_job, st, msgs, loss, stats, collect_s).result()
        return result, st.names + list(msgs)

    def _step_pipelined(self, loss):
        """Pipelined: sends this step (waiting only for its streamed blocks
        to be built) and applies the update of the previous one."""
        st = self._take_streamed()
        prev, self._inflight = self._inflight, None
        prev_result = None
        if prev is not None:
            try:
                prev_result = prev.future.result()
            except BaseException:
                if st is not None:
                    self._discard(st)  # (its blocks were not sent)
                self._inflight_failed = False
                raise
            prev_updates = self._deltas(prev_result, prev.names())
        try:
            if st is not None and st.error is not None:
                raise st.error
            st = st or _StreamedStep(self.session.next_step)
            # Built before the previous update lands: this step's gradients
            # and weights are those of its forward pass.
            inputs, locs, stats, collect_s = self._collect(fallback=True, skip=st.queued,
                                                           step=st.step)
            if not inputs and not st.names:
                raise errors.FailedPrecondition(
                    "step(): no parameter has a gradient; call loss.backward() first")
            msgs = self._messages(inputs, locs, self._step_lrs(inputs), step=st.step)
            fut = self._sender().submit(self._finish_job, st, msgs, loss, stats, collect_s)
            self._inflight = _InFlight(fut, st, list(msgs))
        except BaseException:
            if st is not None and st.queued:
                self._discard(st)
            raise
        finally:
            if prev_result is not None:
                for p, d in prev_updates:
                    p.add_(d)
                self.last_result = prev_result

    def flush(self):
        """Pipelined mode: waits for the step in flight and applies its
        update (call it before evaluating the model; state_dict(),
        load_state_dict() and close() do). Returns its StepResult, or None
        when no step is in flight. Raises the in-flight step's error, if
        any (the update is then not applied and the server did not apply
        the step; blocks streamed since are dropped, and the next step()
        sends them whole)."""
        prev, self._inflight = self._inflight, None
        if prev is None:
            return None
        try:
            result = prev.future.result()
        except BaseException:
            self._drop_streamed()
            self._inflight_failed = False
            raise
        with torch.no_grad():
            for p, d in self._deltas(result, prev.names()):
                p.add_(d)
        self.last_result = result
        return result

    def _settle(self):
        """Before load_state_dict: waits for the step in flight and drops
        its update and any streamed blocks (the checkpoint replaces the
        state; the model's parameters, loaded by the caller, are not
        touched)."""
        prev, self._inflight = self._inflight, None
        if prev is not None:
            try:
                prev.future.result()
            except errors.NatgradError as e:
                log.warning("natgrad.torch: the step in flight failed before load_state_dict: %s", e)
        self._drop_streamed()
        self._inflight_failed = False

    def _deltas(self, result, inputs):
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

    # -- session --------------------------------------------------------------
    def _kfac_block_configs(self, lr, momentum, weight_decay):
        a = self._session_args
        return [_blocks.kfac_dense(
            L.name, L.d_in, L.d_out, bias=L.bias, lr=lr, damping=a["damping"],
            momentum=momentum, weight_decay=weight_decay, damping_mode=a["damping_mode"],
            ema_decay=a["ema_decay"], inverse_period=a["inverse_period"],
            stats_period=a["stats_period"], async_inversion=a["async_inversion"],
            locations=L.locations or None) for L in self.layers.values()]

    def _open_session(self, session):
        """Attaches to ``session`` (a name) or creates this model's session."""
        self._owns_session = session is None
        if session is not None:
            self.session = self.client.get_session(session, shared_memory=self._shared_memory)
            self._check_config(self.session.config, f"session {self.session.name}")
        else:
            a = self._session_args
            self.session = self.client.create_session(
                self._block_configs(), session_id=a["session_id"], kl_clip=a["kl_clip"] or None,
                shared_memory=self._shared_memory,
                adaptive_damping=a["adaptive_damping"], state_dtype=a["state_dtype"],
                display_name=a["display_name"] or f"torch {type(self.model).__name__}")

    def _expected_blocks(self):
        """block name -> (kind, shape) this model needs."""
        want = {L.name: ("kfac_dense", [L.d_out, L.d_in + int(L.bias)]) for L in self.layers.values()}
        if self._mode == "optimizer":
            for pname, p in self.fallback_params.items():
                want[pname] = (self._fallback_kind, list(p.shape) or [1])
        return want

    def _check_config(self, config, what):
        """Raises FailedPrecondition unless ``config`` has exactly this model's blocks."""
        have = {b.name: b for b in config.blocks}
        want = self._expected_blocks()
        for name, (kind, shape) in want.items():
            b = have.get(name)
            if b is None:
                raise errors.FailedPrecondition(f"{what} does not match the model: no block '{name}'",
                                                block=name)
            if self._mode == "optimizer" and kind in ("adam", "sgd"):
                ok = b.WhichOneof("kind") in ("adam", "sgd") and int(np.prod(b.shape)) == int(np.prod(shape))
            else:
                ok = b.WhichOneof("kind") == kind and list(b.shape) == shape
            if not ok:
                raise errors.FailedPrecondition(
                    f"{what} does not match the model: block '{name}' is {b.WhichOneof('kind')} "
                    f"{list(b.shape)}, the model needs {kind} {shape}", block=name)
        extra = sorted(set(have) - set(want))
        if extra:
            raise errors.FailedPrecondition(f"{what} does not match the model: blocks {extra} "
                                            "belong to no parameter of it", block=extra[0])

    # -- checkpoints ----------------------------------------------------------
    def _natgrad_state(self):
        snap = self.client.export_session(self.session.name)
        trial = getattr(self, "_reduce_trial", None)
        return {"format": _STATE_FORMAT, "mode": self._mode, "session": self.session.name,
                "step": snap.last_step, "next_step": snap.last_step + 1,
                "snapshot": snap.SerializeToString(), "target": self.client.target,
                # reduce="auto"'s measurements, so a resumed run keeps its choice
                "reduce_trial": trial.state() if trial is not None else None}

    def _load_natgrad_state(self, ng):
        if not isinstance(ng, dict) or not ng.get("snapshot"):
            raise errors.InvalidArgument("load_state_dict: no natgrad session snapshot in this "
                                         "state_dict (it was not saved by natgrad.torch state_dict())",
                                         field="natgrad.snapshot")
        if ng.get("format") != _STATE_FORMAT:
            raise errors.InvalidArgument(f"load_state_dict: natgrad state format {ng.get('format')!r}, "
                                         f"this client reads {_STATE_FORMAT}", field="natgrad.format")
        if ng.get("mode") != self._mode:
            raise errors.FailedPrecondition(f"load_state_dict: the checkpoint is from a {ng.get('mode')} "
                                            f"({type(self).__name__} is {self._mode} mode)",
                                            field="natgrad.mode")
        snap = session_pb2.SessionSnapshot()
        try:
            snap.ParseFromString(bytes(ng["snapshot"]))
        except Exception as e:  # noqa: BLE001
            raise errors.InvalidArgument(f"load_state_dict: the session snapshot does not parse: {e}",
                                         field="natgrad.snapshot") from None
        if snap.last_step != ng.get("step") or snap.name != ng.get("session"):
            raise errors.InvalidArgument(
                f"load_state_dict: snapshot of {snap.name} at step {snap.last_step}, but the state_dict "
                f"says {ng.get('session')} at step {ng.get('step')}", field="natgrad.step")
        self._check_config(snap.config, f"checkpoint of {snap.name}")
        trial = _ReduceTrial.from_state(ng.get("reduce_trial"))
        try:
            info = self.client.get_session_info(snap.name)
        except errors.NotFound:
            info = None
        if info is not None:
            if info.last_step != snap.last_step:
                raise errors.FailedPrecondition(
                    f"load_state_dict: {snap.name} on the server is at step {info.last_step}, the "
                    f"checkpoint at step {snap.last_step}; delete the session (or load into a server "
                    "without it) to restore the checkpoint", field="natgrad.step")
            if info.config != snap.config:
                raise errors.FailedPrecondition(f"load_state_dict: {snap.name} on the server has a "
                                                "different configuration than the checkpoint")
            if self.session is not None and self.session.name == snap.name:
                self.session._reset(info)
                self._reduce_trial = trial
                return
            new = natgrad.Session(self.client, info, shared_memory=self._shared_memory)
        else:
            new = self.client.import_session(snap, shared_memory=self._shared_memory)
        self._reduce_trial = trial
        old, self.session = self.session, new
        if old is not None:
            # The session this object created and never stepped is garbage now.
            if self._owns_session and old.next_step == 1:
                try:
                    old.delete()
                except errors.NatgradError as e:
                    log.warning("natgrad.torch: could not delete the unused session %s: %s", old.name, e)
            else:
                old.close()
        self._owns_session = False

    def close(self, delete=False):
        """Applies the step in flight (pipelined mode), removes hooks and
        closes the stream (and deletes the session if asked). An error of
        the step in flight is raised after everything is closed."""
        err = None
        try:
            self.flush()
        except errors.NatgradError as e:
            err = e
        self._drop_streamed()
        for pool in (self._builder_pool, self._sender_pool):
            if pool is not None:
                pool.shutdown(wait=True)
        self._builder_pool = self._sender_pool = None
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._grad_nodes.clear()
        if self.session is not None:
            if delete:
                self.session.delete()
            else:
                self.session.close()
        if err is not None:
            raise err

    def __repr__(self):
        return (f"natgrad.torch.{type(self).__name__}(session={self.session and self.session.name}, "
                f"kfac_layers={list(self.layers)}, fallback={list(self.fallback_params)})")


_TRIU = {}


def _packed_factors(a, g, bias, n, grad_dtype):
    """A = abar^T abar / n and G = g^T g / rows (the server's scaling of raw
    rows: KFC, as kfac-jax; rows = n*T) as torch matmuls on the rows' device
    in the gradient's precision (float32 unless it is float64), returned as
    CPU numpy upper triangles packed row by row (step.proto's
    ReducedKfacStatistics.packed)."""
    dt = torch.float64 if grad_dtype == torch.float64 else torch.float32
    a = a.to(dt)
    g = g.to(dt)
    rows, d = a.shape
    if bias:  # [a, 1]^T [a, 1] without materialising the column of ones
        A = torch.empty(d + 1, d + 1, dtype=dt, device=a.device)
        A[:d, :d] = a.T @ a
        s = a.sum(0)
        A[:d, d] = s
        A[d, :d] = s
        A[d, d] = rows
    else:
        A = a.T @ a
    A /= n
    G = g.T @ g
    G /= rows
    return _np(_upper(A)), _np(_upper(G))


def _upper(m):
    d = m.shape[0]
    key = (d, m.device)
    idx = _TRIU.get(key)
    if idx is None:
        idx = _TRIU[key] = torch.triu_indices(d, d, device=m.device)  # row-major order
    return m[idx[0], idx[1]]


def _check_args(fisher, loss_reduction, reduce):
    if fisher not in ("empirical", "sampled"):
        raise ValueError(f"fisher must be 'empirical' or 'sampled', got {fisher!r}")
    if loss_reduction not in ("mean", "sum"):
        raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
    if reduce not in ("auto", True, False):
        raise ValueError("reduce must be 'auto', True or False")


class KFAC(_KfacModel, torch.optim.Optimizer):
    """K-FAC through natgrad-server for a torch.nn.Module (optimizer mode).

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
    locations: {conv layer: T} for the block config (only a default: every
      step sends its own T).
    stream: send each K-FAC layer's block as backward produces it (module
      docstring; bit-identical updates).
    pipelined: step() sends the step and applies the previous step's
      update, so the round trip overlaps the next forward/backward; every
      update is one step stale (module docstring). Call flush() to apply
      the step in flight.
    shared_memory: with a server on this host started with
      --shared_memory, move the step's tensors through POSIX shared memory
      instead of the gRPC messages (natgrad.Session; docs/torch_overlap.md).
      Bit-identical updates; True, False, "auto" (inline from the server's
      first refusal on) or the first region size in bytes.

    param_groups: [0] the K-FAC layers (lr, damping, momentum, weight_decay),
    [1] the fallback parameters (lr = fallback_lr) -- either absent when it
    would be empty. A numeric ``lr`` of each group is sent with every step
    and replaces the server's schedule for that step, so torch LR schedulers
    work (a schedule given as a natgrad.schedules message is evaluated on the
    server instead). damping, momentum and weight_decay are the server's
    schedules: changing them in param_groups raises at the next step.
    """

    _mode = "optimizer"

    def __init__(self, model, target=None, *, client=None, session=None, token=None, tls=None,
                 lr=0.1, damping=1e-3, momentum=0.9, weight_decay=0.0, damping_mode="tikhonov",
                 ema_decay=None, inverse_period=None, stats_period=None, kl_clip=1e-3,
                 adaptive_damping=False, fisher="empirical", loss_reduction="mean",
                 accumulation_steps=1, fallback="adam", fallback_lr=1e-3, fallback_kwargs=None,
                 skip_layers=(), reduce="auto", state_dtype=None, session_id=None,
                 display_name=None, async_inversion=False, locations=None, stream=False,
                 pipelined=False, shared_memory=False):
        _check_args(fisher, loss_reduction, reduce)
        if fallback not in ("adam", "sgd"):
            raise ValueError(f"fallback must be 'adam' or 'sgd', got {fallback!r}")
        self.model = model
        self.fisher = fisher
        self.loss_reduction = loss_reduction
        self.accumulation_steps = int(accumulation_steps)
        self.reduce = reduce
        self.weight_decay = weight_decay
        self._fallback_kind = fallback
        self._handles = []
        self.session = None
        self._plan(model, skip_layers, fallback)
        for name, T in (locations or {}).items():
            self.layers[name].locations = int(T)

        kfac_params = [p for L in self.layers.values() for p in L.params()]
        groups = []
        if kfac_params:
            groups.append({"params": kfac_params, "natgrad_blocks": "kfac"})
        if self.fallback_params:
            groups.append({"params": list(self.fallback_params.values()), "lr": fallback_lr,
                           "natgrad_blocks": "fallback"})
        if not groups:
            raise ValueError("natgrad.torch.KFAC: the model has no trainable parameters")
        super().__init__(groups, dict(lr=lr, damping=damping, momentum=momentum,
                                      weight_decay=weight_decay))
        # Values that are the server's schedules; a change in param_groups is
        # refused (it would silently do nothing).
        self._fixed = {"damping": damping, "momentum": momentum, "weight_decay": weight_decay}

        self._session_args = dict(
            lr=lr, damping=damping, momentum=momentum, weight_decay=weight_decay,
            damping_mode=damping_mode, ema_decay=ema_decay, inverse_period=inverse_period,
            stats_period=stats_period, async_inversion=async_inversion, kl_clip=kl_clip,
            adaptive_damping=adaptive_damping, state_dtype=state_dtype, session_id=session_id,
            display_name=display_name, fallback_lr=fallback_lr, fallback_kwargs=fallback_kwargs)
        self._init_streaming(stream, pipelined)
        self._shared_memory = shared_memory
        self._connect(target, client, token, tls)
        self._open_session(session)
        self.last_result = None
        self._attach_hooks()

    def _block_configs(self):
        a = self._session_args
        cfg = self._kfac_block_configs(a["lr"], a["momentum"], a["weight_decay"] or None)
        fk = dict(a["fallback_kwargs"] or {})
        make = _blocks.adam if self._fallback_kind == "adam" else _blocks.sgd
        for pname, p in self.fallback_params.items():
            cfg.append(make(pname, list(p.shape) or [1], lr=a["fallback_lr"], **fk))
        return cfg

    def _group(self, which):
        for g in self.param_groups:
            if g.get("natgrad_blocks") == which:
                return g
        return None

    def _block_lr(self, name):
        g = self._group("kfac" if name in self.layers else "fallback")
        return _number(g["lr"]) if g is not None else None

    def _step_lrs(self, inputs):
        """block name -> this step's learning rate from param_groups (numbers only)."""
        out = {}
        gk, gf = self._group("kfac"), self._group("fallback")
        for k, v in self._fixed.items():
            if gk is not None and gk[k] is not v and gk[k] != v:
                raise errors.FailedPrecondition(
                    f"param_groups[0]['{k}'] changed from {v!r} to {gk[k]!r}: natgrad applies the "
                    f"{k} schedule given at construction on the server (only 'lr' may be changed, "
                    "e.g. by a torch LR scheduler)", field=k)
        lk = _number(gk["lr"]) if gk is not None else None
        lf = _number(gf["lr"]) if gf is not None else None
        for name in inputs:
            lr = lk if name in self.layers else lf
            if lr is not None:
                if not lr >= 0:
                    raise errors.InvalidArgument(f"block '{name}': learning rate {lr} from param_groups, "
                                                 "want >= 0", block=name, field="learning_rate")
                out[name] = lr
        return out

    def zero_grad(self, set_to_none=True):
        """Sets grads to None by default (torch >= 2.0's default), so that a
        layer unused in the next step is recognised and left out of it.
        Blocks streamed since the last step() are dropped."""
        self._drop_streamed()
        super().zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure=None, loss=None):
        """Sends one step and applies the returned deltas. ``loss`` (a float
        or a 0-d tensor) drives adaptive damping. Returns the closure's loss.

        pipelined=True: sends this step and returns without waiting; the
        update applied here is the previous step's (raising its error, if it
        failed: then nothing of this step is sent, the server's step counter
        is where that failed step left it, and training may go on)."""
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        loss_value = None
        if loss is not None:
            loss_value = float(loss.detach()) if torch.is_tensor(loss) else float(loss)
        if self.pipelined:
            try:
                self._step_pipelined(loss_value)
            finally:
                self.clear_statistics()
            return loss
        try:
            result, names = self._step_sync(loss_value, fallback=True)
            if result is None:
                raise errors.FailedPrecondition(
                    "step(): no parameter has a gradient; call loss.backward() first")
            updates = self._deltas(result, names)
        finally:
            self.clear_statistics()
        for p, d in updates:
            p.add_(d)
        self.last_result = result
        return loss

    def state_dict(self):
        """A full checkpoint: param_groups (lr, ...) and the exported session
        (all optimizer state, which lives on the server) with its step.
        Pipelined: the step in flight is applied first (flush()), so take
        the model's parameters after this call, or call flush() first."""
        self.flush()
        groups = []
        i = 0
        for g in self.param_groups:
            n = len(g["params"])
            groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": list(range(i, i + n))})
            i += n
        return {"state": {}, "param_groups": groups, "natgrad": self._natgrad_state()}

    def load_state_dict(self, state_dict):
        """Restores a state_dict() checkpoint: imports its session into the
        server when the server does not have it, else checks the server's
        session is at the checkpoint's step. Raises a natgrad error (and
        changes nothing) on any mismatch."""
        groups = state_dict.get("param_groups") or []
        if len(groups) != len(self.param_groups) or any(
                len(s["params"]) != len(g["params"]) or s.get("natgrad_blocks") != g.get("natgrad_blocks")
                for s, g in zip(groups, self.param_groups)):
            raise errors.FailedPrecondition("load_state_dict: the checkpoint's param_groups do not "
                                            "match this model's (K-FAC / fallback parameters)",
                                            field="param_groups")
        self._settle()
        self._load_natgrad_state(state_dict.get("natgrad"))
        for s, g in zip(groups, self.param_groups):
            for k, v in s.items():
                if k != "params":
                    g[k] = v
        gk = self._group("kfac")
        if gk is not None:
            self._fixed = {k: gk[k] for k in self._fixed}


class KFACPreconditioner(_KfacModel):
    """K-FAC preconditioning through natgrad-server for your own optimizer.

    ``step()`` replaces each K-FAC layer's ``.grad`` with its preconditioned
    gradient; every other parameter keeps its ``.grad`` (no server block), so
    e.g. torch.optim.SGD / AdamW and any LR scheduler do the update. The
    server blocks run with learning rate 1, momentum 0 and weight decay 0, so
    the server's delta is exactly -(preconditioned gradient) and ``.grad`` is
    set to -delta.

    KL clipping (``kl_clip=kappa``, off by default) is computed on the server
    at learning rate 1: nu = min(1, sqrt(kappa / |sum <V, grad>|)) over all
    K-FAC blocks. kfac-pytorch's ``kl_clip`` at learning rate eta divides by
    eta^2 inside the root, so pass kappa / eta^2 to get its clipping (it does
    not follow a scheduler's changes of eta).

    Arguments as for KFAC (damping, damping_mode, ema_decay, inverse_period,
    stats_period, fisher, loss_reduction, accumulation_steps, skip_layers,
    reduce, state_dtype, stream, shared_memory, ...; not pipelined). kfac-pytorch's names are accepted too:
    factor_update_steps (= stats_period), inv_update_steps (=
    inverse_period), factor_decay (= ema_decay).
    """

    _mode = "preconditioner"
    _fallback_kind = "untouched"

    def __init__(self, model, target=None, *, client=None, session=None, token=None, tls=None,
                 damping=1e-3, damping_mode="tikhonov", ema_decay=None, inverse_period=None,
                 stats_period=None, kl_clip=None, adaptive_damping=False, fisher="empirical",
                 loss_reduction="mean", accumulation_steps=1, skip_layers=(), reduce="auto",
                 state_dtype=None, session_id=None, display_name=None, async_inversion=False,
                 locations=None, factor_update_steps=None, inv_update_steps=None, factor_decay=None,
                 stream=False, shared_memory=False):
        _check_args(fisher, loss_reduction, reduce)
        stats_period = stats_period if factor_update_steps is None else factor_update_steps
        inverse_period = inverse_period if inv_update_steps is None else inv_update_steps
        ema_decay = ema_decay if factor_decay is None else factor_decay
        self.model = model
        self.fisher = fisher
        self.loss_reduction = loss_reduction
        self.accumulation_steps = int(accumulation_steps)
        self.reduce = reduce
        self.weight_decay = 0.0
        self._handles = []
        self.session = None
        self._plan(model, skip_layers, "untouched")
        if not self.layers:
            raise errors.FailedPrecondition(
                "natgrad.torch.KFACPreconditioner: no layer of the model can have a K-FAC block\n"
                + self.format_report())
        for name, T in (locations or {}).items():
            self.layers[name].locations = int(T)
        self._session_args = dict(
            damping=damping, damping_mode=damping_mode, ema_decay=ema_decay,
            inverse_period=inverse_period, stats_period=stats_period,
            async_inversion=async_inversion, kl_clip=kl_clip, adaptive_damping=adaptive_damping,
            state_dtype=state_dtype, session_id=session_id,
            display_name=display_name or f"torch {type(model).__name__} preconditioner")
        self._init_streaming(stream, False)
        self._shared_memory = shared_memory
        self._connect(target, client, token, tls)
        self._open_session(session)
        self.last_result = None
        self._attach_hooks()

    def _block_configs(self):
        return self._kfac_block_configs(1.0, 0.0, 0.0)

    @torch.no_grad()
    def step(self, loss=None):
        """Preconditions the K-FAC layers' .grad in place (other .grad
        untouched). Returns the StepResult, or None when no K-FAC layer had
        a gradient (nothing sent). ``loss`` drives adaptive damping."""
        loss_value = None
        if loss is not None:
            loss_value = float(loss.detach()) if torch.is_tensor(loss) else float(loss)
        try:
            result, names = self._step_sync(loss_value, fallback=False)
            if result is None:
                return None
            updates = self._deltas(result, names)
        finally:
            self.clear_statistics()
        for p, d in updates:
            if p.grad is None:
                p.grad = -d
            else:
                p.grad.copy_(-d)
        self.last_result = result
        return result

    def state_dict(self):
        """The exported session (the factors live on the server) and its step."""
        return {"natgrad": self._natgrad_state()}

    def load_state_dict(self, state_dict):
        """As KFAC.load_state_dict: imports or verifies the session."""
        self._drop_streamed()
        self._load_natgrad_state(state_dict.get("natgrad"))


# Re-exported here; the classes live in their own modules.
from natgrad.torch_shampoo import Shampoo  # noqa: E402,F401
from natgrad.torch_soap import SOAP  # noqa: E402,F401


def __getattr__(name):
    # EKFAC subclasses KFAC in its own module (which imports this one), so it
    # is loaded on first use rather than here.
    if name == "EKFAC":
        from natgrad.torch_ekfac import EKFAC
        return EKFAC
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
