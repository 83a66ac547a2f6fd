import math

import pytest

from natgrad import blocks, schedules
from natgrad.v1 import blocks_pb2, tensor_pb2


def test_kfac_dense_block():
    b = blocks.kfac_dense("fc1", 64, 32, lr=0.1, damping=schedules.cosine_decay(1e-2, 100),
                          momentum=0.9, damping_mode="eigen", ema_decay=0.95, inverse_period=5)
    assert b.name == "fc1" and list(b.shape) == [32, 65]
    k = b.kfac_dense
    assert (k.d_in, k.d_out, k.has_bias) == (64, 32, True)
    assert k.learning_rate.constant.value == 0.1
    assert k.damping.cosine_decay.init == 0.01
    assert k.damping_mode == blocks_pb2.EIGEN_EXACT
    assert not k.HasField("weight_decay")  # None: server default
    nb = blocks.kfac_dense("fc2", 4, 2, bias=False)
    assert list(nb.shape) == [2, 4]


def test_first_order_and_gaussian_blocks():
    a = blocks.adam("bn.weight", [32], lr=1e-3, weight_decay=1e-2, decoupled_weight_decay=True)
    assert a.adam.decoupled_weight_decay and list(a.shape) == [32]
    s = blocks.sgd("emb", (10, 4), lr=0.1, momentum=0.9, nesterov=True)
    assert s.sgd.nesterov and list(s.shape) == [10, 4]
    g = blocks.gaussian("q", dim=5, copies=2, parametrization="natural", gamma=1.0)
    assert list(g.shape) == [2, 5] and g.gaussian.parametrization == blocks_pb2.NATURAL
    assert g.gaussian.max_halvings == 8


def test_session_config_options():
    cfg = blocks.session_config([blocks.sgd("w", [3], lr=0.1)], kl_clip=True,
                                adaptive_damping={"interval": 3}, state_dtype="float64",
                                display_name="x")
    assert cfg.kl_clip.enabled and cfg.kl_clip.kappa == 0
    assert cfg.adaptive_damping.enabled and cfg.adaptive_damping.interval == 3
    assert cfg.state_dtype == tensor_pb2.FLOAT64
    cfg = blocks.session_config([blocks.sgd("w", [3], lr=0.1)], kl_clip=1e-2)
    assert cfg.kl_clip.kappa == 1e-2


@pytest.mark.parametrize("bad,match", [
    (lambda: blocks.kfac_dense("x", 0, 3), "positive"),
    (lambda: blocks.kfac_dense("x", 3, 3, damping_mode="cholesky"), "damping_mode"),
    (lambda: blocks.kfac_dense("x", 3, 3, lr=float("nan")), "finite"),
    (lambda: blocks.gaussian("q", 3, parametrization="polar"), "parametrization"),
    (lambda: blocks.session_config([blocks.sgd("w", [1]), blocks.sgd("w", [1])]), "duplicate"),
    (lambda: schedules.joined([1.0, 2.0], [0]), "boundaries"),
    (lambda: schedules.piecewise_constant([5], [1.0]), "one more"),
])
def test_config_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        bad()


def test_schedule_evaluate_matches_definitions():
    ev = schedules.evaluate
    assert ev(0.5, 7) == 0.5
    assert ev(schedules.piecewise_constant([10, 20], [1, 2, 3]), 9) == 1
    assert ev(schedules.piecewise_constant([10, 20], [1, 2, 3]), 10) == 2
    assert ev(schedules.linear_warmup(0, 1, 10), 5) == 0.5
    assert math.isclose(ev(schedules.cosine_decay(1.0, 10, 0.1), 10), 0.1)
    assert math.isclose(ev(schedules.increasing_rate(2.0, 0.5), 2), 2 * (1 - math.exp(-1)))
    lw = schedules.log_linear_warmup(1e-4, 1e-1, 3)
    assert [round(math.log10(ev(lw, t)), 9) for t in (0, 1, 2, 3, 9)] == [-4, -3, -2, -1, -1]
    j = schedules.warmup_cosine(1.0, 10, 110)
    assert ev(j, 5) == 0.5 and ev(j, 10) == 1.0 and math.isclose(ev(j, 60), 0.5)
