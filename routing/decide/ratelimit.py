"""A provider's rate-limit headroom, read from its replies' headers. Pure; no I/O.

OpenAI sends ``x-ratelimit-{remaining,limit,reset}-{requests,tokens}``, Anthropic
``anthropic-ratelimit-{requests,tokens}-{remaining,limit,reset}``, and a 429 carries
``retry-after`` (or ``retry-after-ms``). With nothing left until a reset, a realtime call waits
for the reset first, so the route choice adds that wait to the realtime route's finish.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime

from pydantic import BaseModel, ConfigDict

from routing.decide.backoff import parse_retry_after

__all__ = ["Headroom", "parse_rate_limit", "rate_limit_wait_s"]


class Headroom(BaseModel):
    """A provider's rate-limit state for one (account, model), from its last reply's headers."""

    model_config = ConfigDict(frozen=True)

    at: float
    remaining_requests: int | None = None
    limit_requests: int | None = None
    remaining_tokens: int | None = None
    limit_tokens: int | None = None
    reset_at: float | None = None
    """When the exhausted limit (or a 429's ``retry-after``) ends; None when nothing is exhausted."""


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def _reset_seconds(text: str | None, now: float) -> float | None:
    """OpenAI's ``6m0s``/``20ms``/``1.5s``, an RFC 3339 time, or what ``Retry-After`` takes."""
    if not text:
        return None
    text = text.strip()
    seconds = parse_retry_after(text, now)
    if seconds is not None:
        return seconds
    parts = _DURATION_PART.findall(text)
    if parts and "".join(n + u for n, u in parts) == text:
        return sum(float(n) * _UNIT_S[u] for n, u in parts)
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - now)


def _int(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(float(text))
    except ValueError:
        return None


def parse_rate_limit(
    headers: Mapping[str, str], now: float, *, limited: bool = False
) -> Headroom | None:
    """Headroom from a reply's rate-limit headers (names lower-cased); None when there are none.

    ``limited`` says the reply was a 429: whatever the headers say, nothing is left until
    ``retry-after`` (or the reported reset).
    """
    h = {k.lower(): v for k, v in headers.items()}

    def pick(*names: str) -> str | None:
        return next((h[n] for n in names if n in h), None)

    rem_req = _int(pick("x-ratelimit-remaining-requests", "anthropic-ratelimit-requests-remaining"))
    lim_req = _int(pick("x-ratelimit-limit-requests", "anthropic-ratelimit-requests-limit"))
    rem_tok = _int(pick("x-ratelimit-remaining-tokens", "anthropic-ratelimit-tokens-remaining"))
    lim_tok = _int(pick("x-ratelimit-limit-tokens", "anthropic-ratelimit-tokens-limit"))
    reset_req = _reset_seconds(
        pick("x-ratelimit-reset-requests", "anthropic-ratelimit-requests-reset"), now
    )
    reset_tok = _reset_seconds(
        pick("x-ratelimit-reset-tokens", "anthropic-ratelimit-tokens-reset"), now
    )
    retry_ms = _reset_seconds(h.get("retry-after-ms"), now)
    retry = retry_ms / 1000.0 if retry_ms is not None else _reset_seconds(h.get("retry-after"), now)
    if (
        all(v is None for v in (rem_req, lim_req, rem_tok, lim_tok, reset_req, reset_tok, retry))
        and not limited
    ):
        return None
    waits: list[float] = []
    if rem_req == 0 and reset_req is not None:
        waits.append(reset_req)
    if rem_tok == 0 and reset_tok is not None:
        waits.append(reset_tok)
    if limited:
        rem_req = 0 if rem_req is None else rem_req
        waits.append(retry if retry is not None else max([reset_req or 0.0, reset_tok or 0.0]))
    return Headroom(
        at=now,
        remaining_requests=rem_req,
        limit_requests=lim_req,
        remaining_tokens=rem_tok,
        limit_tokens=lim_tok,
        reset_at=now + max(waits) if waits else None,
    )


def rate_limit_wait_s(headroom: Headroom | None, now: float) -> float:
    """Seconds a realtime call would wait for the provider's limit to reset (0: headroom left)."""
    if headroom is None or headroom.reset_at is None:
        return 0.0
    return max(0.0, headroom.reset_at - now)
