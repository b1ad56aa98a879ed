"""The estimates of the learned route choice, as tables: quantiles, priors, recency, censoring,
batch size, the GPU and rate-limit headers. Pure functions, so every case is one row."""

from __future__ import annotations

import math

import pytest

from routing.decide.estimates import (
    Estimate,
    EstimateRule,
    GpuObs,
    LatencyObs,
    QuantileError,
    TurnaroundObs,
    check_quantile,
    gpu_estimate,
    latency_estimate,
    recency_weights,
    turnaround_estimate,
    weighted_quantile,
)
from routing.decide.ratelimit import Headroom, parse_rate_limit, rate_limit_wait_s
from routing.errors import ConfigError

NOW = 1_000_000.0
H = 3600.0


def fresh(*seconds: float, size: int = 100, ago: float = 0.0) -> list[TurnaroundObs]:
    """Finished batches that ended ``ago`` seconds before NOW."""
    return [TurnaroundObs(NOW - ago, s, size) for s in seconds]


# -- quantiles -------------------------------------------------------------------------------


@pytest.mark.parametrize("q", [0.01, 0.5, 0.95, 0.999])
def test_check_quantile_accepts_open_interval(q: float) -> None:
    assert check_quantile(q) == q


@pytest.mark.parametrize("q", [0, 1, 0.0, 1.0, -0.1, 1.5, math.nan, True, "0.9", None])
def test_check_quantile_refuses_outside_zero_one(q: object) -> None:
    with pytest.raises(QuantileError, match=r"between 0 and 1") as info:
        check_quantile(q, "MIXBATCH_ROUTE_QUANTILE")  # type: ignore[arg-type]
    assert "MIXBATCH_ROUTE_QUANTILE" in str(info.value)
    assert isinstance(info.value, ConfigError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("values", "weights", "q", "censored", "expected"),
    [
        ([1, 2, 3, 4], [1, 1, 1, 1], 0.5, None, 2),
        ([1, 2, 3, 4], [1, 1, 1, 1], 0.75, None, 3),
        ([1, 2, 3, 4], [1, 1, 1, 1], 0.95, None, 4),
        ([4, 3, 2, 1], [1, 1, 1, 1], 0.5, None, 2),  # order does not matter
        ([1, 2, 3, 4], [1, 1, 1, 10], 0.5, None, 4),  # a heavy value pulls the quantile
        ([1, 2, 3, 4], [10, 1, 1, 1], 0.5, None, 1),
        ([1, 2, 3, 4], [0, 0, 1, 1], 0.5, None, 3),  # zero weight: ignored
        ([], [], 0.5, None, None),
        ([5], [1], 0.99, None, 5),
        # censoring: a value known only as "longer than" lifts the curve above it
        ([1, 2, 3, 4], [1, 1, 1, 1], 0.5, [False, True, False, False], 3),
        # the whole tail censored: the quantile is beyond what finished
        ([1, 2, 10, 10], [1, 1, 1, 1], 0.9, [False, False, True, True], None),
        # a censoring at a tie counts after the event, as Kaplan-Meier does
        ([2, 2, 3], [1, 1, 1], 0.3, [True, False, False], 2),
        ([2, 2, 3], [1, 1, 1], 0.4, [True, False, False], 3),
    ],
)
def test_weighted_quantile(
    values: list[float],
    weights: list[float],
    q: float,
    censored: list[bool] | None,
    expected: float | None,
) -> None:
    assert weighted_quantile(values, weights, q, censored) == expected


def test_weighted_quantile_lengths_must_match() -> None:
    with pytest.raises(ValueError, match="same length"):
        weighted_quantile([1, 2], [1], 0.5)


@pytest.mark.parametrize(
    ("age", "half_life", "weight"),
    [(0, 3600, 1.0), (3600, 3600, 0.5), (7200, 3600, 0.25), (-60, 3600, 1.0), (60, 60, 0.5)],
)
def test_recency_weights_halve_every_half_life(age: float, half_life: float, weight: float) -> None:
    assert recency_weights([NOW - age], NOW, half_life)[0] == pytest.approx(weight)


# -- turnaround --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("obs", "min_samples", "source", "seconds"),
    [
        ([], 5, "prior", 7200.0),  # nothing seen (a fresh or flushed store): the prior
        (fresh(30, 40, 50, 60), 5, "prior", 7200.0),  # 4 of 5: still the prior
        (fresh(30, 40, 50, 60, 70), 5, "observed", 70.0),  # enough: the p95 of what was seen
        (fresh(*range(10, 210, 10)), 5, "observed", 190.0),  # p95 of 20 is the 19th
        (fresh(30, 40, 50, 60, 70), 1, "observed", 70.0),
    ],
)
def test_turnaround_falls_back_to_the_prior_until_enough_is_seen(
    obs: list[TurnaroundObs], min_samples: int, source: str, seconds: float
) -> None:
    est = turnaround_estimate(obs, NOW, prior_s=7200.0, rule=EstimateRule(min_samples=min_samples))
    assert (est.source, est.seconds) == (source, seconds)
    assert est.needed == min_samples and est.n == len(obs)


@pytest.mark.parametrize(("q", "seconds"), [(0.5, 50.0), (0.8, 80.0), (0.95, 100.0), (0.1, 10.0)])
def test_turnaround_reads_the_configured_quantile(q: float, seconds: float) -> None:
    obs = fresh(*range(10, 110, 10))
    assert (
        turnaround_estimate(obs, NOW, prior_s=1.0, rule=EstimateRule(quantile=q)).seconds == seconds
    )


@pytest.mark.parametrize("q", [0.0, 1.0, 1.2, -1.0])
def test_turnaround_refuses_a_quantile_outside_zero_one(q: float) -> None:
    with pytest.raises(QuantileError):
        turnaround_estimate(fresh(1, 2, 3, 4, 5), NOW, prior_s=1.0, rule=EstimateRule(quantile=q))


def test_recent_batches_weigh_more_than_old_ones() -> None:
    """Twenty slow batches a day ago, ten fast ones now: the estimate follows today."""
    old = [TurnaroundObs(NOW - 24 * H, 5 * H, 100) for _ in range(20)]
    new = fresh(*[60.0] * 10)
    est = turnaround_estimate(old + new, NOW, prior_s=1.0, rule=EstimateRule(half_life_s=2 * H))
    assert est.seconds == 60.0
    flat = turnaround_estimate(old + new, NOW, prior_s=1.0, rule=EstimateRule(half_life_s=1e9))
    assert flat.seconds == 5 * H, "without decay the old batches would dominate"


def test_expired_batches_make_the_quantile_a_lower_bound() -> None:
    """Half the batches expired at 24 h: the p95 is at least a day, not the fast half's p95."""
    finished = fresh(60, 70, 80, 90, 100)
    expired = [TurnaroundObs(NOW, 24 * H, 100, True) for _ in range(5)]
    est = turnaround_estimate(
        finished + expired, NOW, prior_s=1.0, rule=EstimateRule(half_life_s=1e9)
    )
    assert est.lower_bound and est.seconds == 24 * H
    assert "at least" in est.describe()
    # weighed by creation, a batch created a day ago says little about today's provider
    today = turnaround_estimate(
        finished + expired, NOW, prior_s=1.0, rule=EstimateRule(half_life_s=2 * H)
    )
    assert today.seconds == 100.0


def test_a_batch_still_running_pushes_the_estimate_up() -> None:
    """Finished batches took a minute, but two recent ones have run for 3 hours already."""
    finished = fresh(*[60.0] * 8, ago=30 * 60)
    running = [TurnaroundObs(NOW, 3 * H, 100, True) for _ in range(2)]
    alone = turnaround_estimate(finished, NOW, prior_s=1.0)
    seen = turnaround_estimate(finished, NOW, prior_s=1.0, inflight=running)
    assert alone.seconds == 60.0
    assert seen.seconds >= 3 * H
    assert seen.n == 8, "running batches are evidence, not samples"


def test_a_batch_stuck_long_ago_fades() -> None:
    """One batch created a day ago is still running; today's batches are fast."""
    finished = fresh(*[60.0] * 40, ago=600)
    stuck = [TurnaroundObs(NOW, 23 * H, 100, True)]
    est = turnaround_estimate(
        finished, NOW, prior_s=1.0, inflight=stuck, rule=EstimateRule(half_life_s=2 * H)
    )
    assert est.seconds == 60.0


@pytest.mark.parametrize(("size", "longer"), [(10, False), (1000, True), (None, None)])
def test_batch_size_is_taken_into_account(size: int | None, longer: bool | None) -> None:
    """Turnaround grows with size (t = 10 s * size^0.5 here): the fit extrapolates."""
    obs = [
        TurnaroundObs(NOW, 10.0 * n**0.5, n) for n in (10, 20, 50, 100, 200, 500) for _ in (1, 2)
    ]
    est = turnaround_estimate(obs, NOW, prior_s=1.0, rule=EstimateRule(quantile=0.5))
    assert est.size_exponent == pytest.approx(0.5, abs=0.01)
    at = est.at_size(size)
    if longer is None:
        assert at == est.seconds
    elif longer:
        assert at == pytest.approx(10.0 * 1000**0.5, rel=0.3)
    else:
        assert at == pytest.approx(10.0 * 10**0.5, rel=0.3)


def test_no_size_effect_when_sizes_hardly_vary() -> None:
    obs = [TurnaroundObs(NOW, 60.0 + i, 100 + i) for i in range(20)]
    est = turnaround_estimate(obs, NOW, prior_s=1.0)
    assert est.size_exponent == 0.0 and est.at_size(100_000) == est.seconds


@pytest.mark.parametrize(
    ("est", "text"),
    [
        (Estimate(seconds=1, quantile=0.95, source="prior", n=2, needed=5), "prior (2 of 5"),
        (Estimate(seconds=1, quantile=0.95, source="observed", n=37), "observed p95 of 37"),
        (Estimate(seconds=1, quantile=0.9, source="observed", n=5), "observed p90 of 5"),
    ],
)
def test_estimates_describe_themselves(est: Estimate, text: str) -> None:
    assert text in est.describe()


# -- realtime latency --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("latencies", "source", "seconds"),
    [
        ([], "prior", 30.0),
        ([0.5, 0.6, 0.7, 0.8], "prior", 30.0),
        ([0.5, 0.6, 0.7, 0.8, 9.0], "observed", 9.0),
        ([1.0] * 19 + [50.0], "observed", 1.0),
        ([1.0] * 18 + [50.0, 50.0], "observed", 50.0),
    ],
)
def test_latency_estimate(latencies: list[float], source: str, seconds: float) -> None:
    obs = [LatencyObs(NOW - 60.0, s) for s in latencies]  # a minute old: not a young sample
    est = latency_estimate(obs, NOW, prior_s=30.0)
    assert (est.source, est.seconds) == (source, seconds)


# -- the GPU -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reports", "wait", "rate", "stale", "source"),
    [
        ([], 2.0, 50.0, False, "prior"),  # never reported: priors (a worker may be starting)
        ([GpuObs(NOW - 5, 400.0, 0.3)], 0.3, 400.0, False, "observed"),
        ([GpuObs(NOW - 5, None, 0.3)], 0.3, 50.0, False, "observed"),  # throughput not yet known
        ([GpuObs(NOW - 3600, 400.0, 0.3)], 0.3, 400.0, True, "observed"),  # reports stopped
        (
            [GpuObs(NOW - i, 100.0 + i, float(i)) for i in range(20)],
            18.0,
            100.0,
            False,
            "observed",
        ),
    ],
)
def test_gpu_estimate(
    reports: list[GpuObs], wait: float, rate: float, stale: bool, source: str
) -> None:
    est = gpu_estimate("m", reports, NOW, prior_wait_s=2.0, prior_texts_per_s=50.0, max_age_s=900.0)
    assert (est.wait_s, est.texts_per_s, est.stale, est.source) == (wait, rate, stale, source)
    assert est.finish_s == pytest.approx(wait + 1.0 / rate)
    assert est.usd_per_request(3600.0) == pytest.approx(1.0 / rate)


# -- rate-limit headers -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "limited", "remaining", "wait"),
    [
        ({}, False, None, None),
        ({"content-type": "application/json"}, False, None, None),
        (
            {
                "x-ratelimit-limit-requests": "10000",
                "x-ratelimit-remaining-requests": "9999",
                "x-ratelimit-reset-requests": "6ms",
            },
            False,
            9999,
            0.0,
        ),
        (
            {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1m30s"},
            False,
            0,
            90.0,
        ),
        (
            {"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "2.5s"},
            False,
            None,
            2.5,
        ),
        (
            {
                "anthropic-ratelimit-requests-remaining": "0",
                "anthropic-ratelimit-requests-limit": "50",
                "anthropic-ratelimit-requests-reset": "1970-01-12T13:56:40Z",  # NOW + 600 s
            },
            False,
            0,
            600.0,
        ),
        ({"retry-after": "7"}, True, 0, 7.0),  # a 429
        ({"retry-after-ms": "1500"}, True, 0, 1.5),
        ({"Retry-After": "3"}, True, 0, 3.0),  # names are case-insensitive
        ({}, True, 0, 0.0),
        ({"x-ratelimit-reset-requests": "soon"}, False, None, None),  # unparseable: ignored
        ({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "?"}, False, 0, 0.0),
    ],
)
def test_parse_rate_limit(
    headers: dict[str, str], limited: bool, remaining: int | None, wait: float | None
) -> None:
    got = parse_rate_limit(headers, NOW, limited=limited)
    if wait is None:
        assert got is None
        return
    assert got is not None
    assert got.remaining_requests == remaining
    assert rate_limit_wait_s(got, NOW) == pytest.approx(wait)


@pytest.mark.parametrize(
    ("headroom", "now", "wait"),
    [
        (None, NOW, 0.0),
        (Headroom(at=NOW, remaining_requests=5), NOW, 0.0),
        (Headroom(at=NOW, remaining_requests=0, reset_at=NOW + 10), NOW, 10.0),
        (Headroom(at=NOW, remaining_requests=0, reset_at=NOW + 10), NOW + 20, 0.0),  # reset
    ],
)
def test_rate_limit_wait(headroom: Headroom | None, now: float, wait: float) -> None:
    assert rate_limit_wait_s(headroom, now) == wait
