"""What the micro-batcher takes and gives: a request, its answer, a batch's report, and the
engine's own bookkeeping of each request on its way (``gpu_worker.engine``)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypedDict

from gpu_worker.backends.base import Job, Piece
from gpu_worker.errors import RequestError
from gpu_worker.packer import Item


@dataclass(frozen=True, slots=True)
class LocalRequest:
    """One request for the local route: the provider-shaped body, and when it is due (unix s)."""

    id: str
    endpoint: str
    body: Mapping[str, Any]
    lane: str = "standard"
    deadline: float = math.inf
    priority: int = 0
    drop_after: float = math.inf
    """Unix seconds after which nobody wants the answer (a lane whose deadline policy is
    ``expire``): a request still waiting then is dropped before it reaches the device."""


class ErrorBody(TypedDict):
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class LocalAnswer:
    """The outcome of one request: a provider-shaped ``body``, or an ``error`` and its status.

    ``truncated`` says an input was cut to the model's limit; it lives here rather than in the
    body, so the body stays exactly what a provider would have returned.
    """

    id: str
    status_code: int
    body: dict[str, Any] | None
    error: ErrorBody | None = None
    truncated: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def retryable(self) -> bool:
        """5xx (out of memory, an internal failure): the same request may well succeed later."""
        return self.status_code >= 500

    @classmethod
    def failed(cls, request_id: str, exc: RequestError) -> LocalAnswer:
        return cls(request_id, exc.status_code, None, ErrorBody(code=exc.code, message=str(exc)))


@dataclass(eq=False, slots=True)
class _Call:
    """One ``run`` call: how many of its requests still lack an answer."""

    left: int


@dataclass(eq=False, slots=True)
class _Ticket:
    request: LocalRequest
    call: _Call
    arrived: float
    job: Job | None = None
    pieces: list[Piece] = field(default_factory=list)
    results: list[Any] = field(default_factory=list)
    remaining: int = 0
    answer: LocalAnswer | None = None
    cancelled: bool = False


@dataclass(eq=False, slots=True)
class _Slot:
    """One tokenised input in the pool, and where its result goes."""

    ticket: _Ticket
    index: int
    piece: Piece
    item: Item


@dataclass(frozen=True, slots=True)
class BatchReport:
    """One micro-batch that ran, given to ``on_batch``: for logs, metrics and tests."""

    request_ids: tuple[str, ...]
    items: int
    tokens: int
    padded: int
    output_tokens: int
    busy_s: float
