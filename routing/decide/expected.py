"""The batch route by expected cost, not a fixed quantile. Pure; no I/O.

The quantile rule (``routing.decide.route``) sends a request to a provider batch only when the
batch's p95 turnaround plus a margin fits before its deadline. That is safe, and pays for the
safety every time: the requests whose deadline falls between the batch's median and its p95 go
to realtime although most batches would have answered them. Here the batch candidate is judged
by what it costs on average, read off the learned turnaround distribution
(``Estimate.p_longer``):

* the request waits in the batch until the hedge point (``routing.decide.hedge.should_hedge``:
  slack below the fastest alternative plus ``hedge_margin_s``); with probability
  ``P(late) = P(turnaround + overhead > that point)`` the batch is not back by then, the request
  is hedged, and it costs the line (billed anyway: the wasted line) *plus* the hedge, the
  cheapest non-batch candidate that still meets the deadline from the hedge point;
* so ``expected = batch line + P(late) x hedge``;
* and a hard floor: ``P(late) x P(the hedge misses)`` above ``miss_tolerance`` is never chosen,
  however cheap. ``P(the hedge misses)`` is learned from what hedges did (``hedge_miss_rate``
  over ``HedgeObs``), the prior ``hedge_miss_prior`` until enough are seen; when realtime
  capacity stops catching late batches (rate limits, a hedge storm) it rises and the floor
  closes the batch route to tight deadlines.

A low quantile is then used only when hedging is cheap and safe, because the data say so; a
batch route still on its prior (no curve yet) keeps the quantile rule and its margin.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Literal, NamedTuple

from routing.decide.estimates import EstimateRule, recency_weights
from routing.decide.hedge import batch_turnaround_s, hedge_alternative_s
from routing.decide.options import RouteOptions
from routing.models import Route

if TYPE_CHECKING:  # route.py calls this module: the type only, no import cycle
    from routing.decide.route import Candidate

__all__ = [
    "BatchRisk",
    "HedgeObs",
    "batch_risk",
    "hedge_miss_p",
    "hedge_miss_rate",
    "judge_hedge",
    "learn_hedges",
    "rerank_batches",
]


class HedgeObs(NamedTuple):
    """One hedged request: when its hedge was answered, and whether that met the deadline."""

    at: float
    met: bool


def judge_hedge(
    *,
    outcome: str | None,
    finished_at: float | None,
    deadline: float,
    retryable: bool,
    now: float,
) -> HedgeObs | Literal["wait", "forget"]:
    """What a hedged request's outcome says about its hedge (``routing.store.hedges``).

    Answered by its deadline: met; answered late, expired, failed for want of capacity (a
    retryable error: rate limits, 5xx, out of attempts) or still running past its deadline:
    missed. Cancelled, or failed for a reason no route would have helped (a 400): nothing to
    learn. Still running with its deadline ahead: ``"wait"``. ``outcome`` is a finished
    request's state value (``done``, ``failed``, ...), None while it runs."""
    if not outcome:
        return HedgeObs(deadline, False) if now > deadline else "wait"
    at = now if finished_at is None else finished_at
    if outcome == "done":
        return HedgeObs(at, at <= deadline)
    if outcome == "expired" or (outcome == "failed" and retryable):
        return HedgeObs(at, False)
    return "forget"


class BatchRisk(NamedTuple):
    """What the expected-cost rule found for one batch candidate."""

    p_late: float
    """P(the batch is not back by the hedge point): the request is hedged."""
    p_miss: float
    """P(late) x P(the hedge misses): the chance the request misses its deadline."""
    expected_usd: float
    ok: bool
    """Within ``miss_tolerance`` (the hard floor) and the hedge point is still ahead."""


def batch_risk(
    *,
    batch_usd: float,
    hedge_usd: float,
    p_late: float,
    hedge_miss: float,
    tolerance: float,
    hedge_in_s: float,
) -> BatchRisk:
    """The expected cost of a batch line and whether its miss risk is tolerable.

    ``hedge_in_s`` is how long the request may wait in the batch before it must be hedged; at
    or below 0 it would be hedged at once, so the batch is no route at all."""
    p_late = min(1.0, max(0.0, p_late))
    p_miss = p_late * min(1.0, max(0.0, hedge_miss))
    ok = hedge_in_s > 0 and p_miss <= tolerance
    return BatchRisk(p_late, p_miss, batch_usd + p_late * hedge_usd, ok)


def hedge_miss_rate(
    obs: Sequence[HedgeObs], now: float, *, prior: float, rule: EstimateRule
) -> float:
    """P(a hedge misses), recency-weighted, shrunk towards ``prior`` by ``min_samples`` pseudo
    hedges, so a handful of lucky hedges cannot talk the rule into a risk."""
    if not obs:
        return prior
    weights = recency_weights([o.at for o in obs], now, rule.half_life_s)
    missed = math.fsum(w for o, w in zip(obs, weights, strict=True) if not o.met)
    total = math.fsum(weights)
    k = float(rule.min_samples)
    return (missed + k * prior) / (total + k)


def learn_hedges(
    base: RouteOptions, hedges: Mapping[str, Sequence[HedgeObs]], now: float
) -> RouteOptions:
    """``base`` with ``hedge_miss_p`` learned per "account|model" (the hedged-from batch's
    account) and per "account|*"; called after ``routing.decide.options.learn``."""
    rule = EstimateRule(base.quantile, base.min_samples, base.half_life_s)
    prior = base.hedge_miss_prior
    learned: dict[str, float] = {}
    pooled: dict[str, list[HedgeObs]] = {}
    for key, obs in hedges.items():
        learned[key] = hedge_miss_rate(obs, now, prior=prior, rule=rule)
        pooled.setdefault(key.split("|", 1)[0], []).extend(obs)
    for account, obs in pooled.items():
        learned[f"{account}|*"] = hedge_miss_rate(obs, now, prior=prior, rule=rule)
    return base.model_copy(update={"hedge_miss_p": learned})


def hedge_miss_p(options: RouteOptions, account: str, model: str) -> float:
    """The learned P(a hedge misses) for a batch at ``account`` (the prior until learned)."""
    table = options.hedge_miss_p
    found = table.get(f"{account}|{model}", table.get(f"{account}|*"))
    return options.hedge_miss_prior if found is None else found


def _hedged_at_once(c: Candidate, need: float) -> Candidate:
    """A batch whose hedge point has passed: no route at all, not even the fastest, so a request
    with no time left is never staged only to be hedged at the next poll, again and again."""
    why = f"hedged at once: slack at or below the hedge need {need:.0f}s"
    return c.model_copy(update={"fits": False, "expected_finish_s": math.inf, "why": why})


def rerank_batches(
    candidates: list[Candidate], *, options: RouteOptions, endpoint: str, model: str, slack: float
) -> list[Candidate]:
    """``candidates`` with each batch one judged by expected cost where its estimate has a curve.

    ``fits`` becomes the hard floor and, when it fits, ``expected_cost_usd`` the expected cost
    (so the cheapest-that-fits choice ranks it by what it costs on average). A batch without a curve (the
    prior), without prices, or with no non-batch candidate to hedge to is left as it was."""
    need = hedge_alternative_s(options, endpoint, model) + options.hedge_margin_s
    if slack <= need:  # hedged as soon as it is staged: the batch never answers this request
        return [_hedged_at_once(c, need) if c.route is Route.BATCH else c for c in candidates]
    hedges = [
        c.expected_cost_usd
        for c in candidates
        if c.route is not Route.BATCH
        and c.expected_cost_usd is not None
        and c.expected_finish_s + options.fast_margin_s <= need
    ]
    if not hedges:
        return candidates
    hedge_usd = min(hedges)
    out: list[Candidate] = []
    for c in candidates:
        found = None
        if c.route is Route.BATCH and c.expected_cost_usd is not None:
            found = batch_turnaround_s(options, c.provider, endpoint, model)
        p_late = (
            None if found is None else found[1].p_longer(slack - need - options.batch_overhead_s)
        )
        if p_late is None or c.expected_cost_usd is None:
            out.append(c)
            continue
        risk = batch_risk(
            batch_usd=c.expected_cost_usd,
            hedge_usd=hedge_usd,
            p_late=p_late,
            hedge_miss=hedge_miss_p(options, c.provider, model),
            tolerance=options.miss_tolerance,
            hedge_in_s=slack - need,
        )
        floor = "<=" if risk.p_miss <= options.miss_tolerance else ">"
        why = (
            f"expected cost: line ${c.expected_cost_usd:.6f} + P(late) {risk.p_late:.3f} x hedge "
            f"${hedge_usd:.6f}; P(miss after hedge) {risk.p_miss:.2g} {floor} tolerance "
            f"{options.miss_tolerance:g}; hedged {max(slack - need, 0.0):.0f}s from now"
        )
        out.append(
            c.model_copy(
                update={
                    # refused: its price stays the line's, as for any candidate that does not fit
                    "expected_cost_usd": risk.expected_usd if risk.ok else c.expected_cost_usd,
                    "fits": risk.ok,
                    "margin_s": need,
                    "why": why,
                }
            )
        )
    return out
