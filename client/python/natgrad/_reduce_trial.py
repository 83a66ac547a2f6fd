"""reduce="auto": raw rows or reduced factors, chosen by measured cost
(shared by natgrad.torch and natgrad.jax)."""
import logging

from natgrad import errors

log = logging.getLogger("natgrad")


class ReduceTrial:
    """reduce="auto": raw rows or reduced factors, chosen by measured cost.

    The first statistics step (cold: allocations, thread pools, the first
    decomposition) sends whichever form is smaller on the wire. Then each
    form gets one untimed warm-up step (raw, then reduced: a form's first
    steps pay its own one-time costs, such as a jit compilation, a larger
    shared-memory segment or the server's first buffers of that size, which
    made a back-to-back trial pick the slower form), and then the forms
    alternate for TRIALS timed steps each, so that a drift in the machine's
    load falls on both. The form with the lower best cost is kept, and saved
    in state_dict() (a resumed run continues the trial or keeps the
    choice). The choice depends on timings, so two runs may differ in the
    last bits; pass reduce=True or False for bit-reproducible runs.
    A step's cost is its wall time in the client's step() from the first
    statistics computed to the response received (client reduction or
    serialization, the upload, the server's decode and Gram products),
    minus the server's reported inversion wait, which does not depend on the
    form. Layers whose spatial size changes within a step always send
    factors."""

    TRIALS = 3
    # Statistics steps the plan takes: the cold one, a warm-up per form,
    # TRIALS timed per form.
    PLAN_STEPS = 1 + 2 * (1 + TRIALS)

    def __init__(self):
        self.costs = {"raw": [], "reduced": []}
        self.choice = None
        self.warm = []  # the forms whose (untimed) warm-up step is recorded
        self._steps = 0  # statistics steps recorded so far

    def state(self):
        return {"costs": {k: list(v) for k, v in self.costs.items()}, "choice": self.choice,
                "warm": list(self.warm), "steps": self._steps}

    @classmethod
    def from_state(cls, state):
        t = cls()
        if isinstance(state, dict):
            try:
                costs = {f: [float(c) for c in state["costs"][f]] for f in ("raw", "reduced")}
                choice = state["choice"]
                steps = int(state["steps"])
                # A state saved before warm-up steps existed timed its forms
                # from their first step.
                warm = [str(f) for f in state.get("warm", ("raw", "reduced"))]
            except (KeyError, TypeError, ValueError) as e:
                raise errors.InvalidArgument(f"load_state_dict: natgrad reduce_trial is malformed: {e}",
                                             field="natgrad.reduce_trial") from None
            if choice not in (None, "raw", "reduced"):
                raise errors.InvalidArgument(f"load_state_dict: natgrad reduce_trial choice {choice!r}",
                                             field="natgrad.reduce_trial")
            if not set(warm) <= {"raw", "reduced"}:
                raise errors.InvalidArgument(f"load_state_dict: natgrad reduce_trial warm {warm!r}",
                                             field="natgrad.reduce_trial")
            t.costs, t.choice, t.warm, t._steps = costs, choice, warm, steps
        return t

    @classmethod
    def planned(cls, index):
        """The form the plan gives statistics step `index` (0-based): None
        (by bytes) for the first, then raw and reduced alternating, the
        first of each untimed; None past the plan."""
        if index == 0 or index >= cls.PLAN_STEPS:
            return None
        return "raw" if index % 2 == 1 else "reduced"

    def form(self):
        """None (by bytes), "raw" or "reduced" for this step."""
        if self.choice is not None:
            return self.choice
        return self.planned(self._steps)

    def record(self, seconds):
        if self.choice is not None:
            return
        form = self.form()
        self._steps += 1
        self.record_form(form, seconds)

    # natgrad.jax plans a step's form when it prepares the step and records
    # its cost when the response arrives, which in pipelined mode is after
    # the next step is prepared; so it plans ahead and records by form.
    def next_form(self):
        """The form for the next statistics step, advancing the plan (None,
        by bytes, for the first and again past the plan while the trial's
        last costs are still in flight)."""
        if self.choice is not None:
            return self.choice
        planned = self._steps
        self._steps += 1
        return self.planned(planned)

    def record_form(self, form, seconds):
        """The cost of a step sent in `form` (None: not a trial step); a
        form's first is its warm-up and is not kept."""
        if self.choice is not None or form not in self.costs:
            return
        if form not in self.warm:
            self.warm.append(form)
            return
        self.costs[form].append(seconds)
        if all(len(self.costs[f]) >= self.TRIALS for f in self.costs):
            self.choice = min(("raw", "reduced"), key=lambda f: min(self.costs[f]))
            log.info("natgrad: reduce='auto' chose %s statistics (best step costs: raw %.1f ms, "
                     "reduced %.1f ms)", self.choice, 1e3 * min(self.costs["raw"]),
                     1e3 * min(self.costs["reduced"]))
