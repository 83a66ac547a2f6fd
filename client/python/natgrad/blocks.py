"""Block and session configuration helpers producing natgrad.v1 messages.

Hyperparameters given as None are left unset, so the server's documented
default applies; numbers become constant schedules; natgrad.schedules
messages pass through.

    cfg = blocks.session_config([
        blocks.kfac_dense("fc1", d_in=64, d_out=32, lr=0.1, damping=1e-3),
        blocks.adam("bn.weight", shape=[32], lr=1e-3),
    ], kl_clip=1e-3)
"""
import math

from natgrad._pb import blocks_pb2, session_pb2, tensor_pb2
from natgrad.schedules import as_schedule

BlockConfig = blocks_pb2.BlockConfig
SessionConfig = session_pb2.SessionConfig

_DAMPING_MODES = {
    None: blocks_pb2.DAMPING_MODE_UNSPECIFIED,
    "tikhonov": blocks_pb2.FACTORED_TIKHONOV,
    "factored_tikhonov": blocks_pb2.FACTORED_TIKHONOV,
    "eigen": blocks_pb2.EIGEN_EXACT,
    "eigen_exact": blocks_pb2.EIGEN_EXACT,
}

PARAMETRIZATIONS = {
    "natural": blocks_pb2.NATURAL,
    "expectation": blocks_pb2.EXPECTATION,
    "mean_covariance": blocks_pb2.MEAN_COVARIANCE,
    "mean_cholesky": blocks_pb2.MEAN_CHOLESKY,
}


def _set_schedule(msg, field, value, block):
    s = as_schedule(value, f"block '{block}': {field}")
    if s is not None:
        getattr(msg, field).CopyFrom(s)


def _check_name(name):
    if not isinstance(name, str) or not name:
        raise ValueError(f"block name must be a non-empty string, got {name!r}")


def _shape(shape, name):
    if isinstance(shape, int):
        shape = [shape]
    shape = [int(s) for s in shape]
    if any(s <= 0 for s in shape):
        raise ValueError(f"block '{name}': shape must be positive, got {shape}")
    return shape


def kfac_dense(name, d_in, d_out, bias=True, *, lr=None, damping=None, momentum=None,
               weight_decay=None, damping_mode=None, ema_decay=None, inverse_period=None,
               stats_period=None, locations=None, async_inversion=False, max_staleness=None):
    """A K-FAC block for a dense layer (or an unfolded convolution, with
    ``locations`` = spatial output positions T per example). The parameter is
    W of shape [d_out, d_in + bias], the bias as the last column.
    Convolutions send n*T rows of unfolded patches; the server scales the
    factors as kfac-jax does, A = abar^T abar / n and G = g^T g / (n*T)
    (reduced statistics must use the same scaling, num_examples = n).
    damping_mode: 'tikhonov' (factored, pi-corrected) or 'eigen' (exact in the
    eigenbasis)."""
    _check_name(name)
    if int(d_in) <= 0 or int(d_out) <= 0:
        raise ValueError(f"block '{name}': d_in and d_out must be positive")
    if damping_mode not in _DAMPING_MODES:
        raise ValueError(f"block '{name}': damping_mode must be one of "
                         f"{sorted(k for k in _DAMPING_MODES if k)}, got {damping_mode!r}")
    c = blocks_pb2.KfacDenseConfig(d_in=int(d_in), d_out=int(d_out), has_bias=bool(bias),
                                   damping_mode=_DAMPING_MODES[damping_mode],
                                   async_inversion=bool(async_inversion))
    for f, v in (("learning_rate", lr), ("damping", damping), ("momentum", momentum),
                 ("weight_decay", weight_decay)):
        _set_schedule(c, f, v, name)
    if ema_decay is not None:
        if not 0 < ema_decay < 1:
            raise ValueError(f"block '{name}': ema_decay must be in (0, 1)")
        c.ema_decay = float(ema_decay)
    for f, v in (("inverse_period", inverse_period), ("stats_period", stats_period),
                 ("locations", locations), ("max_staleness", max_staleness)):
        if v is not None:
            if int(v) < 0:
                raise ValueError(f"block '{name}': {f} must be >= 0")
            setattr(c, f, int(v))
    return BlockConfig(name=name, shape=[int(d_out), int(d_in) + int(bool(bias))], kfac_dense=c)


def ekfac(name, d_in, d_out, bias=True, *, lr=None, damping=None, momentum=None,
          weight_decay=None, ema_decay=None, inverse_period=None, locations=None):
    """An EKFAC block (George et al. 2018) for a dense layer or an unfolded
    convolution: K-FAC's eigenbasis, refreshed every ``inverse_period`` steps,
    with the diagonal scaling re-estimated every step from the per-example
    gradients. Its steps need raw statistics (activations and per-example
    output gradients, as kfac_dense's raw form) every time; reduced factors
    are refused. The parameter is W [d_out, d_in + bias], the bias last;
    ``lr``, ``damping``, ``momentum``, ``weight_decay``, ``ema_decay`` and
    ``locations`` mean what they mean for kfac_dense (docs/math.md)."""
    _check_name(name)
    if int(d_in) <= 0 or int(d_out) <= 0:
        raise ValueError(f"block '{name}': d_in and d_out must be positive")
    c = blocks_pb2.EkfacConfig(d_in=int(d_in), d_out=int(d_out), has_bias=bool(bias))
    for f, v in (("learning_rate", lr), ("damping", damping), ("momentum", momentum),
                 ("weight_decay", weight_decay)):
        _set_schedule(c, f, v, name)
    if ema_decay is not None:
        if not 0 < ema_decay < 1:
            raise ValueError(f"block '{name}': ema_decay must be in (0, 1)")
        c.ema_decay = float(ema_decay)
    for f, v in (("inverse_period", inverse_period), ("locations", locations)):
        if v is not None:
            if int(v) < 0:
                raise ValueError(f"block '{name}': {f} must be >= 0")
            setattr(c, f, int(v))
    return BlockConfig(name=name, shape=[int(d_out), int(d_in) + int(bool(bias))], ekfac=c)


def sgd(name, shape, *, lr=None, momentum=None, nesterov=False, weight_decay=None):
    _check_name(name)
    c = blocks_pb2.SgdConfig(nesterov=bool(nesterov))
    for f, v in (("learning_rate", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
        _set_schedule(c, f, v, name)
    return BlockConfig(name=name, shape=_shape(shape, name), sgd=c)


def adam(name, shape, *, lr=None, beta1=None, beta2=None, eps=None, weight_decay=None,
         decoupled_weight_decay=False):
    """Adam (or AdamW with decoupled_weight_decay=True). beta/eps None: server
    defaults (0.9, 0.999, 1e-8)."""
    _check_name(name)
    c = blocks_pb2.AdamConfig(decoupled_weight_decay=bool(decoupled_weight_decay))
    _set_schedule(c, "learning_rate", lr, name)
    _set_schedule(c, "weight_decay", weight_decay, name)
    for f, v in (("beta1", beta1), ("beta2", beta2), ("epsilon", eps)):
        if v is not None:
            setattr(c, f, float(v))
    return BlockConfig(name=name, shape=_shape(shape, name), adam=c)


def adamw(name, shape, *, lr=None, weight_decay=1e-2, **kw):
    return adam(name, shape, lr=lr, weight_decay=weight_decay, decoupled_weight_decay=True, **kw)


def _wire_max_halvings(name, v):
    # Wire: 0 = server default (8), negative = no halving.
    if v is None:
        return 0
    if int(v) != v or not 0 <= int(v) <= 64:
        raise ValueError(f"block '{name}': max_halvings must be an integer in [0, 64] or None, got {v!r}")
    return -1 if int(v) == 0 else int(v)


def gaussian(name, dim, copies=1, *, parametrization="mean_cholesky", gamma=None,
             max_halvings=8, return_direction=False):
    """A variational Gaussian N(m, S) block of dimension ``dim`` (M) with
    ``copies`` (L) independent copies; its parameters are [L, M] and
    [L, M, M] (GPflow's q_mu is [M, L]: see natgrad.gaussian). parametrization:
    'natural', 'expectation', 'mean_covariance' or 'mean_cholesky'. gamma:
    step size (schedule).

    max_halvings: when a step leaves the positive-definite cone, gamma is
    halved and the step retried at most this many times (0 to 64). 0 means no
    halving (the step is rejected at once; sent as -1 on the wire, whose 0
    means the default), None the server's default (8)."""
    _check_name(name)
    if parametrization not in PARAMETRIZATIONS:
        raise ValueError(f"block '{name}': parametrization must be one of "
                         f"{sorted(PARAMETRIZATIONS)}, got {parametrization!r}")
    if int(dim) <= 0 or int(copies) <= 0:
        raise ValueError(f"block '{name}': dim and copies must be positive")
    c = blocks_pb2.GaussianConfig(dim=int(dim), copies=int(copies),
                                  parametrization=PARAMETRIZATIONS[parametrization],
                                  max_halvings=_wire_max_halvings(name, max_halvings),
                                  return_direction=bool(return_direction))
    _set_schedule(c, "gamma", gamma, name)
    return BlockConfig(name=name, shape=[int(copies), int(dim)], gaussian=c)


DIAG_PARAMETRIZATIONS = {
    "natural": blocks_pb2.DIAG_NATURAL,
    "expectation": blocks_pb2.DIAG_EXPECTATION,
    "mean_variance": blocks_pb2.DIAG_MEAN_VARIANCE,
    "mean_log_std": blocks_pb2.DIAG_MEAN_LOG_STD,
}


def gaussian_diag(name, dim, copies=1, *, parametrization="mean_variance", gamma=None,
                  max_halvings=8, return_direction=False):
    """A diagonal (mean-field) Gaussian N(m, diag(s)) block: ``copies`` (L)
    copies of dimension ``dim`` (M), every part of its step an [L, M] array.
    parametrization: 'natural' (m/s, -1/(2s)), 'expectation' (m, s + m^2),
    'mean_variance' (m, s) or 'mean_log_std' (m, rho with s = exp(2 rho)).
    gamma and max_halvings as for gaussian(). Elementwise on the server, so
    dim may be in the millions; float32 arrays stay float32 on the wire."""
    _check_name(name)
    if parametrization not in DIAG_PARAMETRIZATIONS:
        raise ValueError(f"block '{name}': parametrization must be one of "
                         f"{sorted(DIAG_PARAMETRIZATIONS)}, got {parametrization!r}")
    if int(dim) <= 0 or int(copies) <= 0:
        raise ValueError(f"block '{name}': dim and copies must be positive")
    c = blocks_pb2.GaussianDiagConfig(dim=int(dim), copies=int(copies),
                                      parametrization=DIAG_PARAMETRIZATIONS[parametrization],
                                      max_halvings=_wire_max_halvings(name, max_halvings),
                                      return_direction=bool(return_direction))
    _set_schedule(c, "gamma", gamma, name)
    return BlockConfig(name=name, shape=[int(copies), int(dim)], gaussian_diag=c)


def session_config(blocks, *, state_dtype=None, kl_clip=None, adaptive_damping=None,
                   display_name=None):
    """blocks: BlockConfig messages. kl_clip: None/False (off), True (on,
    kappa 1e-3) or kappa. adaptive_damping: None/False, True, or a dict of
    AdaptiveDampingConfig fields (interval, decay, min_damping, max_damping).
    state_dtype: 'float32' (default) or 'float64'."""
    blocks = list(blocks)
    names = [b.name for b in blocks]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f"duplicate block names: {sorted(dup)}")
    if not blocks:
        raise ValueError("a session needs at least one block")
    cfg = SessionConfig(blocks=blocks)
    if state_dtype is not None:
        cfg.state_dtype = {"float32": tensor_pb2.FLOAT32, "float64": tensor_pb2.FLOAT64}[str(state_dtype)]
    if kl_clip is not None and kl_clip is not False:
        cfg.kl_clip.enabled = True
        if kl_clip is not True:
            if not (float(kl_clip) > 0 and math.isfinite(kl_clip)):
                raise ValueError("kl_clip must be positive")
            cfg.kl_clip.kappa = float(kl_clip)
    if adaptive_damping:
        cfg.adaptive_damping.enabled = True
        if isinstance(adaptive_damping, dict):
            for k, v in adaptive_damping.items():
                setattr(cfg.adaptive_damping, k, v)
    if display_name:
        cfg.display_name = display_name
    return cfg


_GRAFTINGS = {
    None: blocks_pb2.SHAMPOO_GRAFTING_UNSPECIFIED,
    "adam": blocks_pb2.SHAMPOO_GRAFTING_ADAM,
    "sgd": blocks_pb2.SHAMPOO_GRAFTING_SGD,
    "none": blocks_pb2.SHAMPOO_GRAFTING_NONE,
}


def shampoo(name, shape, *, lr=None, weight_decay=None, beta1=None, beta2=None, eps=None,
            bias_correction=False, precondition_frequency=None, start_preconditioning_step=None,
            max_preconditioner_dim=None, inverse_root=None, grafting=None, grafting_beta2=None,
            grafting_eps=None):
    """A blocked Shampoo block with grafting (docs/math.md, Shampoo). None
    leaves the server's default: beta1 0.9, beta2 0.999, eps 1e-12,
    precondition_frequency 1, start_preconditioning_step 1,
    max_preconditioner_dim 1024, inverse_root 4 (X^-1/4), grafting 'adam'
    ('adam', 'sgd' or 'none'), grafting_beta2 0.999, grafting_eps 1e-8.
    weight_decay is decoupled and needs the parameters in each step."""
    _check_name(name)
    if grafting not in _GRAFTINGS:
        raise ValueError(f"block '{name}': grafting must be one of "
                         f"{sorted(k for k in _GRAFTINGS if k)}, got {grafting!r}")
    c = blocks_pb2.ShampooConfig(bias_correction=bool(bias_correction),
                                 grafting=_GRAFTINGS[grafting])
    _set_schedule(c, "learning_rate", lr, name)
    _set_schedule(c, "weight_decay", weight_decay, name)
    for f, v in (("beta1", beta1), ("beta2", beta2), ("epsilon", eps),
                 ("grafting_beta2", grafting_beta2), ("grafting_epsilon", grafting_eps)):
        if v is not None:
            setattr(c, f, float(v))
    for f, v in (("precondition_frequency", precondition_frequency),
                 ("start_preconditioning_step", start_preconditioning_step),
                 ("max_preconditioner_dim", max_preconditioner_dim),
                 ("inverse_root_override", inverse_root)):
        if v is not None:
            if int(v) != v or int(v) < 1:
                raise ValueError(f"block '{name}': {f} must be a positive integer, got {v!r}")
            setattr(c, f, int(v))
    return BlockConfig(name=name, shape=_shape(shape, name), shampoo=c)


_SOAP_REFRESHES = {
    None: blocks_pb2.SOAP_REFRESH_UNSPECIFIED,
    "power_qr": blocks_pb2.SOAP_REFRESH_POWER_QR,
    "eigh": blocks_pb2.SOAP_REFRESH_EIGH,
}


def soap(name, shape, *, lr=None, weight_decay=None, beta1=None, beta2=None, shampoo_beta=None,
         eps=None, precondition_frequency=None, max_precond_dim=None, refresh=None,
         bias_correction=None):
    """A SOAP block: Adam in the eigenbasis of Shampoo's factors (docs/math.md,
    SOAP). None leaves the server's default, the authors' reference: lr 3e-3,
    weight_decay 0.01 (decoupled; needs the parameters in each step; give 0
    to turn it off), beta1 = beta2 = 0.95, shampoo_beta = beta2, eps 1e-8,
    precondition_frequency 10, max_precond_dim 10000, refresh 'power_qr'
    ('power_qr' or 'eigh'), bias_correction True. The first step only builds
    the eigenbases: its update is zero."""
    _check_name(name)
    if refresh not in _SOAP_REFRESHES:
        raise ValueError(f"block '{name}': refresh must be one of "
                         f"{sorted(k for k in _SOAP_REFRESHES if k)}, got {refresh!r}")
    c = blocks_pb2.SoapConfig(refresh=_SOAP_REFRESHES[refresh])
    _set_schedule(c, "learning_rate", lr, name)
    _set_schedule(c, "weight_decay", weight_decay, name)
    for f, v in (("beta1", beta1), ("beta2", beta2), ("shampoo_beta", shampoo_beta),
                 ("epsilon", eps)):
        if v is not None:
            setattr(c, f, float(v))
    if bias_correction is not None:
        c.bias_correction = bool(bias_correction)
    for f, v in (("precondition_frequency", precondition_frequency),
                 ("max_precond_dim", max_precond_dim)):
        if v is not None:
            if int(v) != v or int(v) < 1:
                raise ValueError(f"block '{name}': {f} must be a positive integer, got {v!r}")
            setattr(c, f, int(v))
    return BlockConfig(name=name, shape=_shape(shape, name), soap=c)
