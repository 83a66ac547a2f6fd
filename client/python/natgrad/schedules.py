"""Schedules of the step number t (docs/math.md) as natgrad.v1.Schedule
messages. Steps are numbered from 1 and step t uses value(t).

Every helper that takes a hyperparameter accepts a plain number (a constant
schedule) or a Schedule built here::

    schedules.joined([schedules.linear_warmup(0.0, 0.1, 100),
                      schedules.cosine_decay(0.1, 10_000)], boundaries=[100])

``evaluate(schedule, t)`` computes the value client-side (for tests/plots).
"""
import math
import numbers

from natgrad._pb import schedule_pb2

Schedule = schedule_pb2.Schedule


def constant(value):
    return Schedule(constant=schedule_pb2.ConstantSchedule(value=float(value)))


def piecewise_constant(boundaries, values):
    """values[i] for boundaries[i-1] <= t < boundaries[i]."""
    boundaries, values = list(boundaries), list(values)
    if len(values) != len(boundaries) + 1:
        raise ValueError("piecewise_constant: need one more value than boundaries")
    if any(b2 <= b1 for b1, b2 in zip(boundaries, boundaries[1:])):
        raise ValueError("piecewise_constant: boundaries must be strictly increasing")
    return Schedule(piecewise_constant=schedule_pb2.PiecewiseConstantSchedule(
        boundaries=[int(b) for b in boundaries], values=[float(v) for v in values]))


def linear_warmup(start, end, steps):
    """start + (end - start) * min(t, steps) / steps."""
    return Schedule(linear_warmup=schedule_pb2.LinearWarmupSchedule(
        start=float(start), end=float(end), steps=int(steps)))


def cosine_decay(init, steps, alpha=0.0):
    """init * ((1 - alpha) * 0.5 * (1 + cos(pi * min(t, steps) / steps)) + alpha)."""
    return Schedule(cosine_decay=schedule_pb2.CosineDecaySchedule(
        init=float(init), steps=int(steps), alpha=float(alpha)))


def exponential_decay(init, rate, steps, staircase=False):
    """init * rate^(t / steps) (floor(t / steps) when staircase)."""
    return Schedule(exponential_decay=schedule_pb2.ExponentialDecaySchedule(
        init=float(init), rate=float(rate), steps=int(steps), staircase=bool(staircase)))


def polynomial_decay(init, end, steps, power=1.0):
    """(init - end) * (1 - min(t, steps) / steps)^power + end."""
    return Schedule(polynomial_decay=schedule_pb2.PolynomialDecaySchedule(
        init=float(init), end=float(end), power=float(power), steps=int(steps)))


def increasing_rate(alpha, beta):
    """alpha * (1 - exp(-beta * t)) (the seed thread's IncreasingRate)."""
    return Schedule(increasing_rate=schedule_pb2.IncreasingRateSchedule(
        alpha=float(alpha), beta=float(beta)))


def log_linear_warmup(start, end, steps):
    """10^(((K-k) log10 start + k log10 end) / K), k = min(t, K): Salimbeni et
    al.'s gamma warm-up, e.g. log_linear_warmup(1e-4, 1e-1, 10)."""
    if start <= 0 or end <= 0:
        raise ValueError("log_linear_warmup: start and end must be positive")
    return Schedule(log_linear_warmup=schedule_pb2.LogLinearWarmupSchedule(
        start=float(start), end=float(end), steps=int(steps)))


def joined(schedules, boundaries):
    """schedules[0] until boundaries[0], then schedules[i] evaluated at
    t - boundaries[i-1] (optax.join_schedules)."""
    schedules = [as_schedule(s) for s in schedules]
    boundaries = [int(b) for b in boundaries]
    if len(schedules) != len(boundaries) + 1:
        raise ValueError("joined: need one more schedule than boundaries")
    if any(b <= 0 for b in boundaries) or any(b2 <= b1 for b1, b2 in zip(boundaries, boundaries[1:])):
        raise ValueError("joined: boundaries must be positive and strictly increasing")
    return Schedule(joined=schedule_pb2.JoinedSchedule(schedules=schedules, boundaries=boundaries))


def warmup_cosine(peak, warmup_steps, total_steps, start=0.0, alpha=0.0):
    """Linear warm-up to `peak`, then cosine decay until `total_steps`."""
    return joined([linear_warmup(start, peak, warmup_steps),
                   cosine_decay(peak, max(1, total_steps - warmup_steps), alpha)],
                  [warmup_steps])


def as_schedule(x, what="schedule"):
    """A number -> constant(x); a Schedule passes through; None -> None."""
    if x is None:
        return None
    if isinstance(x, Schedule):
        return x
    if isinstance(x, numbers.Real):
        if not math.isfinite(float(x)):
            raise ValueError(f"{what}: value must be finite, got {x}")
        return constant(x)
    raise TypeError(f"{what}: expected a number or natgrad.schedules.Schedule, got {type(x).__name__}")


def evaluate(s, t):
    """The value of schedule `s` at step t (client-side mirror of the server)."""
    s = as_schedule(s)
    kind = s.WhichOneof("kind")
    if kind is None:
        raise ValueError("empty schedule")
    m = getattr(s, kind)
    if kind == "constant":
        return m.value
    if kind == "piecewise_constant":
        i = sum(1 for b in m.boundaries if t >= b)
        return m.values[i]
    if kind == "linear_warmup":
        return m.start + (m.end - m.start) * min(t, m.steps) / m.steps if m.steps > 0 else m.end
    if kind == "cosine_decay":
        frac = min(t, m.steps) / m.steps if m.steps > 0 else 1.0
        return m.init * ((1 - m.alpha) * 0.5 * (1 + math.cos(math.pi * frac)) + m.alpha)
    if kind == "exponential_decay":
        p = t / m.steps
        if m.staircase:
            p = math.floor(p)
        return m.init * m.rate ** p
    if kind == "polynomial_decay":
        return (m.init - m.end) * (1 - min(t, m.steps) / m.steps) ** m.power + m.end
    if kind == "increasing_rate":
        return m.alpha * (1 - math.exp(-m.beta * t))
    if kind == "log_linear_warmup":
        k = min(t, m.steps)
        K = m.steps
        return 10 ** (((K - k) * math.log10(m.start) + k * math.log10(m.end)) / K)
    if kind == "joined":
        off = 0
        for i, b in enumerate(m.boundaries):
            if t < b:
                return evaluate(m.schedules[i], t - off)
            off = b
        return evaluate(m.schedules[len(m.boundaries)], t - off)
    raise ValueError(f"unknown schedule kind {kind}")
