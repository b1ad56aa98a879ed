"""The retry policy as tables: exact waits with jitter off, bounds with it on."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from email.utils import format_datetime

import pytest
from pydantic import ValidationError

from routing.decide.backoff import RetryPolicy, backoff_s, next_delay_s, parse_retry_after
from routing.errors import InvalidRequest, ProviderError, ProviderTimeout, RateLimited

EXACT = RetryPolicy(max_tries=10, base_s=0.5, cap_s=30.0, jitter=0.0)


class _Ones(random.Random):
    """A random source stuck at its top, so jitter takes its largest effect."""

    def random(self) -> float:
        return 1.0


@pytest.mark.parametrize(
    ("attempt", "expected"),
    [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (6, 16.0), (7, 30.0), (50, 30.0), (10_000, 30.0)],
)
def test_backoff_is_exponential_and_capped(attempt: int, expected: float) -> None:
    assert backoff_s(attempt, EXACT) == expected


@pytest.mark.parametrize(
    ("policy", "attempt", "low", "high"),
    [
        (RetryPolicy(jitter=0.2), 1, 0.4, 0.5),
        (RetryPolicy(jitter=0.2), 3, 1.6, 2.0),
        (RetryPolicy(jitter=1.0), 3, 0.0, 2.0),
        (RetryPolicy(jitter=0.5, cap_s=3.0), 9, 1.5, 3.0),
        (RetryPolicy(jitter=0.0, multiplier=3.0), 3, 4.5, 4.5),
    ],
)
def test_jitter_stays_within_its_fraction(
    policy: RetryPolicy, attempt: int, low: float, high: float
) -> None:
    rng = random.Random(7)
    waits = [backoff_s(attempt, policy, rng) for _ in range(500)]
    assert all(low <= w <= high for w in waits)
    if low < high:
        assert max(waits) - min(waits) > (high - low) / 2


def test_seeded_rng_is_reproducible() -> None:
    policy = RetryPolicy()
    first = [backoff_s(a, policy, random.Random(3)) for a in range(1, 6)]
    again = [backoff_s(a, policy, random.Random(3)) for a in range(1, 6)]
    assert first == again


def _retryable(retry_after_s: float | None = None) -> ProviderError:
    return ProviderError("boom", status_code=503, retryable=True, retry_after_s=retry_after_s)


@pytest.mark.parametrize(
    ("error", "attempt", "policy", "expected"),
    [
        (ProviderError("bad", status_code=400, retryable=False), 1, EXACT, None),
        (InvalidRequest("bad", field="body"), 1, EXACT, None),
        (_retryable(), 1, EXACT, 0.5),
        (_retryable(), 3, EXACT, 2.0),
        (ProviderTimeout("slow", retryable=True), 2, EXACT, 1.0),
        (_retryable(), 3, RetryPolicy(max_tries=4, jitter=0.0), 2.0),
        (_retryable(), 4, RetryPolicy(max_tries=4, jitter=0.0), None),
        (_retryable(), 9, RetryPolicy(max_tries=4, jitter=0.0), None),
        (_retryable(), 1, RetryPolicy(max_tries=1, jitter=0.0), None),
        # retry-after is a floor over the exponential wait ...
        (RateLimited("slow down", retryable=True, retry_after_s=7.0), 1, EXACT, 7.0),
        # ... which wins when it is longer ...
        (RateLimited("slow down", retryable=True, retry_after_s=0.1), 3, EXACT, 2.0),
        # ... and is capped like any wait.
        (RateLimited("slow down", retryable=True, retry_after_s=600.0), 1, EXACT, 30.0),
        (_retryable(retry_after_s=5.0), 1, EXACT, 5.0),
        (RateLimited("429", retryable=False, retry_after_s=5.0), 1, EXACT, None),
        (RateLimited("429", retryable=True, retry_after_s=float("nan")), 1, EXACT, 0.5),
    ],
)
def test_next_delay_table(
    error: ProviderError, attempt: int, policy: RetryPolicy, expected: float | None
) -> None:
    assert next_delay_s(error, attempt, policy) == expected


@pytest.mark.parametrize("retry_after_s", [0.2, 3.0, 12.5, 29.0])
def test_retry_after_floor_holds_with_jitter(retry_after_s: float) -> None:
    policy = RetryPolicy(jitter=0.5)
    error = RateLimited("429", retryable=True, retry_after_s=retry_after_s)
    rng = random.Random(11)
    for attempt in (1, 2, 3):
        delay = next_delay_s(error, attempt, policy, rng)
        assert delay is not None
        assert retry_after_s <= delay <= policy.cap_s


def test_jitter_never_pushes_past_cap() -> None:
    policy = RetryPolicy(jitter=1.0, cap_s=10.0)
    error = RateLimited("429", retryable=True, retry_after_s=9.0)
    assert next_delay_s(error, 1, policy, _Ones()) == 10.0


@pytest.mark.parametrize("attempt", [0, -1])
def test_attempt_is_one_based(attempt: int) -> None:
    with pytest.raises(ValueError, match="1-based"):
        backoff_s(attempt, EXACT)
    with pytest.raises(ValueError, match="1-based"):
        next_delay_s(_retryable(), attempt, EXACT)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_tries": 0},
        {"base_s": 0},
        {"cap_s": -1},
        {"jitter": 1.5},
        {"jitter": -0.1},
        {"multiplier": 0.5},
        {"base_s": 5, "cap_s": 1},
        {"tries": 3},
    ],
)
def test_policy_rejects_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValidationError):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_policy_is_frozen_and_comparable() -> None:
    policy = RetryPolicy()
    with pytest.raises(ValidationError):
        policy.max_tries = 9
    assert policy == RetryPolicy()
    assert policy != RetryPolicy(max_tries=5)


NOW = datetime(2026, 5, 9, 12, 0, 0, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        ("   ", None),
        ("0", 0.0),
        ("7", 7.0),
        (" 120 ", 120.0),
        ("1.5", 1.5),
        ("-3", None),
        ("nan", None),
        ("inf", None),
        ("soon", None),
        ("Sat, 09 May 2026 12:00:30 GMT", 30.0),
        ("Sat, 09 May 2026 11:59:00 GMT", 0.0),
        (format_datetime(datetime(2026, 5, 9, 12, 2, tzinfo=UTC), usegmt=True), 120.0),
        ("Sat, 09 May 2026 12:00:10", 10.0),
        ("Sat, 32 Foo 2026 12:00:10 GMT", None),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, NOW) == expected
