"""What a provider batch looks like to mixbatch, whichever protocol ran it.

Statuses are normalised to ``BatchStatus``. Anthropic's three (``in_progress``, ``canceling``,
``ended``) map onto it with the request counts: an ended batch whose cancel was asked is
``CANCELLED``, one with expired requests ``EXPIRED``, any other ``COMPLETED`` (Anthropic has no
batch-level failure; bad params come back as errored lines). ``raw_status`` keeps the
provider's own word. A result line is a ``LineResult`` joined to its request by ``custom_id``;
the helpers below read the pieces every protocol shares (timestamps, input lines, line errors).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from routing.models import ErrorInfo
from routing.providers.base import RETRYABLE_STATUSES

__all__ = [
    "TERMINAL_BATCH_STATUSES",
    "BatchJob",
    "BatchStatus",
    "LineError",
    "LineResult",
    "OrphanSearch",
    "http_retryable",
    "iter_input_lines",
    "no_response_error",
    "parse_timestamp",
    "scan_sizes",
]

_NO_RESPONSE_CODES = {"batch_expired": "expired", "batch_cancelled": "cancelled"}
_CLIENT_FAULT_HINTS = ("invalid", "not_found", "unsupported", "mismatch", "too_large", "too_long")


class BatchStatus(StrEnum):
    """A batch's phase, the same words for every provider (OpenAI's, which are the richest)."""

    VALIDATING = "validating"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


#: Nothing more will happen to the batch: read its results (expired and cancelled batches
#: keep the lines that finished) and stop polling.
TERMINAL_BATCH_STATUSES = frozenset(
    {BatchStatus.COMPLETED, BatchStatus.FAILED, BatchStatus.EXPIRED, BatchStatus.CANCELLED}
)


class LineError(BaseModel):
    """Why a batch failed validation, per input line where the provider says which (1-based)."""

    model_config = ConfigDict(frozen=True)

    line: int | None = None
    custom_id: str | None = None
    code: str
    message: str


class BatchJob(BaseModel):
    """A provider batch as last seen. Times are unix seconds.

    ``failed`` counts lines that did not succeed (for Anthropic: errored, cancelled and expired,
    known only once the batch ends). ``input_ref``, ``output_ref`` and ``error_ref`` are file ids
    (OpenAI) or, for Anthropic, the ``results_url`` in ``output_ref``.
    """

    model_config = ConfigDict(frozen=True)

    provider: str
    batch_id: str
    status: BatchStatus
    raw_status: str
    total: int = 0
    completed: int = 0
    failed: int = 0
    created_at: float
    ended_at: float | None = None
    expires_at: float | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    validation_errors: list[LineError] = Field(default_factory=list)
    input_ref: str | None = None
    output_ref: str | None = None
    error_ref: str | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_BATCH_STATUSES


class LineResult(BaseModel):
    """One line of a batch's results, joined to its request by ``custom_id``.

    ``body`` is the provider's reply (its error envelope for a failed line). ``error.code`` is
    ``"expired"`` or ``"cancelled"`` for a line that never ran, on every provider, so the caller
    can re-route it; ``error.retryable`` follows the HTTP rule (429, 408, 409, 5xx) otherwise.
    """

    model_config = ConfigDict(frozen=True)

    custom_id: str
    status_code: int | None = None
    body: dict[str, Any] | None = None
    error: ErrorInfo | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class OrphanSearch(BaseModel):
    """What a search for a batch created but never recorded found.

    ``found`` holds our tag and exactly our custom_ids. ``undecided`` names candidates whose
    requests cannot be read yet (an Anthropic batch shows them only in its results, once it
    ended): the caller waits for them rather than requeue requests a running batch may answer.
    """

    model_config = ConfigDict(frozen=True)

    found: BatchJob | None = None
    undecided: list[str] = Field(default_factory=list)


def parse_timestamp(value: object) -> float | None:
    """Unix seconds from an int (OpenAI), an ISO-8601 or RFC 3339 string (Anthropic, Together)."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        return float(value) if math.isfinite(value) else None
    if not isinstance(value, str) or not value.strip():
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def iter_input_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, bytes without the newline) of each non-blank line, read lazily."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            line = raw.rstrip(b"\r\n")
            if line.strip():
                yield number, line


def http_retryable(status: int) -> bool:
    """The rule ``error_for_response`` applies to whole replies, for one line's status."""
    return status in RETRYABLE_STATUSES or status >= 500


def no_response_error(code: str, message: str) -> ErrorInfo:
    """A line that never got an HTTP reply: expiry, cancel, a timeout inside the provider.

    Such a line did not run, so trying it again (elsewhere) may help, unless its code says the
    request itself was bad.
    """
    mapped = _NO_RESPONSE_CODES.get(code, code)
    retryable = not any(hint in mapped for hint in _CLIENT_FAULT_HINTS)
    return ErrorInfo(code=mapped, message=message, retryable=retryable)


def scan_sizes(lines: Iterable[tuple[int, bytes]]) -> tuple[int, int, int]:
    """(line count, longest line's bytes, its line number) in one pass."""
    count = longest = longest_at = 0
    for number, line in lines:
        count += 1
        if len(line) > longest:
            longest, longest_at = len(line), number
    return count, longest, longest_at
