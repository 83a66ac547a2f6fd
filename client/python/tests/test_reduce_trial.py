"""ReduceTrial (reduce="auto"'s plan): warm-up steps untimed, forms alternating."""
import pytest

from natgrad import errors
from natgrad._reduce_trial import ReduceTrial


def run_sequential(costs_by_form):
    """natgrad.torch's use: form() then record() per statistics step."""
    t = ReduceTrial()
    forms = []
    while t.choice is None:
        f = t.form()
        forms.append(f)
        t.record(costs_by_form(f, len(forms)))
    return t, forms


def test_plan_warms_each_form_then_alternates():
    k = ReduceTrial.TRIALS
    t, forms = run_sequential(lambda f, i: 1.0)
    assert forms == [None] + ["raw", "reduced"] * (k + 1)
    assert len(forms) == ReduceTrial.PLAN_STEPS
    assert t.warm == ["raw", "reduced"]
    assert len(t.costs["raw"]) == k and len(t.costs["reduced"]) == k


def test_a_slow_first_step_of_a_form_does_not_decide():
    # Raw's first two steps are cold (a compile, a new segment, the
    # server's first buffers): what the JAX autoencoder showed, where two
    # back-to-back raw trials then chose the slower reduced form.
    def cost(f, i):
        if f == "raw":
            return 10.0 if i <= 4 else 1.0
        return 2.0
    t, _ = run_sequential(cost)
    assert t.choice == "raw"
    assert 10.0 in t.costs["raw"]  # the second cold one is timed; min drops it


def test_load_drift_falls_on_both_forms():
    # The machine slows down step by step; reduced is 10% cheaper at any
    # moment. Alternating, reduced's best is still the lower.
    def cost(f, i):
        return (1.0 + 0.1 * i) * (0.9 if f == "reduced" else 1.0)
    t, _ = run_sequential(cost)
    assert t.choice == "reduced"


def test_pipelined_plan_records_by_form():
    """natgrad.jax's use: the plan runs one step ahead of the costs."""
    t = ReduceTrial()
    planned = [t.next_form() for _ in range(ReduceTrial.PLAN_STEPS + 1)]
    assert planned[-1] is None  # past the plan, before the last cost is in
    for f in planned:
        t.record_form(f, 1.0 if f == "reduced" else 2.0)
    assert t.choice == "reduced"
    assert t.next_form() == "reduced"


def test_state_round_trips_mid_trial():
    t = ReduceTrial()
    for _ in range(4):
        t.record(1.0)
    u = ReduceTrial.from_state(t.state())
    assert (u.costs, u.warm, u.choice, u.form()) == (t.costs, t.warm, None, t.form())


def test_state_without_warm_ups_counts_its_forms_as_warm():
    # A state_dict saved by a client whose trial had no warm-up steps.
    old = {"costs": {"raw": [1.0], "reduced": []}, "choice": None, "steps": 2}
    t = ReduceTrial.from_state(old)
    assert t.warm == ["raw", "reduced"]
    t.record_form("reduced", 0.5)
    assert t.costs["reduced"] == [0.5]


@pytest.mark.parametrize("bad", [
    {"costs": {"raw": [], "reduced": []}, "choice": "fast", "steps": 0},
    {"costs": {"raw": [], "reduced": []}, "choice": None, "steps": 0, "warm": ["fast"]},
    {"costs": {"raw": ["x"], "reduced": []}, "choice": None, "steps": 0},
    {"choice": None, "steps": 0},
])
def test_malformed_state_is_refused(bad):
    with pytest.raises(errors.InvalidArgument) as e:
        ReduceTrial.from_state(bad)
    assert "reduce_trial" in str(e.value)
