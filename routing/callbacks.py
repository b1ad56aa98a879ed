"""Callbacks: where a finished request's answer goes, as a producer names it.

Two shapes, validated here at the producer's boundary, so a bad callback is refused at submit
with an error naming ``callback.<field>``:

    {"sink": "crm"}                                  a sink the service registered by name
    {"kind": "celery", "task": "app.save", "queue": "app.answers"}
                                                     a Celery task of the caller's

A producer never names a URL, a host, a file or a credential: webhook, SQL and stream targets
live in the service's sinks table (``config/sinks.toml``, ``routing.sinks.table``), so the
service alone decides what it connects to and holds the secrets. Celery callbacks stay inline
because they carry no credentials (the service sends them on its own broker); a task or queue in
mixbatch's or Celery's own namespace is refused, so a producer cannot make the service send a
result to one of the service's own tasks.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

__all__ = [
    "CALLBACK_SHAPES",
    "SINKS_FILE",
    "SINK_NAME",
    "CallbackSpec",
    "CeleryCallback",
    "RequestCallback",
    "RetiredCallback",
    "SinkCallback",
    "check_sink_name",
    "reserved_celery_name",
]

#: Where a service keeps its named sinks, for messages (``MIXBATCH_SINKS_FILE`` overrides it).
SINKS_FILE = "config/sinks.toml (or the file MIXBATCH_SINKS_FILE names)"
#: A sink's name: what a producer writes in ``{"sink": NAME}`` and the table's ``[sinks.NAME]``.
SINK_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
SINK_NAME_RULE = "1-64 characters of a-z, 0-9, '-' or '_', starting with a letter or digit"
#: A Celery task or queue name: printable, no spaces (no CR/LF reaches the broker or a log).
_CELERY_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:@-]{0,199}$")
CALLBACK_SHAPES = '{"sink": NAME} or {"kind": "celery", "task": ..., "queue": ...}'
#: Kinds that were inline callbacks before named sinks.
_RETIRED_KINDS = ("webhook", "sql", "stream")


def _invalid(reason: str, kind: str = "invalid_callback") -> PydanticCustomError:
    """A validation error whose text is ``reason`` alone, without pydantic's "Value error, "."""
    return PydanticCustomError(kind, "{reason}", {"reason": reason})


def reserved_celery_name(name: str) -> str | None:
    """Why ``name`` (a task or a queue) belongs to mixbatch or Celery itself, or None.

    ``mixbatch.*`` holds the service's tasks and queues; ``celery``, ``celery.*``,
    ``celeryev.*``, ``celery@...`` and ``*.pidbox`` are Celery's default queue, its built-in
    tasks and its event and control queues.
    """
    low = name.lower()
    if low == "mixbatch" or low.startswith("mixbatch."):
        return "mixbatch's own namespace (mixbatch.*)"
    if low == "celery" or low.startswith(("celery.", "celeryev", "celery@")):
        return "Celery's own namespace (celery, celery.*)"
    if low.endswith(".pidbox"):
        return "Celery's control queues (*.pidbox)"
    return None


def _celery_name(value: str, what: str) -> str:
    if not _CELERY_NAME.fullmatch(value):
        raise _invalid(
            f"{value!r} is not a Celery {what} name: 1-200 characters of letters, digits, "
            "'_', '.', ':', '@' or '-'"
        )
    reserved = reserved_celery_name(value)
    if reserved is not None:
        raise _invalid(f"{what} {value!r} is in {reserved}; name a {what} of your own app")
    return value


class CeleryCallback(BaseModel):
    """Send the result to a Celery task of the caller's, by name, on the caller's queue."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["celery"] = "celery"
    task: str = Field(min_length=1)
    queue: str | None = None

    @field_validator("task")
    @classmethod
    def _task(cls, v: str) -> str:
        return _celery_name(v, "task")

    @field_validator("queue")
    @classmethod
    def _queue(cls, v: str | None) -> str | None:
        return None if v is None else _celery_name(v, "queue")


def check_sink_name(name: str) -> str:
    """``name`` if it follows the sink name rule, else ``ValueError`` saying the rule."""
    if not SINK_NAME.fullmatch(name):
        raise ValueError(f"{name!r} is not a sink name: {SINK_NAME_RULE}")
    return name


class SinkCallback(BaseModel):
    """Deliver to the sink the service registered under ``sink`` (a webhook, table or stream).

    Only the name's spelling is checked here. Whether the service has that sink is checked at
    submit against the names it publishes (``ServiceConfig.sinks``), and again by the worker
    at delivery, which alone reads the table.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Not written out: the stored and documented shape is ``{"sink": NAME}``.
    kind: Literal["sink"] = Field(default="sink", exclude=True)
    sink: str

    @field_validator("sink")
    @classmethod
    def _name(cls, v: str) -> str:
        if not SINK_NAME.fullmatch(v):
            raise _invalid(f"{v!r} is not a sink name: {SINK_NAME_RULE}")
        return v


class RetiredCallback(BaseModel):
    """A stored callback that is no longer accepted (an inline webhook, SQL or stream target,
    or a task in a reserved namespace, stored by an older version).

    Reading such a request must not fail, so it is kept as it was written; delivering it is
    refused with ``reason``, and it waits in the dead letters with its result readable by id.
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    kind: str = "unknown"

    @property
    def reason(self) -> str:
        try:
            _producer_callback(self.model_dump())
        except ValidationError as exc:
            return str(exc.errors()[0]["msg"])
        except PydanticCustomError as exc:
            return exc.message()
        return "no longer accepted"


class _CallbackKind(BaseModel):
    """Validates ``kind`` alone, so a wrong kind is reported at ``callback.kind``."""

    kind: Any = Field(default=None, validate_default=True)

    @field_validator("kind", mode="before")
    @classmethod
    def _known(cls, v: Any) -> Any:
        if v == "celery":
            return v
        if v in _RETIRED_KINDS:
            raise _invalid(
                f"inline {v} callbacks are no longer accepted: the service holds targets and "
                f"their credentials now. Register the {v} target as a named sink in the "
                f'service\'s {SINKS_FILE} and send {{"sink": NAME}}',
                "retired_callback",
            )
        what = "missing" if v is None else f"unknown callback kind {v!r}"
        raise _invalid(f"{what}: a callback is {CALLBACK_SHAPES}", "unknown_sink")


def _producer_callback(value: Any) -> Any:
    """Report errors at ``callback.kind``, ``callback.sink`` or ``callback.task``.

    A dict is validated against the model its shape names, so errors carry that model's own
    field names (``callback.task``, not ``callback.CeleryCallback.task``); the union then
    takes the model instance as it is.
    """
    if not isinstance(value, dict):
        return value
    if "sink" in value:
        return SinkCallback.model_validate(value)
    _CallbackKind.model_validate({"kind": value.get("kind")})
    return CeleryCallback.model_validate(value)


def _stored_callback(value: Any) -> Any:
    """What the store kept: today's shapes as they are, anything older as ``RetiredCallback``."""
    if not isinstance(value, dict):
        return value
    try:
        return _producer_callback(value)
    except ValidationError:
        return RetiredCallback.model_validate(value)


RequestCallback = Annotated[
    CeleryCallback | SinkCallback,
    BeforeValidator(_producer_callback),
]
"""A callback as a producer submits it (``Request.callback``): strict."""

CallbackSpec = Annotated[
    CeleryCallback | SinkCallback | RetiredCallback,
    BeforeValidator(_stored_callback),
]
"""A callback as the store keeps it (``Prepared.callback``) and delivery reads it."""
