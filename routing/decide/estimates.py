"""Turnaround, latency and GPU estimates from what the service has observed. Pure; no I/O.

The route choice needs one number per route: how long until the answer, at a chosen quantile
(p95 by default), not on average, because a deadline is missed by the tail. The observations
(``routing.store.observations`` keeps them in Redis) are lists of plain tuples; every function here
takes them, ``now`` and its parameters as arguments and returns a value, so the whole learning
step is table-tested and the simulation (``benchmarks/planner_sim.py``) drives exactly this code.

The rules, and why:

* **Prior until enough is seen.** Fewer than ``min_samples`` observations give the configured
  prior (``expected_turnaround`` in ``providers.toml``, ``MIXBATCH_REALTIME_ESTIMATE_S``) with
  ``source="prior"``, so one lucky batch cannot talk the planner into a risk, and a flushed
  store falls back to the same numbers a fresh install uses.
* **Recent weighs more.** Each observation weighs ``0.5 ** (age / half_life_s)``: provider
  queues change during the day, and a quantile of last week is not today's. A batch's age is
  counted from its *creation* (``at - seconds``): its turnaround tells about the provider as it
  was then, and a batch stuck for a day fades instead of dominating today's estimate.
* **Censoring is honoured.** A batch that expired, that we cancelled, or that is still running
  says only "longer than this". Dropping those would teach the planner that the provider is
  fast exactly when it is slow (we hedge and cancel the slow ones). So the quantile is read off a
  weighted Kaplan-Meier curve; when the quantile lies beyond every finished batch it is reported
  as a lower bound (``lower_bound=True``) at the longest time seen.
* **Batch size counts.** Larger batches take longer. The estimate fits ``log t = a + b log size``
  (weighted least squares over finished batches, ``b`` clipped to [0, 1]) when sizes vary
  enough, and reads the quantile of size-normalised turnarounds, so ``Estimate.at_size(n)``
  answers for a batch of ``n`` lines.

* **A young latency sample is truncated** (a call is recorded when it ends, so at first only
  the fast ones are in): see ``latency_estimate``.

* **The whole curve travels with the quantile.** An observed turnaround keeps its Kaplan-Meier
  curve (``Estimate.curve``, ``Estimate.p_longer``), so the expected-cost batch rule
  (``routing.decide.expected``) can ask how likely a batch is to be late at any point, not only
  at the quantile.

Rate-limit headroom, the realtime route's other input, is read in ``routing.decide.ratelimit``.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from routing.decide.ratelimit import Headroom
from routing.errors import ConfigError

__all__ = [
    "DEFAULT_HALF_LIFE_S",
    "DEFAULT_MIN_SAMPLES",
    "DEFAULT_QUANTILE",
    "DEFAULT_RULE",
    "Estimate",
    "EstimateRule",
    "GpuEstimate",
    "GpuObs",
    "LatencyObs",
    "Observations",
    "QuantileError",
    "TurnaroundObs",
    "check_quantile",
    "gpu_estimate",
    "latency_estimate",
    "recency_weights",
    "survival_curve",
    "turnaround_estimate",
    "weighted_quantile",
]

DEFAULT_QUANTILE = 0.95
DEFAULT_MIN_SAMPLES = 5
DEFAULT_HALF_LIFE_S = 2 * 3600.0
MIN_LOG_SIZE_SPREAD = 0.5
"""Standard deviation of log(size) needed before a size effect is fitted (sizes varying ~1.6x)."""
MIN_LATENCY_SPAN = 2.0
"""A latency sample must reach back (earliest call start to now) this many times its own
quantile before it replaces the prior: a younger one is truncated (``latency_estimate``)."""


class QuantileError(ConfigError, ValueError):
    """A quantile outside (0, 1). A ``ValueError`` too, so pydantic validators report it."""


def check_quantile(q: float, name: str = "quantile") -> float:
    """``q`` itself when it is a usable quantile; the error names ``name`` and the value.

    0 and 1 are refused: p0 and p100 of a heavy-tailed turnaround are the luckiest and the
    unluckiest batch ever seen, neither of which plans anything.
    """
    if isinstance(q, bool) or not isinstance(q, int | float) or not 0.0 < float(q) < 1.0:
        raise QuantileError(f"{name}: must be strictly between 0 and 1 (e.g. 0.95), got {q!r}")
    return float(q)


# -- observations: plain tuples, cheap to build by the thousand -------------------------------


class TurnaroundObs(NamedTuple):
    """One provider batch: ``seconds`` from create to terminal status, or to ``at`` if censored.

    ``censored`` marks a batch whose answers never came in that time (expired, cancelled, or
    still running): its true turnaround is *longer* than ``seconds``.
    """

    at: float
    seconds: float
    size: int = 1
    censored: bool = False


class LatencyObs(NamedTuple):
    """One realtime call: seconds from start (semaphore wait and retries included) to answer."""

    at: float
    seconds: float


class GpuObs(NamedTuple):
    """What a GPU worker reported for one model: throughput while busy and queue wait."""

    at: float
    texts_per_s: float | None
    queue_wait_s: float | None


class Observations(BaseModel):
    """Everything the store holds, as one value: what ``learn`` turns into route options.

    Keys: ``batch`` "account|endpoint|model"; ``realtime`` and ``headroom`` "account|model";
    ``gpu`` the model name the GPU worker reported, ``gpu_aliases`` alias -> that name;
    ``inflight`` "account|endpoint|model" -> batches still running (censored at their age).
    """

    batch: dict[str, list[TurnaroundObs]] = Field(default_factory=dict)
    inflight: dict[str, list[TurnaroundObs]] = Field(default_factory=dict)
    realtime: dict[str, list[LatencyObs]] = Field(default_factory=dict)
    headroom: dict[str, Headroom] = Field(default_factory=dict)
    gpu: dict[str, list[GpuObs]] = Field(default_factory=dict)
    gpu_aliases: dict[str, str] = Field(default_factory=dict)

    def empty(self) -> bool:
        return not (self.batch or self.inflight or self.realtime or self.headroom or self.gpu)


# -- estimates ---------------------------------------------------------------------------------


class Estimate(BaseModel):
    """A turnaround or latency at a quantile, and where it came from (shown by ``explain``)."""

    model_config = ConfigDict(frozen=True)

    seconds: float
    quantile: float
    source: Literal["prior", "observed"]
    n: int = 0
    needed: int = DEFAULT_MIN_SAMPLES
    lower_bound: bool = False
    ref_size: float | None = None
    size_exponent: float = 0.0
    curve: tuple[tuple[float, float], ...] = Field(default=(), repr=False)
    """The learned distribution behind ``seconds``: (t, P(T > t)) after each event, size-
    normalised, for the expected-cost rule (``routing.decide.expected``); empty on a prior."""

    def _scale(self, size: float | None) -> float:
        if size is None or self.ref_size is None or self.size_exponent == 0.0 or size <= 0:
            return 1.0
        return float((size / self.ref_size) ** self.size_exponent)

    def at_size(self, size: float | None) -> float:
        """Seconds for a batch of ``size`` lines (the fitted size effect); None: as estimated."""
        return self.seconds * self._scale(size)

    def p_longer(self, seconds: float, size: float | None = None) -> float | None:
        """P(turnaround > ``seconds``) for a batch of ``size`` lines; None: no curve (a prior).

        Beyond the last finished batch the curve stays at its last value, so a tail that is all
        censored (expired, cancelled, still running) keeps counting as late."""
        if not self.curve:
            return None
        t = seconds / self._scale(size)
        if t < self.curve[0][0]:
            return 1.0
        at = bisect.bisect_right(self.curve, (t, math.inf)) - 1
        return self.curve[at][1]

    def describe(self) -> str:
        p = f"p{self.quantile * 100:g}"
        if self.source == "prior" and self.n >= self.needed:
            return f"prior ({self.n} observations, too recent: slower calls still running)"
        if self.source == "prior":
            return f"prior ({self.n} of {self.needed} observations seen)"
        bound = " (at least: the tail is still running or expired)" if self.lower_bound else ""
        size = (
            f", x size^{self.size_exponent:.2f} from {self.ref_size:.0f} lines"
            if self.size_exponent and self.ref_size
            else ""
        )
        return f"observed {p} of {self.n}{bound}{size}"


class GpuEstimate(BaseModel):
    """What the route choice knows about the local route for one model.

    Built by ``gpu_estimate`` from the GPU worker's reports; ``wait_s`` is the queue wait at the
    quantile, ``texts_per_s`` a pessimistic throughput (the opposite quantile), so
    ``finish_s`` is wait plus one item's service time. ``stale`` means reports stopped coming
    (the worker is gone or stuck): the route choice then treats the GPU as unable to serve.
    """

    model_config = ConfigDict(frozen=True)

    model: str
    wait_s: float = Field(ge=0)
    texts_per_s: float = Field(gt=0)
    quantile: float = DEFAULT_QUANTILE
    source: Literal["prior", "observed"] = "prior"
    n: int = 0
    age_s: float | None = None
    stale: bool = False

    @property
    def service_s(self) -> float:
        return 1.0 / self.texts_per_s

    @property
    def finish_s(self) -> float:
        return self.wait_s + self.service_s

    def usd_per_request(self, usd_per_hour: float) -> float:
        """The hardware's amortised price of one item at the estimated throughput."""
        return usd_per_hour / 3600.0 / self.texts_per_s

    def describe(self) -> str:
        if self.stale:
            return f"stale: no GPU report for {self.age_s or 0:.0f}s"
        if self.source == "prior":
            return f"prior ({self.n} GPU reports)"
        return f"observed p{self.quantile * 100:g} wait of {self.n} GPU reports"


def recency_weights(ats: Sequence[float], now: float, half_life_s: float) -> list[float]:
    """``0.5 ** (age / half_life_s)`` per observation; future timestamps count as now."""
    if half_life_s <= 0:
        raise ValueError(f"half_life_s: must be > 0, got {half_life_s!r}")
    k = math.log(2.0) / half_life_s
    exp = math.exp
    return [exp(k * (at - now)) if at < now else 1.0 for at in ats]


def weighted_quantile(
    values: Sequence[float],
    weights: Sequence[float],
    q: float,
    censored: Sequence[bool] | None = None,
) -> float | None:
    """The ``q`` quantile of a weighted sample, right-censored values allowed (Kaplan-Meier).

    Without censoring this is the smallest value whose cumulative weight reaches ``q`` of the
    total. A censored value leaves the risk set without an event, so it lifts the curve of the
    values above it. Returns None when the quantile lies beyond the last event (the tail is all
    censored) or the sample is empty; ties put events before censorings, as Kaplan-Meier does.
    """
    check_quantile(q)
    n = len(values)
    if len(weights) != n or (censored is not None and len(censored) != n):
        raise ValueError("values, weights and censored must have the same length")
    keep = [i for i in range(n) if weights[i] > 0 and values[i] == values[i]]
    at_risk = math.fsum(weights[i] for i in keep)
    if at_risk <= 0:
        return None
    target = 1.0 - q
    if censored is None or not any(censored):
        keep.sort(key=values.__getitem__)
        need = q * at_risk * (1.0 - 1e-12)
        cumulative = 0.0
        for i in keep:
            cumulative += weights[i]
            if cumulative >= need:
                return values[i]
        return values[keep[-1]]
    keep.sort(key=lambda i: (values[i], censored[i]))
    survival = 1.0
    for i in keep:
        w = weights[i]
        if not censored[i]:
            survival *= 1.0 - w / at_risk
            if survival <= target + 1e-12:
                return values[i]
        at_risk -= w
        if at_risk <= 1e-300:
            break
    return None


def survival_curve(
    values: Sequence[float],
    weights: Sequence[float],
    censored: Sequence[bool],
    points: int = 256,
) -> tuple[tuple[float, float], ...]:
    """The weighted Kaplan-Meier curve as (t, P(T > t)) after each event, at most ``points``.

    The same estimator ``weighted_quantile`` reads one point of; thinned (the last point always
    kept) so that an estimate stays small when it is learned again every minute."""
    keep = [i for i in range(len(values)) if weights[i] > 0 and values[i] == values[i]]
    keep.sort(key=lambda i: (values[i], censored[i]))
    at_risk = math.fsum(weights[i] for i in keep)
    survival = 1.0
    out: list[tuple[float, float]] = []
    for i in keep:
        if at_risk <= 1e-300:
            break
        w = weights[i]
        if not censored[i]:
            survival *= max(0.0, 1.0 - w / at_risk)
            if out and out[-1][0] == values[i]:
                out[-1] = (values[i], survival)
            else:
                out.append((values[i], survival))
        at_risk -= w
    if len(out) > points:
        step = len(out) / points
        out = [out[int(k * step)] for k in range(points - 1)] + [out[-1]]
    return tuple(out)


def _size_fit(
    obs: Sequence[TurnaroundObs], weights: Sequence[float], min_samples: int
) -> tuple[float | None, float]:
    """(reference size, exponent b) of ``log t = a + b log size`` over finished batches."""
    log = math.log
    xs: list[float] = []
    ys: list[float] = []
    ws: list[float] = []
    for o, w in zip(obs, weights, strict=True):
        if not o.censored and w > 0:
            xs.append(log(o.size) if o.size > 1 else 0.0)
            ys.append(log(o.seconds) if o.seconds > 1e-3 else -6.9)
            ws.append(w)
    total = math.fsum(ws)
    if total <= 0:
        return None, 0.0
    mx = sum(x * w for x, w in zip(xs, ws, strict=True)) / total
    ref = math.exp(mx)
    if len(xs) < 2 * min_samples:
        return ref, 0.0
    sxx = sum(w * (x - mx) ** 2 for x, w in zip(xs, ws, strict=True)) / total
    if math.sqrt(sxx) < MIN_LOG_SIZE_SPREAD:
        return ref, 0.0
    my = sum(y * w for y, w in zip(ys, ws, strict=True)) / total
    sxy = sum(w * (x - mx) * (y - my) for x, y, w in zip(xs, ys, ws, strict=True)) / total
    return ref, min(1.0, max(0.0, sxy / sxx))


class EstimateRule(NamedTuple):
    """How observations become an estimate: at which quantile, after how many (the prior until
    then), and how fast old ones fade."""

    quantile: float = DEFAULT_QUANTILE
    min_samples: int = DEFAULT_MIN_SAMPLES
    half_life_s: float = DEFAULT_HALF_LIFE_S

    def prior(self, prior_s: float, seen: int) -> Estimate | None:
        """The prior while fewer than ``min_samples`` were seen; None once enough were."""
        check_quantile(self.quantile)
        if seen >= self.min_samples:
            return None
        return Estimate(
            seconds=prior_s,
            quantile=self.quantile,
            source="prior",
            n=seen,
            needed=self.min_samples,
        )


DEFAULT_RULE = EstimateRule()


def turnaround_estimate(
    obs: Sequence[TurnaroundObs],
    now: float,
    *,
    prior_s: float,
    rule: EstimateRule = DEFAULT_RULE,
    inflight: Sequence[TurnaroundObs] = (),
) -> Estimate:
    """The ``rule.quantile`` of a provider batch's turnaround, from ``obs`` (finished or censored).

    ``inflight`` are batches still running, censored at their age; they count as evidence but
    not towards ``min_samples`` (a running batch has not told us when it ends).
    """
    prior = rule.prior(prior_s, len(obs))
    if prior is not None:
        return prior
    everything = [*obs, *inflight]
    # by submission time: a batch's turnaround tells about the provider when it was created
    weights = recency_weights([o.at - o.seconds for o in everything], now, rule.half_life_s)
    ref, b = _size_fit(everything, weights, rule.min_samples)
    if b:
        assert ref is not None
        values = [o.seconds * (ref / max(o.size, 1)) ** b for o in everything]
    else:
        values = [o.seconds for o in everything]
    flags = [o.censored for o in everything]
    value = weighted_quantile(values, weights, rule.quantile, flags)
    curve = survival_curve(values, weights, flags)
    lower_bound = value is None
    if value is None:
        value = max(values)
    return Estimate(
        seconds=value,
        quantile=rule.quantile,
        source="observed",
        n=len(obs),
        needed=rule.min_samples,
        lower_bound=lower_bound,
        ref_size=ref,
        size_exponent=b,
        curve=curve,
    )


def latency_estimate(
    obs: Sequence[LatencyObs], now: float, *, prior_s: float, rule: EstimateRule = DEFAULT_RULE
) -> Estimate:
    """The ``rule.quantile`` of realtime latency; the prior until ``min_samples`` calls were seen.

    A sample whose earliest call started less than ``MIN_LATENCY_SPAN`` times its own quantile
    ago is young: calls slower than their age are still running, unseen, so it reads low (flex's
    first five answers looked like 40 s and one-minute deadlines went to it). A young sample
    does not replace the prior; one above the prior stands as a lower bound."""
    prior = rule.prior(prior_s, len(obs))
    if prior is not None:
        return prior
    weights = recency_weights([o.at for o in obs], now, rule.half_life_s)
    value = weighted_quantile([o.seconds for o in obs], weights, rule.quantile)
    seconds = prior_s if value is None else value
    young = now - min(o.at - o.seconds for o in obs) < MIN_LATENCY_SPAN * seconds
    return Estimate(
        seconds=max(seconds, prior_s) if young else seconds,
        quantile=rule.quantile,
        source="prior" if young and seconds <= prior_s else "observed",
        n=len(obs),
        needed=rule.min_samples,
        lower_bound=young,
    )


def gpu_estimate(
    model: str,
    obs: Sequence[GpuObs],
    now: float,
    *,
    prior_wait_s: float,
    prior_texts_per_s: float,
    quantile: float = DEFAULT_QUANTILE,
    min_samples: int = 1,
    half_life_s: float = DEFAULT_HALF_LIFE_S,
    max_age_s: float = 900.0,
) -> GpuEstimate:
    """The local route's wait (at ``quantile``) and a pessimistic throughput for ``model``.

    A GPU worker reports after each micro-batch and on a heartbeat, so the newest report's age
    tells whether one is alive: older than ``max_age_s`` marks the estimate ``stale``. With no
    report at all the priors stand (a worker may be starting).
    """
    check_quantile(quantile)
    newest = max((o.at for o in obs), default=None)
    age = None if newest is None else max(0.0, now - newest)
    stale = age is not None and age > max_age_s
    waits = [o for o in obs if o.queue_wait_s is not None and o.queue_wait_s >= 0]
    rates = [o for o in obs if o.texts_per_s is not None and o.texts_per_s > 0]
    wait, rate = prior_wait_s, prior_texts_per_s
    source: Literal["prior", "observed"] = "prior"
    if len(waits) >= min_samples:
        w = recency_weights([o.at for o in waits], now, half_life_s)
        found = weighted_quantile([float(o.queue_wait_s or 0.0) for o in waits], w, quantile)
        wait, source = (prior_wait_s if found is None else found), "observed"
    if len(rates) >= min_samples:
        w = recency_weights([o.at for o in rates], now, half_life_s)
        found = weighted_quantile([float(o.texts_per_s or 0.0) for o in rates], w, 1 - quantile)
        rate = prior_texts_per_s if found is None else found
        source = "observed"
    return GpuEstimate(
        model=model,
        wait_s=max(0.0, wait),
        texts_per_s=rate,
        quantile=quantile,
        source=source,
        n=len(obs),
        age_s=age,
        stale=stale,
    )
