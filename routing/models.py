"""Pydantic models at every boundary: what producers send, what the store keeps, what callers get.

``Request`` is what a producer writes (loose: a relative deadline, a model left in the body);
``prepare`` turns it into a ``Prepared`` request, the only shape the store accepts, raising one
of mixbatch's ``InvalidRequest`` errors that names the bad field.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import to_json

from routing.callbacks import CallbackSpec, RequestCallback, SinkCallback
from routing.decide.tables import first_error
from routing.errors import (
    BodyTooLarge,
    DeadlineInPast,
    InvalidRequest,
    UnknownEndpoint,
    UnknownLane,
)
from routing.states import State

_M = TypeVar("_M", bound=BaseModel)


class Endpoint(StrEnum):
    CHAT = "/v1/chat/completions"
    EMBEDDINGS = "/v1/embeddings"
    RESPONSES = "/v1/responses"
    MESSAGES = "/v1/messages"
    GENERATE_CONTENT = "/v1beta/models/{model}:generateContent"
    EMBED_CONTENT = "/v1beta/models/{model}:embedContent"


ENDPOINTS = frozenset(e.value for e in Endpoint)


class Route(StrEnum):
    """Where a request runs. ``FLEX`` and ``PRIORITY`` are the synchronous endpoint at the
    provider's flex tier (batch prices, slower, may shed load) and its priority tier (a premium,
    opt-in); the ledger counts a request under the tier that actually answered it."""

    REALTIME = "realtime"
    BATCH = "batch"
    GPU = "gpu"
    FLEX = "flex"
    PRIORITY = "priority"


#: The ``service_tier`` a provider is asked for on each synchronous route (None: its default).
SERVICE_TIER: dict[Route, str | None] = {
    Route.REALTIME: None,
    Route.FLEX: "flex",
    Route.PRIORITY: "priority",
}


LANE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
#: Tenants name a hash tag in Redis keys: no ``{``, ``}`` or ``:``, so two (tenant, custom_id)
#: pairs can never build the same key.
TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}$")
#: Printable text without control characters (no CR/LF reaches a log line or the wire).
_PRINTABLE = re.compile(r"^[^\x00-\x1f\x7f]+$")
METADATA_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MAX_METADATA_ITEMS = 32
MAX_METADATA_VALUE = 256
#: The furthest deadline accepted: a year ahead (a provider batch window is at most days).
MAX_DEADLINE_S = 366 * 86400.0
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def _named(rule: re.Pattern[str], value: str, what: str, chars: str) -> str:
    if not rule.fullmatch(value):
        raise ValueError(f"{what} {value!r} must be {chars}, starting with a letter or digit")
    return value


def parse_duration_s(text: str | float | int | timedelta) -> float:
    """Seconds from ``90``, ``"90s"``, ``"15m"``, ``"6h"``, ``"1d"`` or a timedelta."""
    if isinstance(text, timedelta):
        return text.total_seconds()
    if isinstance(text, bool):
        raise ValueError(f"{text!r} is not a duration (examples: 90s, 15m, 6h, 1d)")
    if isinstance(text, int | float):
        return float(text)
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a duration (examples: 90s, 15m, 6h, 1d)")
    return float(match.group(1)) * _UNIT_S[match.group(2) or "s"]


class LaneSpec(BaseModel):
    """One lane of the lanes table: how long its requests may wait and how full it may get."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    deadline_s: float = Field(gt=0)
    priority: int = 0
    max_queued: int = Field(default=100_000, ge=0)
    on_deadline: Literal["run", "expire"] = "run"
    submit_windows: tuple[str, ...] = ()
    #: Opt-in: realtime requests of this lane may use a provider's priority tier (a premium).
    priority_tier: bool = False
    #: Hash slots the lane spreads over (``routing.keys``); 1 keeps one slot, as before.
    shards: int = Field(default=1, ge=1, le=64)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _named(LANE_NAME, v, "lane name", "1-32 characters of a-z, 0-9, '-' or '_'")


class ServiceConfig(BaseModel):
    """What the service publishes to Redis so producers need no copy of ``config/``."""

    lanes: tuple[LaneSpec, ...]
    max_body_bytes: int = 1_000_000
    default_max_attempts: int = 3
    #: The names of the service's sinks (``config/sinks.toml``), for ``{"sink": NAME}``.
    sinks: tuple[str, ...] = ()

    def lane(self, name: str) -> LaneSpec:
        for spec in self.lanes:
            if spec.name == name:
                return spec
        known = ", ".join(s.name for s in self.lanes)
        raise UnknownLane(f"unknown lane {name!r} (lanes: {known})", field="lane")

    def by_priority(self) -> list[LaneSpec]:
        return sorted(self.lanes, key=lambda s: -s.priority)


class Request(BaseModel):
    """What a producer submits. ``deadline`` may be absolute or relative (``"6h"``)."""

    model_config = ConfigDict(extra="forbid")

    tenant: str = Field(default="default", min_length=1, max_length=128)
    custom_id: str | None = Field(default=None, min_length=1, max_length=512)
    lane: str = "standard"
    deadline: datetime | float | str | timedelta | None = None
    endpoint: str = Endpoint.CHAT.value
    model: str | None = None
    body: dict[str, Any]
    metadata: dict[str, str] = Field(default_factory=dict)
    callback: RequestCallback | None = None
    max_attempts: int | None = Field(default=None, ge=1, le=100)

    @field_validator("tenant")
    @classmethod
    def _tenant(cls, v: str) -> str:
        return _named(
            TENANT_NAME, v, "tenant", "1-128 characters of A-Z, a-z, 0-9, '.', '_', '@', '+' or '-'"
        )

    @field_validator("custom_id")
    @classmethod
    def _custom_id(cls, v: str | None) -> str | None:
        if v is not None and not _PRINTABLE.fullmatch(v):
            raise ValueError("custom_id must not contain control characters (CR, LF, NUL, ...)")
        return v

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v: dict[str, str]) -> dict[str, str]:
        if len(v) > MAX_METADATA_ITEMS:
            raise ValueError(f"{len(v)} metadata entries is over the cap of {MAX_METADATA_ITEMS}")
        for key, value in v.items():
            if not METADATA_KEY.fullmatch(key):
                raise ValueError(
                    f"metadata key {key!r} must be 1-64 characters of A-Z, a-z, 0-9, '.', '_' "
                    "or '-'"
                )
            if len(value) > MAX_METADATA_VALUE or (value and not _PRINTABLE.fullmatch(value)):
                raise ValueError(
                    f"metadata value of {key!r} must be printable and at most "
                    f"{MAX_METADATA_VALUE} characters"
                )
        return v


class Prepared(BaseModel):
    """A validated request, deadline resolved to unix seconds; what the store keeps."""

    model_config = ConfigDict(frozen=True)

    tenant: str
    custom_id: str | None
    lane: str
    deadline: float = Field(allow_inf_nan=False, gt=0)
    endpoint: Endpoint
    model: str
    body: dict[str, Any]
    metadata: dict[str, str]
    callback: CallbackSpec | None
    max_attempts: int = Field(ge=1, le=100)
    created_at: float = Field(allow_inf_nan=False, ge=0)

    @model_validator(mode="after")
    def _deadline_in_range(self) -> Prepared:
        """Whatever path built it, no stored request carries a deadline Redis cannot order."""
        if self.deadline - self.created_at > MAX_DEADLINE_S:
            raise ValueError(
                f"deadline is more than {MAX_DEADLINE_S / 86400:.0f} days after created_at"
            )
        return self


def resolve_deadline(
    value: datetime | float | str | timedelta | None, now: float, default_s: float
) -> float:
    if value is None:
        return now + default_s
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.timestamp()
    if isinstance(value, timedelta):
        return _finite(now + value.total_seconds())
    if isinstance(value, int | float):
        return _finite(float(value))
    try:
        return _finite(now + parse_duration_s(value))
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidRequest(
            f"{value!r} is neither a duration (6h, 15m) nor an ISO-8601 time", field="deadline"
        ) from None
    return resolve_deadline(parsed, now, default_s)


def _finite(deadline: float) -> float:
    if not math.isfinite(deadline):
        raise InvalidRequest(f"{deadline!r} is not a finite time", field="deadline")
    return deadline


def coerce_request(item: Request | dict[str, Any]) -> Request:
    """A ``Request`` from a model or a plain dict, with pydantic's errors made ours."""
    if isinstance(item, Request):
        return item
    try:
        return Request.model_validate(item)
    except ValidationError as exc:
        field, message = first_error(exc)
        raise InvalidRequest(message, field=field or None) from None


def prepare(req: Request, config: ServiceConfig, now: float) -> Prepared:
    """Validate against the lanes table and size cap; pure, so it is table-tested."""
    lane = config.lane(req.lane)
    if req.endpoint not in ENDPOINTS:
        raise UnknownEndpoint(
            f"unknown endpoint {req.endpoint!r} (one of: {', '.join(sorted(ENDPOINTS))})",
            field="endpoint",
        )
    model = req.model or req.body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("missing: give `model`, or `model` inside the body", field="model")
    body = dict(req.body)
    body.setdefault("model", model)
    if body["model"] != model:
        raise InvalidRequest(
            f"model {model!r} differs from body.model {body['model']!r}", field="model"
        )
    size = len(to_json(body)) + (len(to_json(req.metadata)) if req.metadata else 0)
    if size > config.max_body_bytes:
        raise BodyTooLarge(
            f"{size} bytes (body and metadata) is over the cap of {config.max_body_bytes} "
            "(MIXBATCH_MAX_BODY_BYTES)",
            field="body",
        )
    if isinstance(req.callback, SinkCallback) and req.callback.sink not in config.sinks:
        known = ", ".join(config.sinks) or "none"
        raise InvalidRequest(
            f"the service has no sink {req.callback.sink!r} (its sinks: {known}; "
            "they are registered in its config/sinks.toml)",
            field="callback.sink",
        )
    deadline = resolve_deadline(req.deadline, now, lane.deadline_s)
    if deadline <= now:
        raise DeadlineInPast(f"{_iso(deadline)} is already past", field="deadline")
    if deadline - now > MAX_DEADLINE_S:
        raise InvalidRequest(
            f"{_iso(deadline)} is more than {MAX_DEADLINE_S / 86400:.0f} days ahead",
            field="deadline",
        )
    fields: dict[str, Any] = {
        "tenant": req.tenant,
        "custom_id": req.custom_id,
        "lane": lane.name,
        "deadline": deadline,
        "endpoint": Endpoint(req.endpoint),
        "model": model,
        "body": body,
        "metadata": dict(req.metadata),
        "callback": req.callback,
        "max_attempts": req.max_attempts or config.default_max_attempts,
        "created_at": now,
    }
    if _sound(fields):
        # Every field was just validated (``req`` is a ``Request``, the rest checked above),
        # so validating again would only cost: half the bulk path's time went there.
        return trusted(Prepared, fields)
    return Prepared(**fields)  # an odd ``now`` or config: Prepared's own error, as ever


def trusted(cls: type[_M], fields: dict[str, Any]) -> _M:
    """``cls(**fields)`` for fields known valid, without validating them again: three times
    quicker than validating, and ``model_construct`` is slower still (it walks the defaults).
    Every field must be given; tests/test_submit_fast.py checks it equals the validated model."""
    m = cls.__new__(cls)
    object.__setattr__(m, "__dict__", fields)
    object.__setattr__(m, "__pydantic_fields_set__", set(fields))
    object.__setattr__(m, "__pydantic_extra__", None)
    object.__setattr__(m, "__pydantic_private__", None)
    return m


def _sound(fields: dict[str, Any]) -> bool:
    """Whether ``Prepared`` would accept ``fields`` as they are (its rules, restated cheaply)."""
    now, attempts = fields["created_at"], fields["max_attempts"]
    return (
        type(now) is float
        and 0 <= now < math.inf
        and type(attempts) is int
        and 1 <= attempts <= 100
        and type(fields["deadline"]) is float
        and fields["deadline"] > 0
    )


def _iso(ts: float) -> str:
    try:
        return datetime.fromtimestamp(ts, UTC).isoformat()
    except (OverflowError, ValueError, OSError):
        return repr(ts)


class Ticket(BaseModel):
    """What ``submit`` returns: the id to ask about, and whether it was already there."""

    id: str
    custom_id: str | None = None
    lane: str
    deadline: float
    duplicate: bool = False


class ErrorInfo(BaseModel):
    code: str
    message: str
    retryable: bool = False
    status_code: int | None = None


class StoredResult(BaseModel):
    """What a finish stores with a request: built once per route, read back into ``Result``.

    Every route builds this one record instead of a dict of its own, so the stored shape
    cannot drift between the batch, realtime and local routes.
    """

    status_code: int | None = None
    body: Any = None
    usage: dict[str, Any] | None = None
    error: ErrorInfo | None = None
    provider: str | None = None
    batch_id: str | None = None
    provider_request_id: str | None = None
    latency_s: float | None = None
    truncated: bool | None = None
    cost_usd: float | None = None
    saved_usd: float | None = None
    estimated_usd: float | None = None
    priced: bool | None = None
    #: The tier that answered ("flex", "default", "priority", "standard", "batch"): the
    #: provider's echo when it gives one, else the tier asked for; the price follows it.
    service_tier: str | None = None

    def stored(self) -> dict[str, Any]:
        """The JSON-ready form kept in the request's hash (absent fields left out)."""
        return self.model_dump(mode="json", exclude_none=True)


class Result(BaseModel):
    """A request's answer as the caller sees it; ``body`` is the provider-shaped response."""

    id: str
    custom_id: str | None = None
    tenant: str = "default"
    lane: str
    status: State
    status_code: int | None = None
    body: dict[str, Any] | None = None
    error: ErrorInfo | None = None
    usage: dict[str, Any] | None = None
    route: Route | None = None
    provider: str | None = None
    model: str | None = None
    endpoint: str | None = None
    cost_usd: float | None = None
    saved_usd: float | None = None
    service_tier: str | None = None
    attempts: int = 0
    deadline: float
    created_at: float
    finished_at: float | None = None
    delivered: bool = False

    @property
    def ok(self) -> bool:
        return self.status is State.DONE

    @property
    def latency_s(self) -> float | None:
        return None if self.finished_at is None else self.finished_at - self.created_at

    @property
    def missed_deadline(self) -> bool:
        return self.finished_at is not None and self.finished_at > self.deadline


class StatusInfo(BaseModel):
    id: str
    state: State
    outcome: State | None = None
    lane: str
    tenant: str
    custom_id: str | None = None
    attempts: int
    max_attempts: int
    deadline: float
    created_at: float
    updated_at: float
    route: Route | None = None
    error: ErrorInfo | None = None


class Claimed(BaseModel):
    """A request handed to a worker under a lease; ``token`` proves the lease on every step."""

    id: str
    token: str
    attempts: int
    request: Prepared


class LaneStats(BaseModel):
    lane: str
    depth: int
    delayed: int
    leased: int
    oldest_age_s: float | None
    nearest_deadline_s: float | None
    counts: dict[str, int]
