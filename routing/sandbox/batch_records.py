"""What every part of the sandbox's batch store shares: a batch, its lines, pages, the error.

Free of starlette, like ``state.py``: the protocol modules (``batch_openai``,
``batch_anthropic``) turn these records into each provider's wire objects and result files, and
``batch_store`` keeps them over time. :class:`BatchRequestError` is what a call the provider
would refuse raises; the HTTP layer renders it in that provider's error shape.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from routing.sandbox import answers
from routing.sandbox.batch_plan import Phase, Plan

Protocol = Literal["openai", "anthropic"]
Result = Literal["succeeded", "errored", "expired", "canceled"]
RESULT_KINDS: tuple[Result, ...] = ("succeeded", "errored", "canceled", "expired")
INJECTED_NOTE = "(injected by the mixbatch sandbox: batch_line_fail_rate)"
"""Ends the message of every injected line failure, so no one takes it for a real provider's."""


class BatchRequestError(Exception):
    """A call the provider would refuse; rendered by the HTTP layer in the provider's shape."""

    def __init__(self, status: int, message: str, *, param: str | None = None) -> None:
        self.status = status
        self.message = message
        self.param = param
        super().__init__(message)


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex}"


def not_found(kind: str, object_id: str) -> BatchRequestError:
    return BatchRequestError(404, f"No such {kind} object: {object_id}")


@dataclass(frozen=True)
class Page:
    """One page of a listing, in listing order."""

    items: list[dict[str, Any]]
    has_more: bool

    @property
    def first_id(self) -> str | None:
        return self.items[0]["id"] if self.items else None

    @property
    def last_id(self) -> str | None:
        return self.items[-1]["id"] if self.items else None


@dataclass(frozen=True)
class BatchLine:
    """One request of a batch, with what will happen to it when it runs.

    ``fault`` is the status of an injected failure (see ``batch_plan.line_fault``); ``invalid``
    why the provider refuses the body, which only Anthropic reports per line (OpenAI fails the
    whole batch at validation instead).
    """

    custom_id: str
    body: Mapping[str, Any]
    fault: int | None = None
    invalid: answers.InvalidBody | None = None

    @property
    def fails(self) -> bool:
        return self.fault is not None or self.invalid is not None


@dataclass
class SandboxBatch:
    """One batch of either protocol: its input, its plan, and its results once it ended."""

    id: str
    seq: int
    protocol: Protocol
    endpoint: str
    lines: list[BatchLine]
    plan: Plan
    input_file_id: str | None = None
    metadata: dict[str, str] | None = None
    model: str | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)
    output_expires_after_s: float | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    results: bytes = b""
    result_counts: Counter[str] = field(default_factory=Counter)
    usage: dict[str, int] = field(default_factory=dict)

    def phase(self, now: float) -> Phase:
        return self.plan.phase(now)

    def run_counts(self, now: float) -> tuple[int, int]:
        """Lines that have run by ``now``: (answered, failed)."""
        cutoff = self.plan.cutoff(now)
        ran = [
            line for line, at in zip(self.lines, self.plan.finish_at, strict=True) if at <= cutoff
        ]
        failed = sum(line.fails for line in ran)
        return len(ran) - failed, failed


def jsonl_bytes(records: Iterable[Mapping[str, Any]]) -> bytes:
    return b"".join(json.dumps(r, separators=(",", ":")).encode("utf-8") + b"\n" for r in records)


def by_finish(batch: SandboxBatch) -> list[int]:
    """The indexes of ``batch``'s lines in the order they finish, as result files list them."""
    return sorted(range(len(batch.lines)), key=lambda i: batch.plan.finish_at[i])
