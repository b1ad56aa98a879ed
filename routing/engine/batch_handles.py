"""What the provider batch route's steps are handed: the stores, the adapters, the clock.

Every step of ``routing.engine.batch`` and ``routing.engine.batch_collect`` takes a
``BatchHandles``, so a test drives a step with a real Redis, a real adapter against the sandbox
and a clock it advances, and a crash can be injected between two steps. The Celery tasks build
the handles from the process's own (``tasks.batch``).

The price table is the service's, so the handles carry ``price`` (a request's cost from the
provider's usage) rather than the table.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from routing.decide.backoff import RetryPolicy, backoff_s
from routing.decide.options import RouteOptions
from routing.decide.planner import ANTHROPIC_CAPS, OPENAI_CAPS, BatchCaps
from routing.errors import MixbatchError
from routing.models import ErrorInfo, Prepared, Route, StoredResult
from routing.providers.batch import BatchAdapter
from routing.states import BATCH_HELD, State
from routing.store.batches import BatchRegistry
from routing.store.lanes import LaneStore
from routing.store.ledger import Cost
from routing.store.observations import ObservationStore

__all__ = [
    "BatchHandles",
    "BatchSettings",
    "Holders",
    "batch_caps",
    "beating",
    "fail",
    "held",
    "poll_delay_s",
    "requeue",
]

log = logging.getLogger(__name__)

#: Each look at a running batch waits this much longer than the one before.
POLL_GROWTH = 1.5
#: Beats per grace: a worker renews what it works on this many times before it could look dead.
BEATS_PER_GRACE = 4

#: Request id -> (request, state, lease token), as ``LaneStore.holders`` reads them.
Holders = Mapping[str, tuple[Prepared, State, str]]


@dataclass(frozen=True, slots=True)
class BatchSettings:
    """The settings the batch route reads, as plain values (``routing`` never reads config)."""

    target_bytes: int
    max_wait_s: float
    flush_interval_s: float
    poll_interval_s: float
    poll_max_interval_s: float
    delete_files: bool
    submit_windows: tuple[str, ...] = ()
    #: A take or an intent whose worker has not beaten for this long is reconciled.
    intent_grace_s: float = 60.0
    #: How long one collector holds a finished batch before another may take it over.
    collect_lease_s: float = 300.0


@dataclass(frozen=True, slots=True)
class BatchHandles:
    """The stores, adapters and functions one step of the batch route works with.

    ``adapter`` gives the batch adapter of a provider account; ``options`` the learned route
    options at a time; ``dispatch`` sends finished requests to delivery; ``clock`` is the only
    time the steps read; ``failed_price`` what a failed line is billed.
    """

    store: LaneStore
    registry: BatchRegistry
    adapter: Callable[[str], BatchAdapter]
    observations: ObservationStore
    options: Callable[[float], RouteOptions]
    price: Callable[[Prepared, str, Route, Mapping[str, Any] | None], Cost]
    dispatch: Callable[[list[str]], None]
    settings: BatchSettings
    clock: Callable[[], float] = time.time
    #: USD a failed line of (provider, model) with this usage is billed: non-zero only where
    #: the account bills failed lines (``routing.decide.cost.failed_cost``); None bills none.
    failed_price: Callable[[str, str, Mapping[str, Any]], float] | None = None


def batch_caps(adapter: BatchAdapter) -> BatchCaps:
    """The protocol's caps, narrowed by what the account itself allows."""
    cap = adapter.capabilities
    base = ANTHROPIC_CAPS if cap.protocol == "anthropic" else OPENAI_CAPS
    return base.model_copy(
        update={
            "max_lines": min(base.max_lines, cap.max_lines),
            "max_bytes": min(base.max_bytes, cap.max_bytes),
            "max_line_bytes": cap.max_line_bytes,
        }
    )


def poll_delay_s(settings: BatchSettings, polls: int) -> float:
    """Seconds until the next look at a batch already polled ``polls`` times.

    The retry policy's exponential backoff, without jitter: a batch's polls are spread by
    when it was created, not by a herd of failures.
    """
    policy = RetryPolicy(
        base_s=min(settings.poll_interval_s, settings.poll_max_interval_s),
        cap_s=settings.poll_max_interval_s,
        multiplier=POLL_GROWTH,
        jitter=0.0,
    )
    return backoff_s(polls + 1, policy)


def held(holders: Holders, request_id: str, token: str) -> bool:
    """Whether a batch may still answer the request: batch-held, under the batch's token."""
    found = holders.get(request_id)
    return found is not None and found[1] in BATCH_HELD and found[2] == token


def fail(h: BatchHandles, request_id: str, token: str, info: ErrorInfo) -> None:
    """FAILED with ``info``, and delivered, unless the request is no longer ours."""
    result = StoredResult(status_code=info.status_code, error=info)
    if h.store.finish(request_id, token, State.FAILED, result, now=h.clock()):
        h.dispatch([request_id])


def requeue(h: BatchHandles, request_id: str, token: str, info: ErrorInfo) -> State | None:
    """Back to its lane; a request out of attempts is FAILED and delivered instead."""
    state = h.store.requeue(request_id, token, info, now=h.clock())
    if state is State.FAILED:
        h.dispatch([request_id])
    return state


@contextmanager
def beating(
    h: BatchHandles,
    *,
    takes: Iterable[str] = (),
    intents: Iterable[str] = (),
    reaping: Iterable[str] = (),
) -> Iterator[None]:
    """Renew, from a thread, the beat of what the block works on, so that only a dead worker's
    take or intent looks stale: an upload may take longer than the grace, a step cannot beat
    in the middle of it. A failed renewal is logged; the next one may succeed.
    """
    names = {"takes": list(takes), "intents": list(intents), "reaping": list(reaping)}
    stop = threading.Event()
    every_s = h.settings.intent_grace_s / BEATS_PER_GRACE

    def run() -> None:
        while not stop.wait(every_s):
            try:
                h.registry.beat(h.clock(), **names)
            except MixbatchError as exc:
                log.warning("batch beat failed", extra={"error": str(exc), **names})

    thread = threading.Thread(target=run, name="mixbatch-batch-beat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
