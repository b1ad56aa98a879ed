"""When a sandbox batch does what: sandbox time, a batch's timeline, and which lines fail.

A batch's whole life is fixed the moment it is created, and changed once more at most, when it
is cancelled. Every GET then only reads the plan at the current sandbox time, so statuses and
counts can only move forward, no background thread is needed, and knobs changed later never
rewrite a batch already running. Everything here is a pure function of its arguments except
:class:`SandboxClock`, so tests can predict exactly which line fails and when a batch ends.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from routing.sandbox.knobs import Knobs

WINDOW_S = 24 * 3600
"""The completion window of both providers: a batch not done 24 h after creation expires."""

FINALIZING_SHARE = 0.1
"""Share of an OpenAI batch's running time spent finalizing, after its last line ran."""

INVALID_STATUS = 400
SERVER_ERROR_STATUS = 500


class Phase(StrEnum):
    """A batch's phase, named as OpenAI names its statuses; Anthropic's three map onto these."""

    VALIDATING = "validating"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


TERMINAL_PHASES = frozenset({Phase.FAILED, Phase.COMPLETED, Phase.EXPIRED, Phase.CANCELLED})
OPENAI_CANCELLABLE = frozenset({Phase.VALIDATING, Phase.IN_PROGRESS})
ANTHROPIC_CANCELLABLE = frozenset({Phase.IN_PROGRESS, Phase.FINALIZING})
"""Anthropic shows a stuck (finalizing) batch as ``in_progress``, which its API lets you cancel."""


class SandboxClock:
    """Sandbox time: real time run ``time_scale`` times faster, and never going backwards.

    The clock accumulates: each reading adds the real time elapsed since the previous one at the
    current scale, so changing ``time_scale`` bends the clock instead of making it jump. Read it
    just before a scale change (``SandboxState.update_knobs`` does) to bank the time elapsed at
    the old rate. It starts at the wall-clock time, so timestamps look like real ones.
    """

    def __init__(
        self,
        scale: Callable[[], float],
        *,
        start: float | None = None,
        real: Callable[[], float] = time.monotonic,
    ) -> None:
        self._scale = scale
        self._real = real
        self._lock = threading.Lock()
        self._last_real = real()
        self._now = time.time() if start is None else start

    def now(self) -> float:
        with self._lock:
            real = self._real()
            self._now += max(0.0, real - self._last_real) * self._scale()
            self._last_real = real
            return self._now


def unit_hash(*parts: object) -> float:
    """A uniform number in [0, 1) fixed by ``parts``: stable across runs and processes."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def line_fault(seed: int, custom_id: str, attempt: int, rate: float) -> int | None:
    """The HTTP status a batch line fails with (400 or 500), or None when it is answered.

    A share ``rate`` of custom_ids fails on its first attempt, chosen by a hash of the seed and
    the custom_id: the lower half of that share with 400 (a bad request, which fails again on
    every attempt, so a client must not retry it), the upper half with 500 (a transient server
    error: each later attempt fails again only with probability ``rate``, so retrying works).
    ``attempt`` counts earlier batch lines with the same custom_id since the sandbox was reset.
    """
    draw = unit_hash("line", seed, custom_id)
    if draw < rate / 2:
        return INVALID_STATUS
    if draw < rate and (attempt == 0 or unit_hash("retry", seed, custom_id, attempt) < rate):
        return SERVER_ERROR_STATUS
    return None


def finish_ranks(batch_id: str, custom_ids: Sequence[str]) -> list[int]:
    """The order in which a batch's lines finish: shuffled by a hash, as providers do.

    Results come back in this order, not the input order, so a client that joins results by
    position rather than by custom_id is caught by the sandbox too.
    """
    order = sorted(
        range(len(custom_ids)), key=lambda i: unit_hash("order", batch_id, custom_ids[i])
    )
    ranks = [0] * len(custom_ids)
    for rank, index in enumerate(order):
        ranks[index] = rank
    return ranks


@dataclass(frozen=True)
class Plan:
    """A batch's timeline in sandbox seconds; None marks a moment the batch never reaches.

    ``finish_at`` holds, per line in input order, the moment the line has run (``inf``: never).
    A line runs only if it finishes before the batch is cut short by expiry or a cancel.
    """

    created_at: float
    started_at: float
    expires_at: float
    finish_at: tuple[float, ...]
    failed: bool = False
    finalizing_at: float | None = None
    completed_at: float | None = None
    expired_at: float | None = None
    cancel_at: float | None = None
    cancelling_s: float = 0.0

    def phase(self, now: float) -> Phase:
        if self.cancel_at is not None and now >= self.cancel_at:
            if now >= self.cancel_at + self.cancelling_s:
                return Phase.CANCELLED
            return Phase.CANCELLING
        if now < self.started_at:
            return Phase.VALIDATING
        if self.failed:
            return Phase.FAILED
        if self.expired_at is not None:
            return Phase.EXPIRED if now >= self.expired_at else Phase.IN_PROGRESS
        if self.finalizing_at is None or now < self.finalizing_at:
            return Phase.IN_PROGRESS
        if self.completed_at is None or now < self.completed_at:
            return Phase.FINALIZING
        return Phase.COMPLETED

    def reached(self, moment: float | None, now: float) -> bool:
        """Whether the batch has passed ``moment`` by ``now``, a cancel having come first or not."""
        if moment is None or moment > now:
            return False
        return self.cancel_at is None or moment <= self.cancel_at

    @property
    def cancelled_at(self) -> float | None:
        return None if self.cancel_at is None else self.cancel_at + self.cancelling_s

    @property
    def ended_at(self) -> float | None:
        """When the batch reaches its terminal phase; None while it never will."""
        if self.cancel_at is not None:
            return self.cancelled_at
        if self.failed:
            return self.started_at
        return self.expired_at if self.expired_at is not None else self.completed_at

    def cutoff(self, now: float) -> float:
        """Lines that finish by this moment have run, as seen at ``now``."""
        limits = [now]
        if self.cancel_at is not None:
            limits.append(self.cancel_at)
        if self.expired_at is not None:
            limits.append(self.expired_at)
        return min(limits)

    def has_run(self, line: int, now: float) -> bool:
        return self.finish_at[line] <= self.cutoff(now)

    def cancelled(self, at: float) -> Plan:
        return dataclasses.replace(self, cancel_at=at)


def plan_batch(
    *,
    created_at: float,
    ranks: Sequence[int],
    knobs: Knobs,
    validating_s: float,
    finalizing_share: float,
    failed: bool = False,
) -> Plan:
    """The timeline of a batch created at ``created_at`` whose lines finish in ``ranks`` order.

    The lines run one after another, evenly spread over the running time: from the end of
    validation to the start of finalizing, ``batch_turnaround_s`` after creation in all. A batch
    that would not be done within the 24 h window expires: with ``batch_expire``, after only a
    ``batch_expire_done_fraction`` share of its lines ran; without it, when the turnaround is
    longer than the window, after the lines that fit. ``batch_stuck_finalizing`` holds a batch
    that would complete in finalizing for good.
    """
    started_at = created_at + validating_s
    expires_at = created_at + WINDOW_S
    base = Plan(
        created_at=created_at,
        started_at=started_at,
        expires_at=expires_at,
        finish_at=(),
        failed=failed,
        cancelling_s=knobs.batch_cancelling_s,
    )
    if failed:
        return base
    count = len(ranks)
    ended_at = max(created_at + knobs.batch_turnaround_s, started_at)
    finalizing_at = ended_at - (ended_at - started_at) * finalizing_share
    if knobs.batch_expire:
        done = math.floor(count * knobs.batch_expire_done_fraction)
        span = expires_at - started_at
        finish = [started_at + (r + 1) / count * span if r < done else math.inf for r in ranks]
        return dataclasses.replace(base, finish_at=tuple(finish), expired_at=expires_at)
    span = finalizing_at - started_at
    finish = [started_at + (r + 1) / count * span for r in ranks]
    if finalizing_at > expires_at:
        return dataclasses.replace(base, finish_at=tuple(finish), expired_at=expires_at)
    return dataclasses.replace(
        base,
        finish_at=tuple(finish),
        finalizing_at=finalizing_at,
        completed_at=None if knobs.batch_stuck_finalizing else ended_at,
    )
