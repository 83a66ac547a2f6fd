"""natgrad.jax: K-FAC through natgrad-server for a pytree of JAX parameters.

JAX has no hooks, so the caller supplies each layer's statistics: the layer
inputs ``a`` (n x d_in) and the per-example output gradients ``g``
(n x d_out) of the *per-example* loss (e.g. the cotangent of the layer's
pre-activations from ``jax.vjp`` of the summed loss, or n times that of the
mean loss). Everything here is numpy + jax.tree_util; jit your loss and
statistics functions as usual.

    params = {"dense1": {"w": w1, "b": b1}, "dense2": {"w": w2, "b": b2}, "scale": s}
    opt = natgrad.jax.KFAC(params, target="localhost:50051", lr=0.1, damping=1e-3)
    grads = jax.grad(mean_loss)(params)
    params = opt.step(params, grads, stats={"dense1": (a1, g1), "dense2": (a2, g2)}, loss=l)

Layers: by default every dict with a 2-D "w"/"kernel" leaf (and optionally
a 1-D "b"/"bias" leaf) is a K-FAC layer named by its path ("dense1",
"params/Dense_0"). Kernels are [d_in, d_out] as in Flax/Haiku
(``kernel_layout="in_out"``); use "out_in" for [d_out, d_in] weights.
Or pass ``layers={"name": ("path/to/w", "path/to/b" or None)}``.
Every other leaf is on a server-side Adam (or SGD) block named by its path.
"""
import numpy as np

try:
    import jax
    import jax.numpy as jnp
except ImportError as e:  # pragma: no cover - exercised when jax is missing
    raise ImportError("natgrad.jax needs jax (scripts/setup-python installs jax[cpu])") from e

import natgrad
from natgrad import blocks as _blocks
from natgrad import errors

__all__ = ["KFAC", "path_str", "find_layers"]

_W_KEYS = ("w", "kernel", "weight")
_B_KEYS = ("b", "bias")


def _key_str(k):
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def path_str(path):
    """A jax key path -> "a/b/0"."""
    return "/".join(_key_str(k) for k in path)


def _flatten(tree):
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return [(path_str(p), v) for p, v in leaves], treedef


def find_layers(params, kernel_layout="in_out"):
    """{layer name: (weight path, bias path or None)} for every dict holding a
    2-D w/kernel/weight leaf (and optionally a matching 1-D b/bias)."""
    flat, _ = _flatten(params)
    by_parent = {}
    for p, v in flat:
        parent, _, leaf = p.rpartition("/")
        by_parent.setdefault(parent, {})[leaf] = v
    out = {}
    for parent, leaves in by_parent.items():
        wk = next((k for k in _W_KEYS if k in leaves and np.ndim(leaves[k]) == 2), None)
        if wk is None:
            continue
        d_out = np.shape(leaves[wk])[1 if kernel_layout == "in_out" else 0]
        bk = next((k for k in _B_KEYS if k in leaves and np.shape(leaves[k]) == (d_out,)), None)
        name = parent or "layer"
        out[name] = (f"{parent}/{wk}" if parent else wk, (f"{parent}/{bk}" if parent else bk) if bk else None)
    return out


class KFAC:
    """K-FAC for a pytree; see the module docstring. Keyword arguments are
    those of natgrad.torch.KFAC (lr, damping, momentum, weight_decay,
    damping_mode, ema_decay, inverse_period, kl_clip, adaptive_damping,
    fallback, fallback_lr, state_dtype, ...)."""

    def __init__(self, params, target=None, *, client=None, layers=None, kernel_layout="in_out",
                 token=None, tls=None, lr=0.1, damping=1e-3, momentum=0.9, weight_decay=0.0,
                 damping_mode="tikhonov", ema_decay=None, inverse_period=None, stats_period=None,
                 kl_clip=1e-3, adaptive_damping=False, fallback="adam", fallback_lr=1e-3,
                 fallback_kwargs=None, reduce="auto", state_dtype=None, session_id=None,
                 display_name=None):
        if kernel_layout not in ("in_out", "out_in"):
            raise ValueError("kernel_layout must be 'in_out' or 'out_in'")
        self.kernel_layout = kernel_layout
        self.reduce = reduce
        self.weight_decay = weight_decay
        flat, self.treedef = _flatten(params)
        self.paths = [p for p, _ in flat]
        shapes = {p: tuple(np.shape(v)) for p, v in flat}
        self.layers = dict(layers) if layers is not None else find_layers(params, kernel_layout)
        covered = set()
        self.dims = {}
        for name, (wp, bp) in self.layers.items():
            if wp not in shapes or len(shapes[wp]) != 2:
                raise errors.InvalidArgument(f"layer '{name}': '{wp}' is not a 2-D leaf of params",
                                             block=name, field="w")
            d_in, d_out = shapes[wp] if kernel_layout == "in_out" else shapes[wp][::-1]
            if bp is not None and shapes.get(bp) != (d_out,):
                raise errors.InvalidArgument(f"layer '{name}': bias '{bp}' has shape "
                                             f"{shapes.get(bp)}, expected ({d_out},)", block=name, field="b")
            self.dims[name] = (d_in, d_out)
            covered.update([wp] + ([bp] if bp else []))
        self.fallback = [p for p in self.paths if p not in covered]
        if client is None:
            if target is None:
                raise ValueError("natgrad.jax.KFAC: give target='host:port' or client=")
            client = natgrad.Client(target, token=token, tls=tls)
        self.client = client
        cfg = []
        for name, (wp, bp) in self.layers.items():
            d_in, d_out = self.dims[name]
            cfg.append(_blocks.kfac_dense(
                name, d_in, d_out, bias=bp is not None, lr=lr, damping=damping, momentum=momentum,
                weight_decay=weight_decay or None, damping_mode=damping_mode, ema_decay=ema_decay,
                inverse_period=inverse_period, stats_period=stats_period))
        make = _blocks.adam if fallback == "adam" else _blocks.sgd
        for p in self.fallback:
            cfg.append(make(p, list(shapes[p]) or [1], lr=fallback_lr, **dict(fallback_kwargs or {})))
        self.session = client.create_session(cfg, session_id=session_id, kl_clip=kl_clip or None,
                                             adaptive_damping=adaptive_damping, state_dtype=state_dtype,
                                             display_name=display_name or "jax pytree")
        self.last_result = None

    def _w(self, arr):
        a = np.asarray(arr)
        return a.T if self.kernel_layout == "in_out" else a

    def step(self, params, grads, stats, loss=None):
        """One step: ``grads`` has params' structure (mean loss); ``stats``
        maps layer name -> (a, g) raw rows or {"a_factor", "g_factor",
        "num_examples"}. Returns the updated params (jax arrays)."""
        pflat, ptree = _flatten(params)
        gflat, gtree = _flatten(grads)
        if ptree != self.treedef:
            raise errors.InvalidArgument("params do not have the structure the optimizer was built for")
        if gtree != self.treedef:
            raise errors.InvalidArgument("grads do not have the structure of params")
        P = dict(pflat)
        G = dict(gflat)
        missing = set(self.layers) - set(stats)
        if missing:
            raise errors.InvalidArgument(f"no statistics for layer(s) {sorted(missing)}",
                                         block=sorted(missing)[0], field="stats")
        extra = set(stats) - set(self.layers)
        if extra:
            raise errors.InvalidArgument(f"statistics for unknown layer(s) {sorted(extra)} "
                                         f"(layers: {sorted(self.layers)})", block=sorted(extra)[0])
        inputs = {}
        for name, (wp, bp) in self.layers.items():
            gw = self._w(G[wp])
            if bp is not None:
                gw = np.concatenate([gw, np.asarray(G[bp]).reshape(-1, 1)], axis=1)
            x = {"gradient": gw}
            if self.weight_decay:
                w = self._w(P[wp])
                if bp is not None:
                    w = np.concatenate([w, np.asarray(P[bp]).reshape(-1, 1)], axis=1)
                x["params"] = w
            s = stats[name]
            if isinstance(s, dict):
                x.update(s)
            else:
                a, g = (np.asarray(v) for v in s)
                a = a.reshape(-1, a.shape[-1])
                g = g.reshape(-1, g.shape[-1])
                d_in, d_out = self.dims[name]
                din1 = d_in + int(bp is not None)
                if self.reduce is True or (self.reduce == "auto" and a.shape[1] == d_in
                                          and din1 * din1 + d_out * d_out < a.shape[0] * (d_in + d_out)):
                    a64 = a.astype(np.float64)
                    if bp is not None:
                        a64 = np.concatenate([a64, np.ones((a64.shape[0], 1))], axis=1)
                    g64 = g.astype(np.float64)
                    dt = gw.dtype if gw.dtype == np.float64 else np.float32
                    x["a_factor"] = (a64.T @ a64 / a.shape[0]).astype(dt)
                    x["g_factor"] = (g64.T @ g64 / g.shape[0]).astype(dt)
                    x["num_examples"] = a.shape[0]
                else:
                    x["activations"], x["output_gradients"] = a, g
            inputs[name] = x
        for p in self.fallback:
            inputs[p] = {"gradient": np.asarray(G[p]).reshape(list(np.shape(P[p])) or [1])}
        r = self.session.step(inputs, loss=loss)
        new = dict(P)
        for name, (wp, bp) in self.layers.items():
            d = r[name]
            d_in = self.dims[name][0]
            dw = d[:, :d_in]
            new[wp] = np.asarray(P[wp]) + (dw.T if self.kernel_layout == "in_out" else dw).astype(np.asarray(P[wp]).dtype)
            if bp is not None:
                new[bp] = np.asarray(P[bp]) + d[:, d_in].astype(np.asarray(P[bp]).dtype)
        for p in self.fallback:
            new[p] = np.asarray(P[p]) + r[p].reshape(np.shape(P[p])).astype(np.asarray(P[p]).dtype)
        self.last_result = r
        return jax.tree_util.tree_unflatten(self.treedef, [jnp.asarray(new[p]) for p in self.paths])

    def close(self, delete=False):
        if delete:
            self.session.delete()
        else:
            self.session.close()
