"""Fault knobs of the sandbox provider.

Kept apart from the HTTP app so that producers, settings and tests can build and validate knobs
without importing starlette or uvicorn.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Knobs(BaseModel):
    """How badly the sandbox behaves; one live object, read again on every call.

    Units are in the field names. Probabilities are drawn from ``random.Random(seed)``, one draw
    per provider call, so the same sequence of calls meets the same faults in every run.
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
