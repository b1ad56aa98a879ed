"""Fault knobs of the sandbox provider.

Kept apart from the HTTP app so that producers, settings and tests can build and validate knobs
without importing starlette or uvicorn.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


def _probability(description: str) -> Any:
    """A knob that is a probability, 0 (never, the default) to 1 (every time)."""
    return Field(default=0.0, ge=0.0, le=1.0, description=description)


class Knobs(BaseModel):
    """How badly the sandbox behaves; one live object, read again on every call.

    Units are in the field names. Probabilities are drawn from ``random.Random(seed)``, one draw
    per provider call, so the same sequence of calls meets the same faults in every run. The
    ``batch_*`` knobs are read when a batch is created (or cancelled) and fixed into its plan, so
    changing them never rewrites a batch already running; ``batch_line_fail_rate`` is a hash of
    the seed and the line's ``custom_id``, not a draw (see ``routing.sandbox.batch_plan``).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    latency_ms: int = Field(default=0, ge=0, description="delay added to every provider call")
    rate_429: float = Field(default=0.0, ge=0.0, le=1.0, description="probability of a 429")
    retry_after_s: float = Field(default=1.0, ge=0.0, description="retry-after header of 429s")
    rate_500: float = Field(default=0.0, ge=0.0, le=1.0, description="probability of a 500")
    rate_timeout: float = Field(
        default=0.0, ge=0.0, le=1.0, description="probability of hanging hang_s before answering"
    )
    hang_s: float = Field(default=30.0, ge=0.0, description="how long a timeout fault hangs")
    seed: int = Field(default=0, description="seed of the fault draws")
    fail_first: int = Field(
        default=0, ge=0, description="calls per distinct (endpoint, body) that fail before success"
    )
    fail_first_status: int = Field(
        default=429, ge=400, le=599, description="HTTP status of the fail_first failures"
    )
    time_scale: float = Field(
        default=1.0,
        gt=0.0,
        description="sandbox seconds per real second; batch timestamps and timelines use it",
    )
    batch_turnaround_s: float = Field(
        default=2.0, ge=0.0, description="sandbox seconds from a batch's creation to its end"
    )
    batch_validating_s: float = Field(
        default=0.2, ge=0.0, description="sandbox seconds an OpenAI batch spends validating"
    )
    batch_cancelling_s: float = Field(
        default=0.2, ge=0.0, description="sandbox seconds a batch spends cancelling"
    )
    batch_line_fail_rate: float = _probability(
        "share of batch lines that fail: half 400 (permanent), half 500 (transient)"
    )
    batch_expire: bool = Field(
        default=False, description="batches expire at 24 h sandbox time instead of finishing"
    )
    batch_expire_done_fraction: float = Field(
        default=0.5, ge=0.0, le=1.0, description="share of an expiring batch's lines that ran"
    )
    batch_stuck_finalizing: bool = Field(
        default=False, description="batches reach finalizing (Anthropic: all done) and stay there"
    )
    batch_rate_429: float = _probability("probability of a 429 on batch create and file upload")
    flex_latency_ms: int = Field(
        default=0, ge=0, description='extra delay of a call with service_tier "flex"'
    )
    flex_rate_429: float = _probability(
        'probability a flex call is shed with 429 "Resource Unavailable" (OpenAI)'
    )
    flex_rate_498: float = _probability(
        "probability a flex call is shed with 498 capacity_exceeded (Groq)"
    )
    flex_models: list[str] = Field(
        default_factory=lambda: [
            *("gpt-5", "gpt-5-mini", "gpt-5-nano", "o3", "o4-mini"),
            *("gemini-3-flash-preview", "gemini-2.5-flash", "gemini-2.5-pro"),
        ],
        description='models that take service_tier "flex"; others answer 400, as OpenAI does',
    )
    gemini_stuck_pending: bool = Field(
        default=False,
        description="Gemini batches stay pending, then expire at 48 h sandbox time with no results",
    )
    bedrock_min_records: int = Field(
        default=100, ge=1, description="fewest records a Bedrock batch job accepts"
    )
    bedrock_expire: bool = Field(
        default=False,
        description="Bedrock jobs stay Scheduled and end Expired at timeoutDurationInHours",
    )
    mistral_timeout: bool = Field(
        default=False,
        description="Mistral jobs end TIMEOUT_EXCEEDED, batch_expire_done_fraction of lines run",
    )
