"""Variational Gaussian blocks (docs/math.md; Salimbeni, Eleftheriadis &
Hensman 2018) from Python.

A Gaussian block holds q = N(m, S) of dimension M (L independent copies:
means [L, M], second parts [L, M, M]) in one of four parametrisations:

    "natural"          theta1 = S^-1 m,  theta2 = -1/2 S^-1
    "expectation"      eta1 = m,         eta2 = S + m m^T
    "mean_covariance"  m, S
    "mean_cholesky"    m, L (lower triangular, S = L L^T)

Each step sends the current (param1, param2) and the loss gradient, either
w.r.t. the block's own parametrisation (``gradient_space="parametrization"``,
the server converts; symmetrisation and the Cholesky map are done there) or
already w.r.t. the expectation parameters (``"expectation"``). The server
returns theta' = theta - gamma dL/deta mapped back to the parametrisation.

    q = natgrad.gaussian.GaussianOptimizer(client, dim=M, gamma=1.0)
    m, L = q.step(m, L, dL_dm, dL_dL)

or, inside a bigger session, ``step_input(...)`` builds the block's input
for Session.step and ``result[name].param1/param2`` are the new parameters.

Conventions that differ from GPflow (and how to say which one you mean):

* Layout. natgrad's means are [L, M] = [copies, dim]; GPflow's ``q_mu`` is
  [M, L] (its ``q_sqrt`` [L, M, M] matches natgrad's second part). Pass
  ``layout="gpflow"`` to step_input / GaussianOptimizer.step (q_mu and its
  gradient are transposed on the way out and the new q_mu comes back [M, L]),
  or convert with ``from_gpflow`` / ``to_gpflow``. A [M, L] array for a block
  with L != M is rejected with a pointer to layout="gpflow". For L == M the
  shapes cannot tell, so Session.step then requires an explicit
  ``layout="natgrad"`` or ``"gpflow"``.
* Gradient space. The wire's GaussianStepInput.gradient_space, when unset,
  means expectation gradients dL/deta; step_input defaults to
  "parametrization" (gradients w.r.t. param1/param2, e.g. dL/dq_mu,
  dL/dq_sqrt from autodiff). The client always sends the field and refuses a
  Gaussian input dict without it.
* max_halvings (natgrad.blocks.gaussian) counts literally: 0 means no
  halving, None the server's default (8).

The numpy conversions below (to_mean_cov, from_mean_cov, expectation_gradient,
natural_gradient_step) are a client-side reference of the same maths.
"""
import numpy as np

from natgrad import blocks as _blocks

__all__ = ["step_input", "compositional_input", "FISHER_FORMS", "GaussianOptimizer", "from_gpflow", "to_gpflow", "to_mean_cov", "from_mean_cov",
           "expectation_gradient", "natural_gradient_step", "PARAMETRIZATIONS"]

PARAMETRIZATIONS = tuple(_blocks.PARAMETRIZATIONS)


def step_input(param1, param2, grad1, grad2, gradient_space="parametrization", layout=None):
    """The input of one Gaussian block for Session.step.

    gradient_space: "parametrization" (grad1/grad2 are dL/dparam1,
    dL/dparam2; the server converts) or "expectation" (dL/deta1, dL/deta2).
    Always sent explicitly (an unset wire field means "expectation").
    layout: None/"natgrad" (param1, grad1 are [L, M]) or "gpflow" ([M, L], as
    GPflow's q_mu; the result's param1/delta1/direction1 then come back
    [M, L]). Required when L == M > 1, where the shapes cannot tell."""
    if gradient_space not in ("parametrization", "expectation"):
        raise ValueError(f"gradient_space must be 'parametrization' or 'expectation', got {gradient_space!r}")
    x = {"param1": param1, "param2": param2, "grad1": grad1, "grad2": grad2,
         "gradient_space": gradient_space}
    if layout is not None:
        x["layout"] = layout
    return x


FISHER_FORMS = ("full", "diagonal", "shared")


def compositional_input(param1, param2, samples, likelihood_gradients, likelihood_fisher,
                        fisher_form="full", rest_grad1=None, rest_grad2=None,
                        gradient_space="parametrization", layout=None):
    """The input of one full Gaussian block for Session.step when the
    likelihood part of the gradient comes from reparameterised samples
    (docs/math.md, "Compositional gradients").

    param1, param2: the block's current parameters, as for step_input.
    samples: eps_s, [L, S, M] ([S, M] when L = 1), the standard-normal draws
        with z_s = m + chol(S) eps_s (the lower Cholesky factor of the current
        covariance, whatever the block's parametrisation).
    likelihood_gradients: dl/dz at z_s, the same shape (l the loss's
        likelihood term for that sample, e.g. the negative log-likelihood).
    likelihood_fisher: the likelihood's Fisher in z, by fisher_form:
        "full" [L, S, M, M] (one per sample), "diagonal" [L, S, M] (their
        diagonals) or "shared" [L, M, M] (one for all samples); the leading L
        may be dropped when L = 1. Symmetric, and F + lambda_z I positive
        definite (lambda_z: blocks.gaussian(likelihood_damping=...)).
    rest_grad1, rest_grad2: the gradient of the rest of the objective (e.g.
        the KL to the prior) in gradient_space ("parametrization": w.r.t.
        param1/param2; "expectation": dL/deta); None means zero (both None
        or both given).
    layout: as for step_input (affects param1 and rest_grad1 only).

    The server computes u_s = (F_s + lambda_z I)^-1 dl/dz(z_s), the (m, L)
    gradient (mean_s u_s, tril(mean_s u_s eps_s^T)), converts it to dL/deta,
    adds the rest gradient and takes the block's usual step."""
    if gradient_space not in ("parametrization", "expectation"):
        raise ValueError(f"gradient_space must be 'parametrization' or 'expectation', got {gradient_space!r}")
    if fisher_form not in FISHER_FORMS:
        raise ValueError(f"fisher_form must be one of {list(FISHER_FORMS)}, got {fisher_form!r}")
    if (rest_grad1 is None) != (rest_grad2 is None):
        raise ValueError("rest_grad1 and rest_grad2 must both be given or both be None (zero)")
    x = {"param1": param1, "param2": param2, "gradient_space": gradient_space,
         "compositional": {"samples": samples, "likelihood_gradients": likelihood_gradients,
                           "likelihood_fisher": likelihood_fisher, "fisher_form": fisher_form}}
    if rest_grad1 is not None:
        x["grad1"], x["grad2"] = rest_grad1, rest_grad2
    if layout is not None:
        x["layout"] = layout
    return x


def _gpflow_shapes(q_mu, q_sqrt):
    q_mu, q_sqrt = np.asarray(q_mu), np.asarray(q_sqrt)
    if q_mu.ndim != 2:
        raise ValueError(f"q_mu must be [M, L] (GPflow layout), got shape {list(q_mu.shape)}")
    M, L = q_mu.shape
    if q_sqrt.shape != (L, M, M):
        raise ValueError(f"q_sqrt must be [L, M, M] = {[L, M, M]} for q_mu [M, L] = {[M, L]}, "
                         f"got {list(q_sqrt.shape)}"
                         + (" (is q_mu transposed? natgrad's means are [L, M])"
                            if q_sqrt.shape == (M, L, L) and L != M else ""))
    return q_mu, q_sqrt


def from_gpflow(q_mu, q_sqrt):
    """GPflow's (q_mu [M, L], q_sqrt [L, M, M]) -> natgrad's mean_cholesky
    (param1 [L, M], param2 [L, M, M]). Also maps their gradients
    (dL/dq_mu, dL/dq_sqrt) the same way."""
    q_mu, q_sqrt = _gpflow_shapes(q_mu, q_sqrt)
    return np.ascontiguousarray(q_mu.T), q_sqrt


def to_gpflow(param1, param2):
    """natgrad's (param1 [L, M], param2 [L, M, M]) -> GPflow's (q_mu [M, L],
    q_sqrt [L, M, M])."""
    p1, p2 = np.asarray(param1), np.asarray(param2)
    if p1.ndim == 1:
        p1 = p1[None, :]
    if p2.ndim == 2:
        p2 = p2[None]
    L, M = p1.shape
    if p2.shape != (L, M, M):
        raise ValueError(f"param2 must be [L, M, M] = {[L, M, M]} for param1 [L, M], got {list(p2.shape)}")
    return np.ascontiguousarray(p1.T), p2


def _sym(X):
    return 0.5 * (X + np.swapaxes(X, -1, -2))


def to_mean_cov(p1, p2, parametrization):
    """(param1, param2) in `parametrization` -> (m, S). Batched over leading axes."""
    p1, p2 = np.asarray(p1, np.float64), np.asarray(p2, np.float64)
    if parametrization == "mean_covariance":
        return p1, p2
    if parametrization == "mean_cholesky":
        L = np.tril(p2)
        return p1, L @ np.swapaxes(L, -1, -2)
    if parametrization == "expectation":
        return p1, p2 - p1[..., :, None] * p1[..., None, :]
    if parametrization == "natural":
        S = np.linalg.inv(-2.0 * p2)
        return (S @ p1[..., None])[..., 0], _sym(S)
    raise ValueError(f"unknown parametrization {parametrization!r}")


def from_mean_cov(m, S, parametrization):
    """(m, S) -> (param1, param2) in `parametrization`."""
    m, S = np.asarray(m, np.float64), _sym(np.asarray(S, np.float64))
    if parametrization == "mean_covariance":
        return m, S
    if parametrization == "mean_cholesky":
        return m, np.linalg.cholesky(S)
    if parametrization == "expectation":
        return m, S + m[..., :, None] * m[..., None, :]
    if parametrization == "natural":
        P = np.linalg.inv(S)
        return (P @ m[..., None])[..., 0], -0.5 * _sym(P)
    raise ValueError(f"unknown parametrization {parametrization!r}")


def _phi(X):
    """Lower triangle with the diagonal halved."""
    return np.tril(X) - 0.5 * np.eye(X.shape[-1]) * X


def expectation_gradient(p1, p2, g1, g2, parametrization):
    """Gradients w.r.t. the block's parametrisation -> (dL/deta1, dL/deta2)."""
    p1, p2 = np.asarray(p1, np.float64), np.asarray(p2, np.float64)
    g1, g2 = np.asarray(g1, np.float64), np.asarray(g2, np.float64)
    if parametrization == "expectation":
        return g1, _sym(g2)
    if parametrization == "natural":
        # theta -> eta is the gradient of the log-partition; chain rule through
        # (m, S): dL/dm and dL/dS from dL/dtheta.
        m, S = to_mean_cov(p1, p2, "natural")
        # theta1 = S^-1 m, theta2 = -1/2 S^-1  =>  dL/dm = S^-1 g1,
        # dL/dS = -S^-1 (g1 m^T) S^-1 ... (symmetrised) + 1/2 S^-1 G2 S^-1
        P = np.linalg.inv(S)
        G2 = _sym(g2)
        dm = (P @ g1[..., None])[..., 0]
        dS = -_sym(P @ (g1[..., :, None] * m[..., None, :]) @ P) + 0.5 * P @ G2 @ P
        return expectation_gradient(m, S, dm, dS, "mean_covariance")
    if parametrization == "mean_covariance":
        G = _sym(g2)
        return g1 - 2.0 * (G @ p1[..., None])[..., 0], G
    if parametrization == "mean_cholesky":
        L = np.tril(p2)
        Li = np.linalg.inv(L)
        G = _sym(np.swapaxes(Li, -1, -2) @ _phi(np.swapaxes(L, -1, -2) @ np.tril(g2)) @ Li)
        return g1 - 2.0 * (G @ p1[..., None])[..., 0], G
    raise ValueError(f"unknown parametrization {parametrization!r}")


def natural_gradient_step(p1, p2, g1, g2, parametrization, gamma=1.0, gradient_space="parametrization"):
    """Reference of the server's step (no halving): theta' = theta - gamma dL/deta."""
    if gradient_space == "parametrization":
        e1, e2 = expectation_gradient(p1, p2, g1, g2, parametrization)
    else:
        e1, e2 = np.asarray(g1, np.float64), _sym(np.asarray(g2, np.float64))
    t1, t2 = from_mean_cov(*to_mean_cov(p1, p2, parametrization), "natural")
    t1, t2 = t1 - gamma * e1, t2 - gamma * e2
    return from_mean_cov(*to_mean_cov(t1, t2, "natural"), parametrization)


class GaussianOptimizer:
    """A session with one Gaussian block (plus optional extra blocks).

    client: natgrad.Client. dim, copies, parametrization, gamma, max_halvings:
    see natgrad.blocks.gaussian. extra_blocks: more BlockConfig (e.g. an Adam
    block for hyperparameters); pass their inputs to step(extra=...) and read
    their deltas from ``last_result``.
    """

    def __init__(self, client, dim, copies=1, *, parametrization="mean_cholesky", gamma=1.0,
                 max_halvings=8, name="q", extra_blocks=(), return_direction=False, session_id=None):
        self.name = name
        self.parametrization = parametrization
        self.session = client.create_session(
            [_blocks.gaussian(name, dim, copies, parametrization=parametrization, gamma=gamma,
                              max_halvings=max_halvings, return_direction=return_direction)]
            + list(extra_blocks), session_id=session_id, display_name=f"gaussian {name}")
        self.last_result = None

    def step(self, param1, param2, grad1, grad2, gradient_space="parametrization", extra=None, loss=None,
             layout=None):
        """Returns the new (param1, param2), shaped like the inputs.
        layout="gpflow": param1/grad1 are [M, L] (GPflow's q_mu); see step_input."""
        inputs = {self.name: step_input(param1, param2, grad1, grad2, gradient_space, layout)}
        inputs.update(extra or {})
        r = self.session.step(inputs, loss=loss)
        self.last_result = r
        u = r[self.name]
        return (u.param1.reshape(np.shape(param1)), u.param2.reshape(np.shape(param2)))

    def close(self, delete=False):
        if delete:
            self.session.delete()
        else:
            self.session.close()
