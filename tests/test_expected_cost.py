"""The batch route by expected cost (routing.decide.expected): the learned turnaround curve, the
expected cost of a batch line with its hedge, the hard miss floor, and hedge-miss learning.
Pure, no Redis: the same ``decide`` the aggregator and the planner simulation call."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import pytest

from routing.decide.cost import parse_prices
from routing.decide.estimates import (
    EstimateRule,
    LatencyObs,
    Observations,
    TurnaroundObs,
    latency_estimate,
    survival_curve,
    turnaround_estimate,
    weighted_quantile,
)
from routing.decide.expected import (
    HedgeObs,
    batch_risk,
    hedge_miss_p,
    hedge_miss_rate,
    learn_hedges,
)
from routing.decide.lanes import parse_lanes
from routing.decide.options import RouteOptions, learn
from routing.decide.route import Decision, decide, request_costs
from routing.models import Request, Route, ServiceConfig, prepare

ROOT = Path(__file__).resolve().parent.parent
NOW = 1_000_000.0
CHAT = "/v1/chat/completions"
MODEL = "gpt-4o-mini"
PRICES = parse_prices((ROOT / "config" / "prices.toml").read_text(), source="prices.toml")
CONFIG = ServiceConfig(lanes=parse_lanes((ROOT / "config" / "lanes.toml").read_text()))
#: 100 finished batches, 10 to 50 minutes evenly: p95 = 48 min, median 30 min
TURNAROUNDS = [600.0 + 24.0 * k for k in range(100)]


def base(**kw: Any) -> RouteOptions:
    return RouteOptions(
        **{
            "batch_turnaround_s": {"openai": 7200.0},
            "prices": PRICES,
            "batch_overhead_s": 0.0,
            **kw,
        }
    )


def learned(**kw: Any) -> RouteOptions:
    seen = Observations(
        batch={f"openai|{CHAT}|{MODEL}": [TurnaroundObs(NOW, s, 100) for s in TURNAROUNDS]}
    )
    return learn(base(**kw), seen, NOW)


def choose(options: RouteOptions, slack_s: float) -> Decision:
    body = {"model": MODEL, "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}
    req = prepare(Request(lane="standard", endpoint=CHAT, body=body), CONFIG, NOW)
    costs, _ = request_costs(req, options)
    return decide(
        endpoint=CHAT, model=MODEL, deadline=NOW + slack_s, now=NOW, options=options, costs=costs
    )


def test_the_curve_is_the_estimators_own() -> None:
    """P(T > the p-quantile) <= 1 - p at every quantile: one Kaplan-Meier, read two ways."""
    values = [float(v) for v in range(1, 201)]
    censored = [v % 7 == 0 or v > 190 for v in range(1, 201)]
    weights = [1.0] * 200
    curve = survival_curve(values, weights, censored)
    assert all(a[1] >= b[1] for a, b in itertools.pairwise(curve)), "monotone"
    est = turnaround_estimate(
        [TurnaroundObs(NOW, v, 1, c) for v, c in zip(values, censored, strict=True)],
        NOW,
        prior_s=1.0,
        rule=EstimateRule(half_life_s=1e12),
    )
    for q in (0.5, 0.8, 0.9):
        at = weighted_quantile(values, weights, q, censored)
        assert at is not None
        assert est.p_longer(at) == pytest.approx(1 - q, abs=0.02)
    assert est.p_longer(0.5) == 1.0
    assert est.p_longer(1e9) == pytest.approx(curve[-1][1]) and curve[-1][1] > 0.03, (
        "an all-censored tail still counts as late"
    )


def test_a_prior_has_no_curve_and_keeps_the_quantile_rule() -> None:
    """Before enough batches are seen nothing changes: p95 + margin, as the static rule did."""
    opts = base()
    assert opts.batch_estimates == {}
    assert choose(opts, 3000).route is Route.REALTIME
    assert choose(opts, 7200 + 700).route is Route.BATCH


def test_slack_between_median_and_p95_goes_to_a_batch_by_expected_cost() -> None:
    """50 min of slack: p95 (48 min) + the 10 min margin does not fit, so the quantile rule paid
    realtime; by expected cost the batch is late ~6 % of the time and a hedge catches that."""
    opts = learned()
    d = choose(opts, 3000)
    assert d.route is Route.BATCH, d.reason
    batch = next(c for c in d.candidates if c.route is Route.BATCH)
    rt = next(c for c in d.candidates if c.route is Route.REALTIME)
    assert batch.expected_cost_usd is not None and rt.expected_cost_usd is not None
    line = rt.expected_cost_usd / 2
    p_late = opts.batch_estimates[f"openai|{CHAT}|{MODEL}"].p_longer(3000 - 150)
    assert p_late is not None and 0 < p_late < 0.1
    assert batch.expected_cost_usd == pytest.approx(line + p_late * rt.expected_cost_usd)
    assert "P(late)" in batch.why and "tolerance" in batch.why


def test_the_floor_refuses_a_batch_whose_hedges_miss() -> None:
    """Hedges that stopped meeting deadlines (a rate-limited realtime, a hedge storm) close the
    batch route to the same request, however cheap it is on average."""
    hedges = {f"openai|{MODEL}": [HedgeObs(NOW - k, met=k % 2 == 0) for k in range(200)]}
    opts = learn_hedges(learned(), hedges, NOW)
    assert hedge_miss_p(opts, "openai", MODEL) > 0.4
    d = choose(opts, 3000)
    assert d.route is Route.REALTIME
    batch = next(c for c in d.candidates if c.route is Route.BATCH)
    assert not batch.fits and "> tolerance" in batch.why
    # with a day of slack the batch is never late, so its hedges do not matter
    assert choose(opts, 86400).route is Route.BATCH


def test_a_batch_late_more_often_than_it_saves_goes_realtime() -> None:
    """25 min of slack: the batch is late ~70 % of the time; line + 0.7 x realtime > realtime."""
    d = choose(learned(miss_tolerance=0.01), 25 * 60)
    assert d.route is Route.REALTIME
    batch = next(c for c in d.candidates if c.route is Route.BATCH)
    assert batch.fits and batch.expected_cost_usd is not None
    rt = next(c for c in d.candidates if c.route is Route.REALTIME)
    assert rt.expected_cost_usd is not None and batch.expected_cost_usd > rt.expected_cost_usd


def test_no_batch_when_the_hedge_point_has_passed() -> None:
    risk = batch_risk(
        batch_usd=1.0, hedge_usd=2.0, p_late=0.0, hedge_miss=0.0, tolerance=1.0, hedge_in_s=0.0
    )
    assert not risk.ok
    assert choose(learned(), 100).route is Route.REALTIME


def test_hedge_miss_rate_starts_at_the_prior_and_follows_the_data() -> None:
    rule = EstimateRule()
    assert hedge_miss_rate([], NOW, prior=0.002, rule=rule) == 0.002
    met = [HedgeObs(NOW, True)] * 1000
    assert hedge_miss_rate(met, NOW, prior=0.002, rule=rule) < 0.0001
    missed = [HedgeObs(NOW, False)] * 3
    few = hedge_miss_rate(missed, NOW, prior=0.002, rule=rule)
    assert 0.002 < few < 1.0 and math.isclose(few, (3 + 5 * 0.002) / 8)
    opts = learn_hedges(base(), {"openai|x": missed}, NOW)
    assert hedge_miss_p(opts, "openai", "other-model") == opts.hedge_miss_p["openai|*"]
    assert hedge_miss_p(opts, "anthropic", MODEL) == opts.hedge_miss_prior


def test_a_request_with_no_time_left_is_never_staged_to_be_hedged_again() -> None:
    """Realtime queued behind its rate limit for an hour: nothing fits a 100 s deadline. The
    fastest is then realtime, never a batch the request would be hedged from at the next poll
    (staged, hedged, staged again: a loop the rate-limited simulation showed)."""
    opts = learned(realtime_wait_s={f"openai|{MODEL}": 3600.0})
    d = choose(opts, 100)
    assert d.route is Route.REALTIME, d.reason
    batch = next(c for c in d.candidates if c.route is Route.BATCH)
    assert math.isinf(batch.expected_finish_s) and "hedged at once" in batch.why
    prior = choose(base(realtime_wait_s={f"openai|{MODEL}": 9000.0}), 100)
    assert prior.route is Route.REALTIME, "on the prior too"


# -- a young latency sample is truncated ---------------------------------------------------------

#: flex calls dispatched from NOW - 60, recorded as they end: only those faster than their age
FIRST_FLEX = [
    LatencyObs(NOW - 60.0 + 8.0 * k + s, s)
    for k, s in enumerate((20.0, 31.0, 25.0, 38.0, 22.0, 27.0))
]


def test_a_young_latency_sample_does_not_replace_the_prior() -> None:
    """Calls slower than the sample's age are still running: a minute after flex's first calls,
    its answers (20-38 s) say nothing of its minute-long median, so its prior (600 s) stands and
    a one-minute deadline does not go to flex."""
    est = latency_estimate(FIRST_FLEX, NOW, prior_s=600.0)
    assert est.source == "prior" and est.seconds == 600.0 and est.n == 6
    assert "too recent" in est.describe()
    seen = Observations(realtime={f"openai@flex|{MODEL}": FIRST_FLEX})
    options = learn(base(flex_models={"openai": frozenset({MODEL})}), seen, NOW)
    d = choose(options, 60.0)
    flex = next(c for c in d.candidates if c.route is Route.FLEX)
    assert not flex.fits and d.route is Route.REALTIME


def test_an_old_enough_latency_sample_is_learned_and_a_slow_young_one_is_a_lower_bound() -> None:
    old = [LatencyObs(NOW - 300.0 + k, s) for k, s in enumerate((20.0, 31.0, 25.0, 38.0, 22.0))]
    est = latency_estimate(old, NOW, prior_s=600.0)
    assert (est.source, est.seconds, est.lower_bound) == ("observed", 38.0, False)
    slow = [LatencyObs(NOW, 50.0 + k) for k in range(5)]  # above the 30 s prior, all just ended
    est = latency_estimate(slow, NOW, prior_s=30.0)
    assert (est.source, est.seconds, est.lower_bound) == ("observed", 54.0, True)
