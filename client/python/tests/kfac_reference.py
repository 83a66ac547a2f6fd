"""An independent numpy K-FAC reference (docs/math.md) for the tests.

Only what step 1 of a fresh session needs: EMA factors started at zero and
bias-corrected equal the batch factors at step 1; one decomposition at step
1; KL clipping over all K-FAC blocks; momentum buffer starts at zero.
"""
import numpy as np


def factors(a, g, bias):
    """A = ābᵀā/n (ā = [a, 1] with a bias), G = gᵀg/n; float64, symmetrised."""
    a = np.asarray(a, np.float64)
    g = np.asarray(g, np.float64)
    n = a.shape[0]
    if bias:
        a = np.concatenate([a, np.ones((n, 1))], axis=1)
    A = a.T @ a / n
    G = g.T @ g / n
    return 0.5 * (A + A.T), 0.5 * (G + G.T)


def precondition(grad, A, G, damping, mode="tikhonov"):
    grad = np.asarray(grad, np.float64)
    if mode == "tikhonov":
        pi = np.sqrt((np.trace(A) / A.shape[0]) / (np.trace(G) / G.shape[0]))
        s = np.sqrt(damping)
        Ga = G + (s / pi) * np.eye(G.shape[0])
        Aa = A + (pi * s) * np.eye(A.shape[0])
        return np.linalg.solve(Ga, np.linalg.solve(Aa.T, grad.T).T)
    if mode == "eigen":
        sA, QA = np.linalg.eigh(A)
        sG, QG = np.linalg.eigh(G)
        sA, sG = np.maximum(sA, 0), np.maximum(sG, 0)
        return QG @ ((QG.T @ grad @ QA) / (np.outer(sG, sA) + damping)) @ QA.T
    raise ValueError(mode)


def first_step(layers, lr, damping, momentum=0.9, mode="tikhonov", kl_clip=1e-3, weight_decay=0.0):
    """layers: name -> dict(grad=[d_out, d_in(+1)], a=[n, d_in], g=[n, d_out],
    bias=bool, params=optional). Returns (deltas, nu)."""
    V, grads = {}, {}
    for name, L in layers.items():
        A, G = factors(L["a"], L["g"], L["bias"])
        grad = np.asarray(L["grad"], np.float64)
        if weight_decay and L.get("params") is not None:
            grad = grad + weight_decay * np.asarray(L["params"], np.float64)
        grads[name] = grad
        V[name] = precondition(grad, A, G, damping, mode)
    nu = 1.0
    if kl_clip:
        s = sum(lr ** 2 * np.sum(V[n] * grads[n]) for n in V)
        nu = 1.0 if s == 0 else min(1.0, np.sqrt(kl_clip / abs(s)))
    # m_1 = mu * 0 + nu V; delta = -lr m
    return {n: -lr * nu * V[n] for n in V}, nu


def adam_first_step(grad, lr, eps=1e-8):
    g = np.asarray(grad, np.float64)
    return -lr * g / (np.abs(g) + eps)
