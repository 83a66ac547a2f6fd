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

Layers: by default every dict with a "w"/"kernel" leaf of 2 or more
dimensions (and optionally a 1-D "b"/"bias" leaf) is a K-FAC layer named by
its path ("dense1", "params/Dense_0"). Kernels are [d_in, d_out] as in
Flax/Haiku (``kernel_layout="in_out"``); use "out_in" for [d_out, d_in]
weights. Or pass ``layers={"name": ("path/to/w", "path/to/b" or None)}``.
Every other leaf (and every layer in ``exclude``) is on a server-side Adam
(or SGD) block named by its path.

Convolutions: a kernel with more than two dimensions ([*window, c_in, c_out]
as Flax's HWIO, or [c_out, c_in, *window] with "out_in") is a K-FAC block
over unfolded patches, d_in = prod(window) * c_in. Give its number of output
positions per example, ``locations={"conv1": T}`` (a convolution without one
is refused at construction), and as statistics the patches and the output
gradients, each [n, ..., d] or [n*T, d]: ``conv_patches`` unfolds an input
in the kernel's flattening order. As in kfac-jax (and the server), the
factors are A = abar^T abar / n and G = g^T g / (n*T); reduced statistics
computed here use that scaling.

Checkpoints: ``state_dict()`` is a pytree (str and numpy leaves) holding the
exported session (ExportSession) and its step; ``load_state_dict(state)`` or
``KFAC(params, target=..., state=state)`` imports it into a server that lacks
the session, or checks the step on one that has it, raising a natgrad error
on any mismatch.

Pipelined mode (``pipelined=True``, opt-in): ``step()`` hands the step (its
arrays already on the host) to a background thread and returns at once with
the update of the previous call's step applied, so step t's round trip
overlaps the caller's forward/backward of t+1. The updates are one step
stale: step t+1's gradient is taken at parameters without step t's update,
and the first call returns params unchanged. An error of the step in flight
raises at the next ``step()``/``flush()``/``close()`` (that call's own step
is not sent; the session's step counter stays put). ``params =
opt.flush(params)`` drains the step in flight and applies its update.

Natural-gradient directions in your own coordinates: ``natural_direction(
xi_of_theta, theta, dl_deta)`` pushes dL/deta (the natural gradient in
theta) through xi_of_theta with one jax.jvp; see its docstring.
"""
import numpy as np

try:
    import jax
    import jax.numpy as jnp
except ImportError as e:  # pragma: no cover - exercised when jax is missing
    raise ImportError("natgrad.jax needs jax (scripts/setup-python installs jax[cpu])") from e

import concurrent.futures
import functools
import time

import natgrad
from natgrad import blocks as _blocks
from natgrad import errors
from natgrad._reduce_trial import ReduceTrial
from natgrad._pb import session_pb2

__all__ = ["KFAC", "path_str", "find_layers", "conv_patches", "natural_direction", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = 1

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


def _kernel_dims(shape, kernel_layout):
    """(d_in, d_out) of a kernel of this shape as a K-FAC block."""
    if kernel_layout == "in_out":
        return int(np.prod(shape[:-1])), int(shape[-1])
    return int(np.prod(shape[1:])), int(shape[0])


def find_layers(params, kernel_layout="in_out"):
    """{layer name: (weight path, bias path or None)} for every dict holding a
    w/kernel/weight leaf of 2 or more dimensions (and optionally a matching
    1-D b/bias). Kernels of more than 2 dimensions are convolutions."""
    flat, _ = _flatten(params)
    by_parent = {}
    for p, v in flat:
        parent, _, leaf = p.rpartition("/")
        by_parent.setdefault(parent, {})[leaf] = v
    out = {}
    for parent, leaves in by_parent.items():
        wk = next((k for k in _W_KEYS if k in leaves and np.ndim(leaves[k]) >= 2), None)
        if wk is None:
            continue
        d_out = _kernel_dims(np.shape(leaves[wk]), kernel_layout)[1]
        bk = next((k for k in _B_KEYS if k in leaves and np.shape(leaves[k]) == (d_out,)), None)
        name = parent or "layer"
        out[name] = (f"{parent}/{wk}" if parent else wk, (f"{parent}/{bk}" if parent else bk) if bk else None)
    return out


_SPATIAL = {1: "H", 2: "HW", 3: "DHW"}


def conv_patches(x, window, strides=1, padding="VALID", dilation=1, kernel_layout="in_out"):
    """Unfolds a channels-last input x [n, *spatial, c_in] into the patches
    a convolution multiplies with its kernel: [n, T, prod(window) * c_in],
    T = number of output positions, features in the order of
    ``kernel.reshape(-1, c_out)`` (in_out, [*window, c_in, c_out]) or of
    ``kernel.reshape(c_out, -1)`` (out_in, [c_out, c_in, *window]). So
    ``patches @ kernel.reshape(-1, c_out)`` is the convolution's output
    (without bias) flattened to [n, T, c_out]. strides/dilation: int or
    per spatial dim; padding: "VALID", "SAME" or [(lo, hi), ...]."""
    x = jnp.asarray(x)
    nd = x.ndim - 2
    if nd not in _SPATIAL:
        raise ValueError(f"conv_patches: x must be [n, *spatial, c_in] with 1-3 spatial dims, got {x.shape}")
    window = (int(window),) * nd if np.ndim(window) == 0 else tuple(int(w) for w in window)
    strides = (int(strides),) * nd if np.ndim(strides) == 0 else tuple(int(v) for v in strides)
    dilation = (int(dilation),) * nd if np.ndim(dilation) == 0 else tuple(int(v) for v in dilation)
    sp = _SPATIAL[nd]
    dn = ("N" + sp + "C", sp + "IO", "N" + sp + "C")
    p = jax.lax.conv_general_dilated_patches(x, window, strides, padding, rhs_dilation=dilation,
                                             dimension_numbers=dn)
    n, c = x.shape[0], x.shape[-1]
    k = int(np.prod(window))
    p = p.reshape(n, -1, c, k)  # features come out channel-major: (c_in, *window)
    if kernel_layout == "in_out":
        p = jnp.swapaxes(p, -1, -2)  # -> (*window, c_in), HWIO's flattening
    elif kernel_layout != "out_in":
        raise ValueError("kernel_layout must be 'in_out' or 'out_in'")
    return p.reshape(n, p.shape[1], k * c)


def natural_direction(xi_of_theta, theta, dl_deta, *, return_xi=False):
    """The natural-gradient direction of an exponential family (e.g. a
    Gaussian) in any representation xi of your choosing, in one forward pass.

    For an exponential family with natural parameters theta and expectation
    parameters eta, the natural gradient with respect to theta is the plain
    gradient dL/deta. A step theta' = theta - gamma dL/deta, seen through
    xi = xi_of_theta(theta), moves xi along

        xi_dot = (d xi / d theta) . dL/deta,

    which is exactly ``jax.jvp(xi_of_theta, (theta,), (dl_deta,))``:
    the Jacobian is never formed, and the cost is about one evaluation of
    xi_of_theta. The update to first order is xi' = xi - gamma xi_dot (the
    sign is that of the server's ``direction1/direction2``, which this
    reproduces for the Gaussian blocks' parametrisations).

    xi_of_theta: theta -> xi, any JAX-traceable function; theta, dl_deta and
    xi may be pytrees (dl_deta has theta's structure, one cotangent-shaped
    leaf per theta leaf; numpy or Python leaves are converted, the tangents
    to their primal's dtype). Returns the direction, a pytree shaped like
    xi, or ``(xi, direction)`` with return_xi=True.

    Example, a full Gaussian q = N(m, S) in mean + Cholesky coordinates
    xi = (m, L), S = L L^T, with theta = (S^-1 m, -1/2 S^-1):

        def xi_of_theta(theta):
            t1, t2 = theta
            S = jnp.linalg.inv(-2.0 * t2)
            return S @ t1, jnp.linalg.cholesky(S)

        theta = (jnp.linalg.solve(S, m), -0.5 * jnp.linalg.inv(S))
        dm, dL = natgrad.jax.natural_direction(xi_of_theta, theta, (g1, g2))
        # g1 = dL/deta1 = dL/dm - 2 G m, g2 = dL/deta2 = G = sym(dL/dS):
        # natgrad.gaussian.expectation_gradient gives them from dL/dm, dL/dL.

    dL is lower triangular (the tangent of a Cholesky factor) and equals
    L Phi(2 L^T g2 L), Phi = lower triangle with the diagonal halved; dm =
    S (g1 + 2 g2 m). A symmetric g2 (as the server's) matters here: the jvp
    of inv(-2 t2) sees the tangent as given.
    """
    theta = jax.tree_util.tree_map(jnp.asarray, theta)
    t_def = jax.tree_util.tree_structure(theta)
    try:
        d_leaves = t_def.flatten_up_to(dl_deta)
    except (ValueError, TypeError) as e:
        raise ValueError(f"natural_direction: dl_deta must have theta's pytree structure {t_def}: {e}") from e
    p_leaves = jax.tree_util.tree_leaves(theta)
    tangents = []
    for i, (p, d) in enumerate(zip(p_leaves, d_leaves)):
        d = jnp.asarray(d, dtype=p.dtype)
        if d.shape != p.shape:
            raise ValueError(f"natural_direction: dl_deta leaf {i} has shape {tuple(d.shape)}, "
                             f"theta's has {tuple(p.shape)}")
        tangents.append(d)
    xi, direction = jax.jvp(xi_of_theta, (theta,), (jax.tree_util.tree_unflatten(t_def, tangents),))
    return (xi, direction) if return_xi else direction


@functools.partial(jax.jit, static_argnames=("bias",))
def _reduced_factors(a, g, n, bias):
    """A = abar^T abar / n and G = g^T g / rows as packed upper triangles
    (row by row), in the rows' dtype; HIGHEST keeps float32 matmuls float32
    on accelerators (no TF32/bfloat16 passes)."""
    if bias:
        a = jnp.concatenate([a, jnp.ones((a.shape[0], 1), a.dtype)], axis=1)
    hi = jax.lax.Precision.HIGHEST
    A = jnp.matmul(a.T, a, precision=hi) / jnp.asarray(n, a.dtype)
    G = jnp.matmul(g.T, g, precision=hi) / jnp.asarray(g.shape[0], g.dtype)
    ia = jnp.triu_indices(A.shape[0])
    ig = jnp.triu_indices(G.shape[0])
    return A[ia], G[ig]

class KFAC:
    """K-FAC for a pytree; see the module docstring. Keyword arguments are
    those of natgrad.torch.KFAC (lr, damping, momentum, weight_decay,
    damping_mode, ema_decay, inverse_period, kl_clip, adaptive_damping,
    fallback, fallback_lr, state_dtype, ...), plus
    reduce: True (reduced factors computed here, jitted), False (raw rows)
    or "auto" (default): chosen by measured cost as natgrad.torch does —
    the first step by bytes, an untimed warm-up step raw then reduced, three
    timed steps of each alternating, then the form with the lower best step
    cost (client preparation plus round
    trip, less the server's inversion wait; ``opt._reduce_trial``). Timing
    based, so two "auto" runs may differ in the last bits; the trial is not
    in state_dict() and runs again after a restore;
    locations: {conv layer: T output positions per example} (required for
    every kernel of more than two dimensions);
    exclude: layer names to put on the fallback optimizer instead;
    state: a state_dict() to restore instead of creating a session;
    pipelined: step t's round trip runs in a background thread while the
    caller computes step t+1, and step() returns the update of the previous
    call's step (one step stale; see the module docstring, step and flush);
    shared_memory: with a server on this host started with
    --shared_memory, the step's tensors go through POSIX shared memory
    instead of the gRPC messages (natgrad.Session); True, False, "auto"
    (inline from the server's first refusal on) or the first region size
    in bytes."""

    def __init__(self, params, target=None, *, client=None, layers=None, kernel_layout="in_out",
                 token=None, tls=None, lr=0.1, damping=1e-3, momentum=0.9, weight_decay=0.0,
                 damping_mode="tikhonov", ema_decay=None, inverse_period=None, stats_period=None,
                 kl_clip=1e-3, adaptive_damping=False, fallback="adam", fallback_lr=1e-3,
                 fallback_kwargs=None, reduce="auto", state_dtype=None, session_id=None,
                 display_name=None, locations=None, exclude=(), state=None, pipelined=False,
                 shared_memory=False):
        if kernel_layout not in ("in_out", "out_in"):
            raise ValueError("kernel_layout must be 'in_out' or 'out_in'")
        self.kernel_layout = kernel_layout
        self.reduce = reduce
        self.weight_decay = weight_decay
        flat, self.treedef = _flatten(params)
        self.paths = [p for p, _ in flat]
        shapes = {p: tuple(np.shape(v)) for p, v in flat}
        self.layers = dict(layers) if layers is not None else find_layers(params, kernel_layout)
        for name in exclude:
            if self.layers.pop(name, None) is None:
                raise errors.InvalidArgument(f"exclude: no layer '{name}' (layers: {sorted(self.layers)})",
                                             block=name)
        locations = dict(locations or {})
        unknown = set(locations) - set(self.layers)
        if unknown:
            raise errors.InvalidArgument(f"locations for unknown layer(s) {sorted(unknown)} "
                                         f"(layers: {sorted(self.layers)})", block=sorted(unknown)[0],
                                         field="locations")
        covered = set()
        self.dims = {}
        self.kernel_shapes = {}
        self.locations = {}
        for name, (wp, bp) in self.layers.items():
            if wp not in shapes or len(shapes[wp]) < 2:
                raise errors.InvalidArgument(f"layer '{name}': '{wp}' is not a leaf of params with "
                                             "2 or more dimensions", block=name, field="w")
            d_in, d_out = _kernel_dims(shapes[wp], kernel_layout)
            T = locations.get(name)
            if len(shapes[wp]) > 2 and T is None:
                raise errors.InvalidArgument(
                    f"layer '{name}': kernel '{wp}' of shape {list(shapes[wp])} is a convolution; give "
                    f"locations={{'{name}': T}} (output positions per example, e.g. "
                    f"natgrad.jax.conv_patches(x, ...).shape[1]) or exclude=['{name}'] to put it on "
                    "the fallback optimizer", block=name, field="locations")
            if T is not None and int(T) < 1:
                raise errors.InvalidArgument(f"layer '{name}': locations must be >= 1, got {T}",
                                             block=name, field="locations")
            self.locations[name] = int(T or 1)
            self.kernel_shapes[name] = shapes[wp]
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
                inverse_period=inverse_period, stats_period=stats_period,
                locations=self.locations[name] if self.locations[name] > 1 else None))
        make = _blocks.adam if fallback == "adam" else _blocks.sgd
        for p in self.fallback:
            cfg.append(make(p, list(shapes[p]) or [1], lr=fallback_lr, **dict(fallback_kwargs or {})))
        self._block_configs = cfg
        self._fallback_shapes = {p: list(shapes[p]) or [1] for p in self.fallback}
        self._prep_fns = {}
        self._apply_fn = None
        self.pipelined = bool(pipelined)
        # One worker: steps go out in order, each after the previous answered.
        self._pool = concurrent.futures.ThreadPoolExecutor(1, "natgrad-jax-step") if pipelined else None
        # (Future, reduce form, preparation seconds) of the step sent by the
        # last step() call.
        self._inflight = None
        self._reduce_trial = ReduceTrial()
        self._step_form = None
        self._pending = None    # a drained StepResult whose update is not applied yet
        self.session = None
        self._created = False
        self.last_result = None
        self._shared_memory = shared_memory
        if state is not None:
            self.load_state_dict(state)
        else:
            self.session = client.create_session(cfg, session_id=session_id, kl_clip=kl_clip or None,
                                                 shared_memory=shared_memory,
                                                 adaptive_damping=adaptive_damping, state_dtype=state_dtype,
                                                 display_name=display_name or "jax pytree")
            self._created = True
            self._own_checks(self.session)

    @staticmethod
    def _own_checks(session):
        # natgrad.jax builds every array it sends in the block's shape (the
        # statistics' shapes are checked in _mode), and the server checks
        # every tensor once (finite values, sizes), naming block and field:
        # the Session's own scan of every float of every step would be a
        # second pass over the whole payload.
        session.validate = False

    # -- one step -------------------------------------------------------------
    def _mode(self, name, s, din1):
        """How layer `name`'s statistics `s` go out: "given" (the caller's
        dict, as is), "reduced" (packed factors computed here) or "raw"
        (rows); checks the rows' shapes. Only shapes are read, so nothing
        waits for the device."""
        if isinstance(s, dict):
            return "given"
        try:
            a, g = s
        except (TypeError, ValueError):
            raise errors.InvalidArgument(f"layer '{name}': statistics must be (a, g) or a dict of reduced "
                                         "factors", block=name, field="stats") from None
        sa, sg = np.shape(a), np.shape(g)
        d_in, d_out = self.dims[name]
        T = self.locations[name]
        if not sa or sa[-1] != d_in:
            raise errors.InvalidArgument(f"layer '{name}': activations have {sa[-1] if sa else 0} features, "
                                         f"expected {d_in}" + (" (unfolded patches, natgrad.jax.conv_patches)"
                                                               if T > 1 else ""),
                                         block=name, field="activations")
        if not sg or sg[-1] != d_out:
            raise errors.InvalidArgument(f"layer '{name}': output gradients have {sg[-1] if sg else 0} "
                                         f"features, expected {d_out}", block=name, field="output_gradients")
        rows, grows = int(np.prod(sa[:-1])), int(np.prod(sg[:-1]))
        if grows != rows or rows == 0:
            raise errors.InvalidArgument(f"layer '{name}': {grows} output-gradient rows but {rows} activation "
                                         "rows (must be equal and > 0)", block=name, field="output_gradients")
        if T > 1 and rows % T:
            raise errors.InvalidArgument(
                f"layer '{name}': {rows} patch rows and {grows} output-gradient rows; "
                f"both must be n * locations (locations = {T})", block=name, field="activations")
        if self.reduce == "auto" and self._step_form is not None:
            return self._step_form  # the measured trial's form for this step
        packed = din1 * (din1 + 1) // 2 + d_out * (d_out + 1) // 2
        if self.reduce is True or (self.reduce == "auto" and packed < rows * (d_in + d_out)):
            return "reduced"
        return "raw"

    def _prepare(self, params, grads, stats):
        """The step's inputs for Session.step, as numpy arrays: one jitted
        call lays out every gradient as its block's [d_out, d_in(+1)] matrix
        and reduces the statistics on the arrays' device, then one
        device_get brings it all to the host."""
        pflat, ptree = _flatten(params)
        gflat, gtree = _flatten(grads)
        if ptree != self.treedef:
            raise errors.InvalidArgument("params do not have the structure the optimizer was built for")
        if gtree != self.treedef:
            raise errors.InvalidArgument("grads do not have the structure of params")
        missing = set(self.layers) - set(stats)
        if missing:
            raise errors.InvalidArgument(f"no statistics for layer(s) {sorted(missing)}",
                                         block=sorted(missing)[0], field="stats")
        extra = set(stats) - set(self.layers)
        if extra:
            raise errors.InvalidArgument(f"statistics for unknown layer(s) {sorted(extra)} "
                                         f"(layers: {sorted(self.layers)})", block=sorted(extra)[0])
        P = dict(pflat)
        G = dict(gflat)
        spec, args = [], []
        for name, (wp, bp) in self.layers.items():
            din1 = self.dims[name][0] + int(bp is not None)
            mode = self._mode(name, stats[name], din1)
            wd = bool(self.weight_decay)
            spec.append((name, bp is not None, wd, mode))
            args.append((G[wp], G[bp] if bp is not None else None,
                         P[wp] if wd else None, P[bp] if (wd and bp is not None) else None,
                         None if mode == "given" else
                         tuple(v if isinstance(v, jax.Array) else np.asarray(v) for v in stats[name])))
        fb = [G[p] for p in self.fallback]
        fn = self._prep_fns.get(tuple(spec))
        if fn is None:
            fn = self._prep_fns[tuple(spec)] = jax.jit(functools.partial(self._prep_impl, tuple(spec)))
        # num_examples go in traced, as they did to _reduced_factors' own jit
        # (a constant n could let XLA turn the division into another rounding).
        ns = [int(np.prod(np.shape(stats[name][0])[:-1])) // self.locations[name] if mode == "reduced" else 0
              for name, _, _, mode in spec]
        layer_out, fb_out = jax.device_get(fn(args, ns, fb))
        inputs = {}
        for (name, _, _, mode), x, n in zip(spec, layer_out, ns):
            if mode == "given":
                x.update(stats[name])
            elif mode == "reduced":
                x["num_examples"] = n
            inputs[name] = x
        for p, gp in zip(self.fallback, fb_out):
            inputs[p] = {"gradient": np.asarray(gp)}
        return inputs

    def _prep_impl(self, spec, args, ns, fb):
        """Traced by _prepare's jit: per layer {"gradient", ["params"],
        [statistics]}, then the fallback gradients shaped as their blocks."""
        out = []
        for (name, _, _, mode), (gw, gb, pw, pb, s), n in zip(spec, args, ns):
            d_in, d_out = self.dims[name]
            grad = self._as_block(gw, gb, name)
            dt = jnp.float64 if grad.dtype == jnp.float64 else jnp.float32
            x = {"gradient": grad.astype(dt)}
            if pw is not None:
                x["params"] = self._as_block(pw, pb, name).astype(dt)
            if mode != "given":
                a = jnp.asarray(s[0]).reshape(-1, d_in)
                g = jnp.asarray(s[1]).reshape(-1, d_out)
                if mode == "reduced":
                    # In the rows' precision (float32 unless x64 is on), sent
                    # as packed upper triangles (step.proto).
                    fa, fg = _reduced_factors(a, g, n, gb is not None)
                    x.update(a_factor=fa.astype(dt), g_factor=fg.astype(dt))
                else:
                    x.update(activations=a, output_gradients=g)
            out.append(x)
        fb_out = [jnp.reshape(g, self._fallback_shapes[p]) for p, g in zip(self.fallback, fb)]
        return out, fb_out

    def _as_block(self, w, b, name):
        """A kernel (and bias) as the block's [d_out, d_in(+1)] matrix (traced)."""
        d_in, d_out = self.dims[name]
        w = jnp.asarray(w)
        m = w.reshape(d_in, d_out).T if self.kernel_layout == "in_out" else w.reshape(d_out, d_in)
        if b is not None:
            m = jnp.concatenate([m, jnp.asarray(b, m.dtype).reshape(-1, 1)], axis=1)
        return m

    def _apply(self, params, r):
        """params + the deltas of StepResult r, as jax arrays on params'
        devices (one jitted call: the deltas go to the device, the params
        never come to the host)."""
        leaves = jax.tree_util.tree_leaves(params)
        deltas = {}
        for name, (wp, bp) in self.layers.items():
            deltas[name] = np.asarray(r[name])
        for p in self.fallback:
            deltas[p] = np.asarray(r[p])
        if self._apply_fn is None:
            self._apply_fn = jax.jit(self._apply_impl)
        return jax.tree_util.tree_unflatten(self.treedef, self._apply_fn(leaves, deltas))

    def _apply_impl(self, leaves, deltas):
        new = dict(zip(self.paths, leaves))
        for name, (wp, bp) in self.layers.items():
            d = deltas[name]
            d_in = self.dims[name][0]
            w = jnp.asarray(new[wp])
            dw = d[:, :d_in]
            dw = (dw.T if self.kernel_layout == "in_out" else dw).reshape(self.kernel_shapes[name])
            new[wp] = w + dw.astype(w.dtype)
            if bp is not None:
                b = jnp.asarray(new[bp])
                new[bp] = b + d[:, d_in].astype(b.dtype)
        for p in self.fallback:
            v = jnp.asarray(new[p])
            new[p] = v + deltas[p].reshape(v.shape).astype(v.dtype)
        return [new[p] for p in self.paths]

    def step(self, params, grads, stats, loss=None):
        """One step: ``grads`` has params' structure (mean loss); ``stats``
        maps layer name -> (a, g) raw rows or {"a_factor", "g_factor",
        "num_examples"}. Returns the updated params (jax arrays).

        Pipelined (``pipelined=True``): this call hands the step to a
        background thread and returns params plus the update of the
        *previous* call's step (params unchanged on the first call), so the
        caller's forward/backward of the next step overlaps this step's
        round trip. An error of the step in flight raises here, at the next
        call (this call's step is then not sent); ``flush(params)`` drains
        it and applies its update."""
        t0 = time.perf_counter()
        form = self._reduce_trial.next_form() if self.reduce == "auto" else None
        self._step_form = form
        try:
            inputs = self._prepare(params, grads, stats)
        finally:
            self._step_form = None
        prepare_s = time.perf_counter() - t0
        if loss is not None:
            loss = float(loss)
        if not self.pipelined:
            r = self.session.step(inputs, loss=loss)
            self._record_cost(form, time.perf_counter() - t0, r)
            self.last_result = r
            return self._apply(params, r)
        prev = self._drain()
        self._inflight = (self._pool.submit(self._timed_step, inputs, loss), form, prepare_s)
        if prev is None:
            return params
        self.last_result = prev
        return self._apply(params, prev)

    def _drain(self):
        """Waits for the step in flight and returns the StepResult whose
        update is not applied yet (None if there is none); raises the error
        of a failed step (its update is lost; the session's step counter is
        unchanged, so the next step() is sent as that step)."""
        if self._inflight is not None:
            (fut, form, prepare_s), self._inflight = self._inflight, None
            r, step_s = fut.result()
            self._record_cost(form, prepare_s + step_s, r)
            self._pending = r
        r, self._pending = self._pending, None
        return r

    def _timed_step(self, inputs, loss):
        """Session.step on the pipeline's thread, with its wall time."""
        t0 = time.perf_counter()
        r = self.session.step(inputs, loss=loss)
        return r, time.perf_counter() - t0

    def _record_cost(self, form, seconds, r):
        """reduce="auto": a trial step's cost is its client preparation
        (statistics, layout, device_get) plus the round trip, less the
        server's inversion wait, which does not depend on the form."""
        self._reduce_trial.record_form(form, seconds - r.timing.inversion_micros * 1e-6)

    def flush(self, params=None):
        """Pipelined mode: waits for the step in flight (raising its error,
        if it failed). With params, returns params plus that step's update,
        so the model is up to date with every step sent; without, the update
        stays pending and the next step() applies it as usual. Synchronous
        mode: returns params (nothing is ever in flight)."""
        if not self.pipelined:
            return params
        r = self._drain()
        if params is None:
            self._pending = r
            return None
        if r is None:
            return params
        self.last_result = r
        return self._apply(params, r)

    @property
    def in_flight(self):
        """True while a pipelined step's round trip is running or its update is pending."""
        return self._inflight is not None or self._pending is not None

    def _require_idle(self, what):
        if self.pipelined:
            self.flush()
            if self._pending is not None:
                raise errors.FailedPrecondition(
                    f"natgrad.jax.KFAC.{what}: step {self._pending.step}'s update is not applied yet "
                    "(pipelined mode); call params = opt.flush(params) first so the parameters and "
                    "the session agree")

    # -- checkpoints --------------------------------------------------------
    def state_dict(self):
        """A pytree checkpoint of the optimizer: {"format", "session" (name),
        "step" (last applied step), "snapshot" (the serialized
        SessionSnapshot as a uint8 array)}; all leaves are str or numpy, so
        pickle, flax.serialization or orbax can store it next to params."""
        self._require_idle("state_dict")
        snap = self.session.export()
        step = snap.last_step
        return {"format": np.asarray(CHECKPOINT_FORMAT, np.int64), "session": self.session.name,
                "step": np.asarray(step, np.int64),
                "snapshot": np.frombuffer(snap.SerializeToString(), np.uint8).copy()}

    def _check_config(self, config, where):
        want = [(b.name, b.WhichOneof("kind"), list(b.shape),
                 b.kfac_dense.locations if b.HasField("kfac_dense") else 0) for b in self._block_configs]
        have = [(b.name, b.WhichOneof("kind"), list(b.shape),
                 b.kfac_dense.locations if b.HasField("kfac_dense") else 0) for b in config.blocks]
        if sorted(want) != sorted(have):
            diff = sorted(set(map(str, want)) ^ set(map(str, have)))
            raise errors.InvalidArgument(f"{where}: its blocks do not match this optimizer's layers "
                                         f"(differing: {diff[:4]})", field="state")

    def load_state_dict(self, state):
        """Restores a state_dict(): imports the snapshot when the server does
        not have the session (a fresh server, an empty checkpoint directory),
        or attaches to the server's session after checking it is at the
        checkpoint's step. Raises InvalidArgument (malformed state, other
        layers) or FailedPrecondition (the server's session is at another
        step or has another config; in pipelined mode, an update not yet
        applied: flush(params) first); on error the optimizer is unchanged."""
        self._require_idle("load_state_dict")
        try:
            fmt = int(np.asarray(state["format"]))
            name = str(state["session"])
            step = int(np.asarray(state["step"]))
            raw = state["snapshot"]
            raw = raw if isinstance(raw, bytes) else np.asarray(raw, np.uint8).tobytes()
        except (KeyError, TypeError, ValueError) as e:
            raise errors.InvalidArgument(f"not a natgrad.jax state_dict: {e!r}", field="state") from None
        if fmt != CHECKPOINT_FORMAT:
            raise errors.InvalidArgument(f"state_dict format {fmt}, this natgrad reads {CHECKPOINT_FORMAT}",
                                         field="format")
        snap = session_pb2.SessionSnapshot()
        try:
            snap.ParseFromString(raw)
        except Exception as e:  # noqa: BLE001  (protobuf's DecodeError)
            raise errors.InvalidArgument(f"state_dict snapshot does not parse: {e}", field="snapshot") from None
        if snap.name != name or snap.last_step != step:
            raise errors.InvalidArgument(
                f"state_dict is inconsistent: session {name} step {step}, snapshot of {snap.name} "
                f"at step {snap.last_step}", field="snapshot")
        self._check_config(snap.config, f"checkpoint of {name}")
        session = self.client.restore_session(snap, shared_memory=self._shared_memory)
        old, created = self.session, self._created
        self.session, self._created = session, False
        self._own_checks(session)
        if old is not None and old.name != session.name:
            if created and old.next_step == 1:
                try:  # the empty session made by __init__, never stepped
                    old.delete()
                except errors.NatgradError:
                    pass
            else:
                old.close()

    def close(self, delete=False):
        """Ends the optimizer's use of the session: in pipelined mode waits
        for the step in flight first (an update not applied yet is dropped:
        call params = flush(params) before to keep it), then half-closes the
        Step stream (the session stays on the server) or, with delete=True,
        deletes the session. A failure of the step that was in flight raises
        after the session is closed."""
        err = None
        if self._inflight is not None:
            try:
                self._drain()
            except Exception as e:  # noqa: BLE001  (re-raised below, after closing)
                err = e
        self._pending = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        if delete:
            self.session.delete()
        else:
            self.session.close()
        if err is not None:
            raise err
