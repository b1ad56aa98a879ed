"""What the Django and Flask integrations share: which row a request is for, and its answer.

A request enqueued for a row carries the row in its ``custom_id``:

    <label>:<pk>:<field>[:<key>]        e.g.  docs.document:42:embedding:3f1c9a0b5e7d2c41

``label`` names the model (Django's ``app_label.model_name``) or the table (Flask); ``field``
is where the answer goes. mixbatch treats a ``custom_id`` a tenant used before as the same
request and returns the first one, so ``key`` says which question this is: by default a digest
of the endpoint, model and body (``routing.contrib.common.request_digest``), so the same
question for the same row is asked once and a changed one is asked again; or a key of the
caller's (a version number) to ask again on purpose. Each part is percent-encoded, so a primary
key or key holding ``:`` still parses. Carrying the target in the request, rather than in a
table of the app's, means the callback needs nothing but the result to find its row.

``Answer`` is the result as a writer needs it: the status, the useful value pulled out of the
provider-shaped body (an embedding vector, the assistant's text) and the error, if any.
Everything here is pure, so it is tested without a database, Redis or a worker.
"""

from __future__ import annotations

import array
import base64
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

from pydantic import ValidationError

from routing.decide.tables import first_error
from routing.errors import MixbatchError
from routing.models import Result
from routing.states import State

__all__ = [
    "Answer",
    "Target",
    "TargetError",
    "answer_value",
    "parse_custom_id",
]

#: Mixbatch's cap on a custom_id (``routing.models.Request``).
MAX_CUSTOM_ID = 512


class TargetError(MixbatchError, ValueError):
    """A result cannot be written back: its custom_id names no row of this integration.

    Not retryable: the same result will name the same thing next time. Seen when a callback
    task receives a result it was not meant for (another producer's custom_id) or a row's model
    or table no longer exists.
    """


def _part(value: object) -> str:
    return quote(str(value), safe="")


@dataclass(frozen=True)
class Target:
    """The row (``label`` and ``pk``) and the ``field`` a request's answer is written into."""

    label: str
    pk: str
    field: str
    key: str | None = None

    @property
    def custom_id(self) -> str:
        parts = [self.label, self.pk, self.field]
        if self.key is not None:
            parts.append(self.key)
        text = ":".join(_part(p) for p in parts)
        if len(text) > MAX_CUSTOM_ID:
            raise TargetError(
                f"custom_id {text[:60]!r}... is {len(text)} characters, over mixbatch's "
                f"{MAX_CUSTOM_ID}; use a shorter key"
            )
        return text


def parse_custom_id(custom_id: str | None) -> Target:
    """The target a custom_id names; ``TargetError`` if it is not in this module's format."""
    if not custom_id:
        raise TargetError(
            "the result has no custom_id, so it names no row; was it enqueued through "
            "routing.contrib (enqueue), or by another producer with this callback task?"
        )
    parts = [unquote(p) for p in custom_id.split(":")]
    if len(parts) not in (3, 4) or not all(parts):
        raise TargetError(
            f"custom_id {custom_id!r} is not <label>:<pk>:<field>[:<key>], the format "
            "routing.contrib writes; this callback task only takes results it enqueued"
        )
    return Target(parts[0], parts[1], parts[2], parts[3] if len(parts) == 4 else None)


def _text(content: object) -> str:
    """Text of a message's content: a string, or a list of content parts with ``text``."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part["text"]
            for part in content
            if isinstance(part, Mapping) and isinstance(part.get("text"), str)
        )
    return ""


def _vector(value: object) -> object:
    """An embedding as floats, whether the provider sent floats or base64 (little-endian f32)."""
    if not isinstance(value, str):
        return value
    floats = array.array("f")
    floats.frombytes(base64.b64decode(value))
    if sys.byteorder == "big":
        floats.byteswap()
    return floats.tolist()


def answer_value(body: Mapping[str, Any] | None) -> Any:
    """The useful part of a provider-shaped response, by its shape.

        embeddings (one input)     the vector, a list of floats
        embeddings (many inputs)   a list of vectors, in input order
        chat completion            the first choice's message text
        Responses API              the text of the output messages
        Anthropic message          the text blocks, joined
        anything else              the body unchanged

    Shapes rather than the endpoint decide, so a result whose endpoint is unknown still works.
    """
    if body is None:
        return None
    data = body.get("data")
    if body.get("object") == "list" and isinstance(data, list):
        items = sorted(
            (d for d in data if isinstance(d, Mapping)), key=lambda d: int(d.get("index", 0))
        )
        vectors = [_vector(d.get("embedding")) for d in items]
        return vectors[0] if len(vectors) == 1 else vectors
    choices = body.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], Mapping):
        message = choices[0].get("message")
        return _text(message.get("content")) if isinstance(message, Mapping) else None
    if body.get("object") == "response" and isinstance(body.get("output"), list):
        return "".join(
            _text(item.get("content"))
            for item in body["output"]
            if isinstance(item, Mapping) and item.get("type") == "message"
        )
    if body.get("type") == "message" and isinstance(body.get("content"), list):
        return _text(body["content"])
    return dict(body)


@dataclass(frozen=True)
class Answer:
    """One result, ready to write: ``value`` is set only when the request succeeded.

    ``status`` is the request's final state as a string (``done``, ``failed``, ``expired``,
    ``cancelled``), the same word mixbatch's CLI shows; ``error`` is its message otherwise.
    """

    request_id: str
    target: Target
    status: str
    value: Any
    error: str | None
    result: Result

    @property
    def ok(self) -> bool:
        return self.result.status is State.DONE

    @classmethod
    def from_result(cls, result: Result | Mapping[str, Any]) -> Answer:
        """From the task's argument (the result as JSON) or a ``Result``."""
        if not isinstance(result, Result):
            try:
                result = Result.model_validate(result)
            except ValidationError as exc:
                where, message = first_error(exc)
                raise TargetError(
                    f"not a mixbatch result: {where or 'result'}: {message}"
                ) from None
        ok = result.status is State.DONE
        error = None
        if not ok:
            error = result.error.message if result.error else f"request {result.status.value}"
        return cls(
            request_id=result.id,
            target=parse_custom_id(result.custom_id),
            status=result.status.value,
            value=answer_value(result.body) if ok else None,
            error=error,
            result=result,
        )
