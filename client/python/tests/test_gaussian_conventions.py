"""Gaussian-block conventions that surprise GPflow users, made explicit and
loud, checked against the real server and natgrad.gaussian's numpy reference.
"""
import numpy as np
import pytest

import natgrad
from natgrad import blocks
from natgrad import gaussian as ng
from natgrad._pb import step_pb2

M, L = 3, 2  # dim, copies (GPflow: q_mu [M, L], q_sqrt [L, M, M])


def gpflow_q(seed=0, M=M, L=L):
    r = np.random.default_rng(seed)
    q_mu = r.standard_normal((M, L))
    q_sqrt = np.stack([np.tril(0.3 * r.standard_normal((M, M)), -1) + np.diag(r.uniform(0.6, 1.4, M))
                       for _ in range(L)])
    d_mu = r.standard_normal((M, L))
    d_sqrt = np.stack([np.tril(r.standard_normal((M, M))) for _ in range(L)])
    return q_mu, q_sqrt, d_mu, d_sqrt


def session(client, copies=L, dim=M, **kw):
    kw.setdefault("gamma", 0.1)
    return client.create_session([blocks.gaussian("q", dim, copies, parametrization="mean_cholesky", **kw)],
                                 state_dtype="float64")


def reference(q_mu, q_sqrt, d_mu, d_sqrt, gamma):
    """natgrad.gaussian.natural_gradient_step per copy, in GPflow layout."""
    mus, sqrts = [], []
    for l in range(q_sqrt.shape[0]):
        m, Lc = ng.natural_gradient_step(q_mu[:, l], q_sqrt[l], d_mu[:, l], d_sqrt[l], "mean_cholesky",
                                         gamma=gamma)
        mus.append(m)
        sqrts.append(Lc)
    return np.stack(mus, 1), np.stack(sqrts)


def test_gpflow_helpers_round_trip_and_check_shapes():
    q_mu, q_sqrt, _, _ = gpflow_q()
    p1, p2 = ng.from_gpflow(q_mu, q_sqrt)
    assert p1.shape == (L, M) and p2.shape == (L, M, M)
    np.testing.assert_array_equal(p1, q_mu.T)
    back_mu, back_sqrt = ng.to_gpflow(p1, p2)
    np.testing.assert_array_equal(back_mu, q_mu)
    np.testing.assert_array_equal(back_sqrt, q_sqrt)
    with pytest.raises(ValueError, match="transposed"):
        ng.from_gpflow(q_mu.T, q_sqrt)  # natgrad layout handed to the GPflow helper


def test_gpflow_layout_matches_transposed_input_and_reference(client):
    q_mu, q_sqrt, d_mu, d_sqrt = gpflow_q(1)
    s_gp, s_ng = session(client), session(client)
    r_gp = s_gp.step({"q": ng.step_input(q_mu, q_sqrt, d_mu, d_sqrt, layout="gpflow")})["q"]
    p1, p2 = ng.from_gpflow(q_mu, q_sqrt)
    g1, g2 = ng.from_gpflow(d_mu, d_sqrt)
    r_ng = s_ng.step({"q": ng.step_input(p1, p2, g1, g2)})["q"]
    # GPflow layout in, GPflow layout out; same numbers as the [L, M] input.
    assert r_gp.param1.shape == (M, L) and r_gp.delta1.shape == (M, L)
    assert r_ng.param1.shape == (L, M)
    np.testing.assert_array_equal(r_gp.param1, r_ng.param1.T)
    np.testing.assert_array_equal(r_gp.param2, r_ng.param2)
    want_mu, want_sqrt = reference(q_mu, q_sqrt, d_mu, d_sqrt, 0.1)
    np.testing.assert_allclose(r_gp.param1, want_mu, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(r_gp.param2, want_sqrt, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(r_gp.delta1, want_mu - q_mu, rtol=1e-9, atol=1e-12)
    # GaussianOptimizer speaks the same layout.
    opt = ng.GaussianOptimizer(client, M, L, gamma=0.1)
    m, S = opt.step(q_mu, q_sqrt, d_mu, d_sqrt, layout="gpflow")
    np.testing.assert_array_equal(m, r_gp.param1)
    for s in (s_gp, s_ng, opt):
        s.close(delete=True) if s is opt else s.delete()


def test_untransposed_gpflow_q_mu_is_rejected(client):
    q_mu, q_sqrt, d_mu, d_sqrt = gpflow_q(2)
    s = session(client)
    with pytest.raises(natgrad.InvalidArgument, match=r"GPflow's q_mu layout \[M, L\].*layout='gpflow'") as e:
        s.step({"q": ng.step_input(q_mu, q_sqrt, d_mu, d_sqrt)})
    assert e.value.block == "q" and e.value.field == "param1"
    # The single-output GPflow case, q_mu [M, 1], too.
    s1 = session(client, copies=1)
    with pytest.raises(natgrad.InvalidArgument, match="layout='gpflow'"):
        s1.step({"q": ng.step_input(q_mu[:, :1], q_sqrt[:1], d_mu[:, :1], d_sqrt[:1])})
    r = s1.step({"q": ng.step_input(q_mu[:, :1], q_sqrt[:1], d_mu[:, :1], d_sqrt[:1], layout="gpflow")})
    assert r["q"].param1.shape == (M, 1)
    assert s.next_step == 1
    s.delete()
    s1.delete()


def test_square_layout_must_be_named(client):
    q_mu, q_sqrt, d_mu, d_sqrt = gpflow_q(3, M=3, L=3)
    s = session(client, copies=3, dim=3)
    with pytest.raises(natgrad.InvalidArgument, match="copies == dim == 3.*layout") as e:
        s.step({"q": ng.step_input(q_mu, q_sqrt, d_mu, d_sqrt)})
    assert e.value.field == "layout"
    assert s.next_step == 1
    r_gp = s.step({"q": ng.step_input(q_mu, q_sqrt, d_mu, d_sqrt, layout="gpflow")})["q"]
    want_mu, _ = reference(q_mu, q_sqrt, d_mu, d_sqrt, 0.1)
    np.testing.assert_allclose(r_gp.param1, want_mu, rtol=1e-9, atol=1e-12)
    # layout="natgrad" reads the same arrays as [L, M]: a different (and for
    # GPflow data wrong) step, which is why the client will not guess.
    r_ng = s.step({"q": ng.step_input(q_mu, q_sqrt, d_mu, d_sqrt, layout="natgrad")})["q"]
    assert not np.allclose(r_ng.param1, r_gp.param1)
    s.delete()


def test_gradient_space_is_always_explicit(client):
    q_mu, q_sqrt, d_mu, d_sqrt = gpflow_q(4)
    p1, p2 = ng.from_gpflow(q_mu, q_sqrt)
    g1, g2 = ng.from_gpflow(d_mu, d_sqrt)
    s = session(client)
    # On the wire the field is never left unset (unset = expectation).
    (req,) = s.build_requests({"q": ng.step_input(p1, p2, g1, g2)})
    assert req.blocks[0].gaussian.gradient_space == step_pb2.PARAMETRIZATION_GRADIENT
    (req,) = s.build_requests({"q": ng.step_input(p1, p2, g1, g2, "expectation")})
    assert req.blocks[0].gaussian.gradient_space == step_pb2.EXPECTATION_GRADIENT
    # A bare dict without it is refused rather than read as either.
    with pytest.raises(natgrad.InvalidArgument, match="gradient_space.*missing") as e:
        s.step({"q": {"param1": p1, "param2": p2, "grad1": g1, "grad2": g2}})
    assert e.value.field == "gradient_space"
    with pytest.raises(ValueError, match="gradient_space"):
        ng.step_input(p1, p2, g1, g2, "natural")
    # The two spaces are different steps, each matching the reference.
    for space in ("parametrization", "expectation"):
        fresh = session(client)
        u = fresh.step({"q": ng.step_input(p1, p2, g1, g2, space)})["q"]
        for l in range(L):
            m, Lc = ng.natural_gradient_step(p1[l], p2[l], g1[l], g2[l], "mean_cholesky", gamma=0.1,
                                             gradient_space=space)
            np.testing.assert_allclose(u.param1[l], m, rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(u.param2[l], Lc, rtol=1e-9, atol=1e-12)
        fresh.delete()
    s.delete()


def test_max_halvings_counts_literally():
    assert blocks.gaussian("q", 2, max_halvings=0).gaussian.max_halvings == -1   # none
    assert blocks.gaussian("q", 2, max_halvings=None).gaussian.max_halvings == 0  # server default
    assert blocks.gaussian("q", 2, max_halvings=3).gaussian.max_halvings == 3
    assert blocks.gaussian("q", 2).gaussian.max_halvings == 8
    for bad in (-1, 65, 1.5):
        with pytest.raises(ValueError, match="max_halvings"):
            blocks.gaussian("q", 2, max_halvings=bad)


def test_max_halvings_zero_means_no_halving_on_the_server(client):
    # S = I and dL/deta2 = -I with gamma 1: -2 theta2' = I - 2 gamma I leaves
    # the cone at gamma = 1 and 0.5 and is back inside at gamma = 0.25.
    m, S = np.array([0.5, -1.0]), np.eye(2)
    x = {"param1": m, "param2": S, "grad1": np.zeros(2), "grad2": -np.eye(2),
         "gradient_space": "expectation"}

    def make(mh):
        return client.create_session([blocks.gaussian("q", 2, parametrization="mean_covariance",
                                                      gamma=1.0, max_halvings=mh)], state_dtype="float64")

    none = make(0)
    with pytest.raises(natgrad.InvalidArgument, match="after 0 halvings"):
        none.step({"q": x})
    default = make(None)
    u = default.step({"q": x})["q"]
    assert u.halvings == 2 and u.gamma_used == 0.25
    m_ref, S_ref = ng.natural_gradient_step(m, S, x["grad1"], x["grad2"], "mean_covariance", gamma=0.25,
                                            gradient_space="expectation")
    np.testing.assert_allclose(u.param2.reshape(2, 2), S_ref, rtol=1e-12)
    one = make(1)
    with pytest.raises(natgrad.InvalidArgument, match="after 1 halvings"):
        one.step({"q": x})
    for s in (none, default, one):
        s.delete()
