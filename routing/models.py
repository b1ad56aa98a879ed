"""Pydantic models at every boundary: what producers send, what the store keeps, what callers get.

``Request`` is what a producer writes (loose: a relative deadline, a model left in the body);
``prepare`` turns it into a ``Prepared`` request, the only shape the store accepts, raising one
of mixbatch's ``InvalidRequest`` errors that names the bad field.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)
from pydantic_core import PydanticCustomError, to_json

from routing.errors import (
    BodyTooLarge,
    DeadlineInPast,
    InvalidRequest,
    UnknownEndpoint,
    UnknownLane,
)
from routing.states import State


class Endpoint(StrEnum):
    CHAT = "/v1/chat/completions"
    EMBEDDINGS = "/v1/embeddings"
    RESPONSES = "/v1/responses"
    MESSAGES = "/v1/messages"


ENDPOINTS = frozenset(e.value for e in Endpoint)


class Route(StrEnum):
    REALTIME = "realtime"
    BATCH = "batch"
    GPU = "gpu"


LANE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


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

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not LANE_NAME.fullmatch(v):
            raise ValueError(
                f"lane name {v!r} must be 1-32 characters of a-z, 0-9, '-' or '_', "
                "starting with a letter or digit"
            )
        return v


class ServiceConfig(BaseModel):
    """What the service publishes to Redis so producers need no copy of ``config/``."""

    lanes: tuple[LaneSpec, ...]
    max_body_bytes: int = 1_000_000
    default_max_attempts: int = 3

    def lane(self, name: str) -> LaneSpec:
        for spec in self.lanes:
            if spec.name == name:
                return spec
        known = ", ".join(s.name for s in self.lanes)
        raise UnknownLane(f"unknown lane {name!r} (lanes: {known})", field="lane")

    def by_priority(self) -> list[LaneSpec]:
        return sorted(self.lanes, key=lambda s: -s.priority)


class CeleryCallback(BaseModel):
    """Send the result to a Celery task of the caller's, by name, on the caller's queue."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["celery"] = "celery"
    task: str = Field(min_length=1)
    queue: str | None = None


def _invalid(reason: str, kind: str = "invalid_callback") -> PydanticCustomError:
    """A validation error whose text is ``reason`` alone, without pydantic's "Value error, "."""
    return PydanticCustomError(kind, "{reason}", {"reason": reason})


class WebhookCallback(BaseModel):
    """POST the result as signed JSON to the caller's URL.

    The signing secret is not part of the request: it comes from the service's settings, per
    tenant (``MIXBATCH_WEBHOOK_SECRETS``), so a producer cannot choose the key a receiver trusts.
    Only the scheme is checked here; the address is checked when delivering, because DNS can
    change between submit and delivery and only the service knows its allow-list.
    """

    model_config = ConfigDict(extra="forbid")

    kind: Literal["webhook"] = "webhook"
    url: str = Field(min_length=1, max_length=2048)

    @field_validator("url")
    @classmethod
    def _http_only(cls, v: str) -> str:
        try:
            parts = urlsplit(v)
            host = parts.hostname
        except ValueError:
            raise _invalid(f"{v!r} is not a URL") from None
        if parts.scheme.lower() not in ("http", "https"):
            raise _invalid(
                f"scheme {parts.scheme or '(none)'!r} is not allowed; a webhook is http or https"
            )
        if not host:
            raise _invalid(f"{v!r} has no host")
        return v


#: SQLAlchemy URL schemes the SQL sink upserts into (``ON CONFLICT`` on both).
SQL_DIALECTS = ("sqlite", "postgresql")
_SQL_URL = re.compile(r"^(?P<dialect>[a-z][a-z0-9]*)(?:\+[a-z0-9_]+)?://", re.IGNORECASE)
_SQL_TABLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


class SqlCallback(BaseModel):
    """Upsert the result, keyed by request id, into a table of the caller's database.

    ``url`` is a SQLAlchemy URL; ``table`` defaults to the service's ``MIXBATCH_SQL_TABLE``. The
    table's columns are documented in ``routing.sinks.sql``.
    """

    model_config = ConfigDict(extra="forbid")

    kind: Literal["sql"] = "sql"
    url: str = Field(min_length=1, max_length=2048)
    table: str | None = None

    @field_validator("url")
    @classmethod
    def _known_dialect(cls, v: str) -> str:
        match = _SQL_URL.match(v)
        dialect = match.group("dialect").lower() if match else None
        if dialect not in SQL_DIALECTS:
            raise _invalid(
                "must be a SQLAlchemy URL of one of: "
                + ", ".join(f"{d}://..." for d in SQL_DIALECTS)
                + " (e.g. sqlite:///results.db, postgresql+psycopg://user@host/db)"
            )
        return v

    @field_validator("table")
    @classmethod
    def _identifier(cls, v: str | None) -> str | None:
        if v is not None and not _SQL_TABLE.match(v):
            raise _invalid(
                f"{v!r} must be 1-63 characters of letters, digits or '_', not starting with a digit"
            )
        return v


class StreamCallback(BaseModel):
    """XADD the result to a Redis stream, trimmed to about ``maxlen`` entries.

    ``redis_url`` defaults to the service's own Redis; ``maxlen`` to ``MIXBATCH_STREAM_MAXLEN``.
    """

    model_config = ConfigDict(extra="forbid")

    kind: Literal["stream"] = "stream"
    key: str = Field(min_length=1, max_length=512)
    maxlen: int | None = Field(default=None, ge=1, le=100_000_000)
    redis_url: str | None = Field(default=None, max_length=2048)

    @field_validator("key")
    @classmethod
    def _whole_hash_tag(cls, v: str) -> str:
        """Braces must form a cluster hash tag, so the sink's marker key can share its slot."""
        start = v.find("{")
        end = v.find("}", start + 1) if start != -1 else -1
        if ("{" in v or "}" in v) and not end > start + 1:
            raise _invalid(
                f"{v!r}: braces in a stream key must form a Redis Cluster hash tag, e.g. "
                "'{tenant}:results'"
            )
        return v

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, v: str | None) -> str | None:
        if v is not None and urlsplit(v).scheme.lower() not in ("redis", "rediss", "unix"):
            raise _invalid("must be a redis://, rediss:// or unix:// URL")
        return v


_CALLBACKS: dict[str, type[BaseModel]] = {
    "celery": CeleryCallback,
    "webhook": WebhookCallback,
    "sql": SqlCallback,
    "stream": StreamCallback,
}
#: The sinks a callback can name in ``kind``.
SINK_KINDS = tuple(_CALLBACKS)


class _CallbackKind(BaseModel):
    """Validates ``kind`` alone, so an unknown sink is reported at ``callback.kind``."""

    kind: Any = Field(default=None, validate_default=True)

    @field_validator("kind", mode="before")
    @classmethod
    def _known(cls, v: Any) -> Any:
        if not isinstance(v, str) or v not in _CALLBACKS:
            what = "missing: name a sink" if v is None else f"unknown sink {v!r}"
            raise _invalid(f"{what} (known sinks: {', '.join(SINK_KINDS)})", "unknown_sink")
        return v


def _validate_callback(value: Any) -> Any:
    """Report errors at ``callback.kind`` or ``callback.url``, not at pydantic's tagged path.

    A dict is validated against the model its ``kind`` names, so errors carry that model's own
    field names (``callback.url``, not ``callback.webhook.url``); the discriminated union then
    takes the model instance as it is.
    """
    if not isinstance(value, dict):
        return value
    kind = _CallbackKind.model_validate({"kind": value.get("kind")}).kind
    return _CALLBACKS[kind].model_validate(value)


CallbackSpec = Annotated[
    Annotated[
        CeleryCallback | WebhookCallback | SqlCallback | StreamCallback,
        Field(discriminator="kind"),
    ],
    BeforeValidator(_validate_callback),
]


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
    callback: CallbackSpec | None = None
    max_attempts: int | None = Field(default=None, ge=1, le=100)


class Prepared(BaseModel):
    """A validated request, deadline resolved to unix seconds; what the store keeps."""

    model_config = ConfigDict(frozen=True)

    tenant: str
    custom_id: str | None
    lane: str
    deadline: float
    endpoint: Endpoint
    model: str
    body: dict[str, Any]
    metadata: dict[str, str]
    callback: CallbackSpec | None
    max_attempts: int
    created_at: float


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
        return now + value.total_seconds()
    if isinstance(value, int | float):
        return float(value)
    try:
        return now + parse_duration_s(value)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidRequest(
            f"{value!r} is neither a duration (6h, 15m) nor an ISO-8601 time", field="deadline"
        ) from None
    return resolve_deadline(parsed, now, default_s)


def coerce_request(item: Request | dict[str, Any]) -> Request:
    """A ``Request`` from a model or a plain dict, with pydantic's errors made ours."""
    if isinstance(item, Request):
        return item
    try:
        return Request.model_validate(item)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or None
        raise InvalidRequest(first["msg"], field=field) from None


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
    size = len(to_json(body))
    if size > config.max_body_bytes:
        raise BodyTooLarge(
            f"{size} bytes is over the cap of {config.max_body_bytes} (MIXBATCH_MAX_BODY_BYTES)",
            field="body",
        )
    deadline = resolve_deadline(req.deadline, now, lane.deadline_s)
    if deadline <= now:
        raise DeadlineInPast(
            f"{datetime.fromtimestamp(deadline, UTC).isoformat()} is already past", field="deadline"
        )
    return Prepared(
        tenant=req.tenant,
        custom_id=req.custom_id,
        lane=lane.name,
        deadline=deadline,
        endpoint=Endpoint(req.endpoint),
        model=model,
        body=body,
        metadata=req.metadata,
        callback=req.callback,
        max_attempts=req.max_attempts or config.default_max_attempts,
        created_at=now,
    )


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
