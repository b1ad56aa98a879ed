"""Callbacks: where a finished request's answer is written back, as a producer names it.

Each kind is validated here, at the producer's boundary, so a bad callback is refused at submit
with an error that names ``callback.<field>``; the sinks in ``routing.sinks`` deliver them.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError


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
