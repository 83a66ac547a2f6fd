"""reduce="auto": raw rows or reduced factors, chosen by measured cost
(shared by natgrad.torch and natgrad.jax)."""
import logging

from natgrad import errors

log = logging.getLogger("natgrad")


class ReduceTrial:
    """reduce="auto": raw rows or reduced factors, chosen by measured cost.

    The first statistics step (cold: allocations, thread pools, the first
    decomposition) sends whichever form is smaller on the wire; the next
    TRIALS statistics steps send raw rows for every layer, the TRIALS after
    them reduced factors; the form with the lower best cost is then kept,
    and saved in state_dict() (a resumed run continues the trial or keeps
    the choice). The choice depends on timings, so two runs may differ in
    the last bits; pass reduce=True or False for bit-reproducible runs.
    A step's cost is its wall time in the client's step() from the first
    statistics computed to the response received (client reduction or
    serialization, the upload, the server's decode and Gram products),
    minus the server's reported inversion wait, which does not depend on the
    form. Layers whose spatial size changes within a step always send
    factors."""

    TRIALS = 2

    def __init__(self):
        self.costs = {"raw": [], "reduced": []}
        self.choice = None
        self._steps = 0  # statistics steps recorded so far

    def state(self):
        return {"costs": {k: list(v) for k, v in self.costs.items()}, "choice": self.choice,
                "steps": self._steps}

    @classmethod
    def from_state(cls, state):
        t = cls()
        if isinstance(state, dict):
            try:
                costs = {f: [float(c) for c in state["costs"][f]] for f in ("raw", "reduced")}
                choice = state["choice"]
                steps = int(state["steps"])
            except (KeyError, TypeError, ValueError) as e:
                raise errors.InvalidArgument(f"load_state_dict: natgrad reduce_trial is malformed: {e}",
                                             field="natgrad.reduce_trial") from None
            if choice not in (None, "raw", "reduced"):
                raise errors.InvalidArgument(f"load_state_dict: natgrad reduce_trial choice {choice!r}",
                                             field="natgrad.reduce_trial")
            t.costs, t.choice, t._steps = costs, choice, steps
        return t

    def form(self):
        """None (warm-up: by bytes), "raw" or "reduced" for this step."""
        if self.choice is not None:
            return self.choice
        if self._steps == 0:
            return None
        return "raw" if self._steps <= self.TRIALS else "reduced"

    def record(self, seconds):
        if self.choice is not None:
            return
        form = self.form()
        self._steps += 1
        if form is None:
            return
        self.costs[form].append(seconds)
        if len(self.costs["reduced"]) == self.TRIALS:
            self.choice = min(("raw", "reduced"), key=lambda f: min(self.costs[f]))
            log.info("natgrad: reduce='auto' chose %s statistics (best step costs: raw %.1f ms, "
                     "reduced %.1f ms)", self.choice, 1e3 * min(self.costs["raw"]),
                     1e3 * min(self.costs["reduced"]))

    # natgrad.jax plans a step's form when it prepares the step and records
    # its cost when the response arrives, which in pipelined mode is after
    # the next step is prepared; so it plans ahead and records by form.
    def next_form(self):
        """The form for the next statistics step, advancing the plan: None
        (by bytes) for the first, then TRIALS raw and TRIALS reduced, then
        the choice (None again while the trial's costs are still in flight)."""
        if self.choice is not None:
            return self.choice
        planned = self._steps
        self._steps += 1
        if planned == 0 or planned > 2 * self.TRIALS:
            return None
        return "raw" if planned <= self.TRIALS else "reduced"

    def record_form(self, form, seconds):
        """The cost of a step sent in `form` (None: not a trial step)."""
        if self.choice is not None or form not in self.costs:
            return
        self.costs[form].append(seconds)
        if all(len(self.costs[f]) >= self.TRIALS for f in self.costs):
            self.choice = min(("raw", "reduced"), key=lambda f: min(self.costs[f]))
            log.info("natgrad: reduce='auto' chose %s statistics (best step costs: raw %.1f ms, "
                     "reduced %.1f ms)", self.choice, 1e3 * min(self.costs["raw"]),
                     1e3 * min(self.costs["reduced"]))
