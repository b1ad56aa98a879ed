"""The one retry policy of mixbatch: how long to wait before trying a failed step again.

Everything that retries (realtime calls, batch polls, lane requeues) asks ``next_delay_s``
rather than growing its own loop, so backoff is tuned in one place. The functions are pure:
the random source and the current time are arguments, so tests pin them exactly.

The rules, in order:

1. An error that is not ``retryable`` is never retried (``None``).
2. ``max_tries`` counts every try, the first included: after try ``max_tries`` fails, ``None``.
3. The wait grows exponentially, ``base_s * multiplier ** (attempt - 1)``, capped at ``cap_s``,
   and ``jitter`` of it is randomised so workers that failed together do not retry together.
4. A provider's ``Retry-After`` (``error.retry_after_s``) is a floor: retrying earlier only earns
   another 429. The floor is spread upwards by ``jitter`` for the same herd reason.
5. No single wait exceeds ``cap_s``, not even one a provider asked for: a worker should not sit
   idle for minutes. If the provider still refuses, that costs one more try, and a step that
   needs a long pause belongs in the lane (requeue with a delay), not in a sleeping worker.
"""

from __future__ import annotations

import math
import random
from datetime import UTC
from email.utils import parsedate_to_datetime

from pydantic import BaseModel, ConfigDict, Field, model_validator

from routing.errors import MixbatchError

__all__ = ["DEFAULT_POLICY", "RetryPolicy", "backoff_s", "next_delay_s", "parse_retry_after"]

_MAX_EXPONENT = 64


class RetryPolicy(BaseModel):
    """How many tries, and how far apart. Frozen, so one instance can be shared and compared.

    ``jitter`` is the randomised fraction of each wait: 0 gives exact exponential waits, 1 gives
    "full jitter" (uniform between 0 and the exponential wait), the default 0.2 keeps waits
    between 80 % and 100 % of it.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_tries: int = Field(default=4, ge=1)
    base_s: float = Field(default=0.5, gt=0)
    cap_s: float = Field(default=30.0, gt=0)
    multiplier: float = Field(default=2.0, ge=1)
    jitter: float = Field(default=0.2, ge=0, le=1)

    @model_validator(mode="after")
    def _cap_above_base(self) -> RetryPolicy:
        if self.cap_s < self.base_s:
            raise ValueError(f"cap_s ({self.cap_s}) must be at least base_s ({self.base_s})")
        return self


DEFAULT_POLICY = RetryPolicy()


def _uniform(rng: random.Random | None) -> float:
    return rng.random() if rng is not None else random.random()


def backoff_s(attempt: int, policy: RetryPolicy, rng: random.Random | None = None) -> float:
    """Seconds to wait after failed try number ``attempt`` (1-based), jitter applied.

    The result lies in ``[w * (1 - jitter), w]`` where ``w = min(cap_s, base_s * m**(attempt-1))``.
    Jitter only shortens, so ``cap_s`` stays a true ceiling.
    """
    if attempt < 1:
        raise ValueError(f"attempt is 1-based, got {attempt}")
    exponent = min(attempt - 1, _MAX_EXPONENT)
    wait = min(policy.cap_s, policy.base_s * policy.multiplier**exponent)
    return wait * (1.0 - policy.jitter * _uniform(rng))


def next_delay_s(
    error: MixbatchError,
    attempt: int,
    policy: RetryPolicy = DEFAULT_POLICY,
    rng: random.Random | None = None,
) -> float | None:
    """Seconds to wait before the next try after ``error`` ended try ``attempt``, or None to stop.

    None means: the error is not retryable, or ``attempt`` was the last of ``max_tries``.
    """
    if attempt < 1:
        raise ValueError(f"attempt is 1-based, got {attempt}")
    if not error.retryable or attempt >= policy.max_tries:
        return None
    delay = backoff_s(attempt, policy, rng)
    retry_after = getattr(error, "retry_after_s", None)
    if isinstance(retry_after, int | float) and math.isfinite(retry_after) and retry_after > 0:
        floor = retry_after * (1.0 + policy.jitter * _uniform(rng))
        delay = max(delay, floor)
    return min(delay, policy.cap_s)


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP-date.

    ``now`` is unix time, needed for the date form. A date in the past gives 0.0; a missing,
    negative or unparseable value gives None, so the caller falls back to plain backoff.
    Fractional seconds are accepted because some OpenAI-compatible servers send them.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now)
