"""The sandbox server's mutable state: knobs, counters and the fault decisions.

Free of starlette so the fault rules can be reasoned about and tested without HTTP. One
``SandboxState`` backs one app; the knobs object is shared live with whoever started the server,
and the counters are read from other threads, hence the lock.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

from routing.sandbox.batch_plan import SandboxClock
from routing.sandbox.batch_store import BatchStore
from routing.sandbox.knobs import Knobs

TIMEOUT = "timeout"
HEADER_LATENCY = "x-sandbox-latency-ms"
HEADER_FAULT = "x-sandbox-fault"
HEADER_FAIL_FIRST = "x-sandbox-fail-first"

_PAUSE_STEP_S = 0.05


class BadSandboxHeader(ValueError):
    """A fault-injection header the sandbox cannot read; names the header."""

    def __init__(self, header: str, message: str) -> None:
        self.header = header
        super().__init__(message)


def parse_fault(value: str) -> str:
    """A fault kind from a header: ``"timeout"`` or an HTTP error status such as ``"429"``."""
    kind = value.strip().lower()
    if kind == TIMEOUT:
        return kind
    if kind.isdigit() and 400 <= int(kind) <= 599:
        return str(int(kind))
    raise BadSandboxHeader(HEADER_FAULT, f"{HEADER_FAULT} must be 'timeout' or a status 400-599")


def _parse_count(header: str, value: str) -> int:
    if not value.strip().isdigit():
        raise BadSandboxHeader(header, f"{header} must be a non-negative integer")
    return int(value)


def body_key(endpoint: str, body: object) -> str:
    """Identity of a call for fail-first counting: the same body retried has the same key."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(f"{endpoint}\n{canonical}".encode()).hexdigest()


class SandboxState:
    """Knobs, per-endpoint call counts, injected faults and the seeded fault generator.

    Also the batch protocols' files and batches, and the sandbox clock they run on. Batch 429s
    draw from a generator of their own, so turning ``batch_rate_429`` on does not shift the
    fault sequence the synchronous endpoints see.
    """

    def __init__(self, knobs: Knobs | None = None) -> None:
        self.knobs = knobs if knobs is not None else Knobs()
        self.is_closing: Callable[[], bool] = lambda: False
        self._lock = threading.Lock()
        self._calls: Counter[str] = Counter()
        self._faults: Counter[str] = Counter()
        self._seen: Counter[str] = Counter()
        self._rng = random.Random(self.knobs.seed)
        self._rng_seed = self.knobs.seed
        self._batch_rng = random.Random(f"batch-429:{self.knobs.seed}")
        self._batch_rng_seed = self.knobs.seed
        self.clock = SandboxClock(lambda: self.knobs.time_scale)
        self.batches = BatchStore()

    def record_call(self, endpoint: str) -> None:
        with self._lock:
            self._calls[endpoint] += 1

    def latency_s(self, headers: Mapping[str, str]) -> float:
        """This call's added delay: the header's if given, else the knob's."""
        given = headers.get(HEADER_LATENCY)
        millis = self.knobs.latency_ms if given is None else _parse_count(HEADER_LATENCY, given)
        return millis / 1000

    def _draw(self) -> float:
        """One uniform draw per call, reseeded when the seed knob changes."""
        if self.knobs.seed != self._rng_seed:
            self._rng = random.Random(self.knobs.seed)
            self._rng_seed = self.knobs.seed
        return self._rng.random()

    def choose_fault(self, endpoint: str, body: object, headers: Mapping[str, str]) -> str | None:
        """The fault to inject into this call, or None to answer it; records what it chose.

        Headers, when present, decide the call alone; otherwise the fail-first knob, then the
        seeded rates. The draw happens on every call so the sequence does not depend on them.
        """
        header_fault = headers.get(HEADER_FAULT)
        header_fail_first = headers.get(HEADER_FAIL_FIRST)
        fault_kind = parse_fault(header_fault) if header_fault is not None else None
        fail_first = (
            _parse_count(HEADER_FAIL_FIRST, header_fail_first)
            if header_fail_first is not None
            else None
        )
        key = body_key(endpoint, body)
        knobs = self.knobs
        with self._lock:
            seen = self._seen[key]
            self._seen[key] += 1
            draw = self._draw()
            chosen: str | None
            if fail_first is not None:
                chosen = (fault_kind or "429") if seen < fail_first else None
            elif fault_kind is not None:
                chosen = fault_kind
            elif seen < knobs.fail_first:
                chosen = str(knobs.fail_first_status)
            elif draw < knobs.rate_429:
                chosen = "429"
            elif draw < knobs.rate_429 + knobs.rate_500:
                chosen = "500"
            elif draw < knobs.rate_429 + knobs.rate_500 + knobs.rate_timeout:
                chosen = TIMEOUT
            else:
                chosen = None
            if chosen is not None:
                self._faults[chosen] += 1
        return chosen

    def choose_flex_shed(self) -> str | None:
        """Whether this flex call is shed: "429" (OpenAI), "498" (Groq) or None to answer it."""
        with self._lock:
            draw = self._draw()
            knobs = self.knobs
            shed = (
                "429"
                if draw < knobs.flex_rate_429
                else "498"
                if draw < knobs.flex_rate_429 + knobs.flex_rate_498
                else None
            )
            if shed is not None:
                self._faults[f"flex_{shed}"] += 1
        return shed

    def choose_batch_429(self) -> bool:
        """Whether this batch create or file upload gets a 429 (knob ``batch_rate_429``)."""
        with self._lock:
            if self.knobs.seed != self._batch_rng_seed:
                self._batch_rng = random.Random(f"batch-429:{self.knobs.seed}")
                self._batch_rng_seed = self.knobs.seed
            limited = self._batch_rng.random() < self.knobs.batch_rate_429
            if limited:
                self._faults["429"] += 1
        return limited

    async def pause(self, seconds: float) -> None:
        """Sleep without blocking other requests, cut short when the server is stopping."""
        deadline = time.monotonic() + seconds
        while not self.is_closing():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            await asyncio.sleep(min(left, _PAUSE_STEP_S))

    def update_knobs(self, changes: Mapping[str, Any]) -> Knobs:
        """Apply a partial update atomically: all fields valid, or nothing changes.

        The clock is read first, so sandbox time elapsed so far counts at the old ``time_scale``.
        """
        merged = Knobs.model_validate({**self.knobs.model_dump(), **changes})
        self.clock.now()
        for name in changes:
            setattr(self.knobs, name, getattr(merged, name))
        return self.knobs

    def stats(self) -> dict[str, Any]:
        batches = self.batches.stats(self.clock.now())
        with self._lock:
            return {
                "sandbox": True,
                "total_calls": sum(self._calls.values()),
                "calls_by_endpoint": dict(self._calls),
                "faults_total": sum(self._faults.values()),
                "faults_by_kind": dict(self._faults),
                "distinct_bodies": len(self._seen),
                "batches": batches,
            }

    def reset(self) -> None:
        """Forget counters, fail-first history, files and batches; restart the fault sequences.

        The sandbox clock keeps running: sandbox time never goes backwards.
        """
        with self._lock:
            self._calls.clear()
            self._faults.clear()
            self._seen.clear()
            self._rng = random.Random(self.knobs.seed)
            self._rng_seed = self.knobs.seed
            self._batch_rng = random.Random(f"batch-429:{self.knobs.seed}")
            self._batch_rng_seed = self.knobs.seed
        self.batches.reset()
