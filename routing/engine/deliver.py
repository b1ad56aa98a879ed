"""Delivery: hand a finished request's result to the sink its callback names.

Delivery is at-least-once: the outbox in the store, not a message, is what makes it durable
(the sweeper re-sends anything overdue), and each sink applies a result once per request id.

    sink raises             what happens
    ---------------------   ------------------------------------------------------------------
    nothing                 delivered
    retryable error         back in the outbox after the shared backoff (Retry-After a floor);
                            after ``max_attempts`` tries, a dead letter
    non-retryable error     a dead letter at once (4xx, refused address, too large, ...)

A dead letter keeps the result stored and the last error beside it; ``mixbatch dlq replay``
puts it back in the outbox.

A batch claims its deliveries under one lease and keeps each one's lease alive until it is
attempted (``run_deliveries``), so a slow receiver early in a batch never leaves the others to
be sent twice; each webhook delivery has a total deadline (``routing.sinks.deadline``).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NotRequired, TypedDict, Unpack

from routing.callbacks import CallbackSpec
from routing.decide.backoff import RetryPolicy, next_delay_s
from routing.faults import fault_point
from routing.models import ErrorInfo
from routing.sinks import DeliveryError, Sink, canonical_payload
from routing.store.lanes import LaneStore
from routing.store.outbox import renew_deliveries

log = logging.getLogger(__name__)

DELIVERY_POLICY = RetryPolicy(max_tries=100, base_s=2.0, cap_s=600.0)

SinkFactory = Callable[[CallbackSpec], Sink]


@dataclass(frozen=True)
class Outcome:
    """What one delivery attempt did; ``retry_in_s`` is set when it was rescheduled."""

    status: str
    attempt: int | None = None
    error: ErrorInfo | None = None
    retry_in_s: float | None = None


def _as_delivery_error(exc: Exception, sink: str) -> DeliveryError:
    """Anything a sink did not translate is a bug or an outage we cannot name: retry it."""
    if isinstance(exc, DeliveryError):
        return exc
    return DeliveryError(
        f"{type(exc).__name__}: {exc}", sink=sink, retryable=True, code="delivery_failed"
    )


class DeliveryOptions(TypedDict):
    """``run_deliveries``' keyword arguments, for ``run_delivery`` to pass on."""

    sinks: SinkFactory
    max_attempts: int
    lease_s: float
    now: float
    policy: NotRequired[RetryPolicy]
    rng: NotRequired[random.Random | None]
    clock: NotRequired[Callable[[], float]]


def run_delivery(st: LaneStore, request_id: str, **options: Unpack[DeliveryOptions]) -> Outcome:
    """One delivery attempt of ``request_id``, if it is due and nobody else holds it."""
    return run_deliveries(st, [request_id], **options).get(request_id, Outcome("not due"))


def run_deliveries(
    st: LaneStore,
    request_ids: Sequence[str],
    *,
    sinks: SinkFactory,
    max_attempts: int,
    lease_s: float,
    now: float,
    policy: RetryPolicy = DELIVERY_POLICY,
    rng: random.Random | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> dict[str, Outcome]:
    """Deliver many in a few round trips: claim, read, send each to its sink, mark delivered.

    Requests not due (or held by another worker) are left out of the answer. Every delivery is
    attempted inside a live lease of its own: when a slow sink has used half the lease, what
    is still to be sent is renewed (fenced: one another worker took meanwhile is left to it,
    ``lost``). A target that timed out or could not be reached is not tried again in the same
    batch: its other deliveries are rescheduled with that error, so one slow receiver costs a
    batch one deadline, not one per delivery. ``clock`` measures the batch's elapsed time;
    ``now`` is its start on the store's clock.
    """
    batch = _Batch(st, lease_s, now, clock)
    attempts = st.claim_deliveries(request_ids, lease_s=lease_s, now=now)
    rows = st.finished_many(list(attempts))
    batch.held = {rid: attempts[rid] for rid in attempts if rid in rows}
    outcomes = {rid: Outcome("gone", n) for rid, n in attempts.items() if rid not in rows}
    down: dict[str, DeliveryError] = {}
    for rid, attempt in attempts.items():
        if rid not in batch.keep_leases(outcomes):
            continue
        prepared, result = rows[rid]
        spec = prepared.callback
        if spec is not None:
            target = spec.model_dump_json()
            try:
                if target in down:
                    raise _not_tried(down[target])
                sinks(spec).deliver(result, canonical_payload(result))
            except Exception as exc:
                err = _as_delivery_error(exc, getattr(spec, "kind", "sink"))
                if err.retryable and err.code in UNREACHABLE:
                    down.setdefault(target, err)
                batch.held.pop(rid)
                at = batch.now()
                outcomes[rid] = _failed(st, rid, err, attempt, max_attempts, policy, at, rng)
                continue
            fault_point("deliver")  # written, not yet marked: the sink sees it again
        batch.held.pop(rid)
        batch.done.append(rid)
        outcomes[rid] = Outcome("delivered", attempt)
    batch.flush()
    return outcomes


#: Errors that cost a target its other deliveries in the same batch (each would wait as long).
UNREACHABLE = frozenset(
    {
        "timeout",
        "connect_failed",
        "dns",
        "sql_unavailable",
        "redis_unavailable",
        "broker_unavailable",
    }
)


def _not_tried(first: DeliveryError) -> DeliveryError:
    return DeliveryError(
        f"not tried: the same target failed earlier in this batch ({first})",
        sink=first.sink,
        retryable=True,
        code=first.code,
    )


class _Batch:
    """One batch's leases: what it still holds (id -> the attempt its claim returned), what it
    delivered but has not marked yet, and the lease they share."""

    def __init__(self, st: LaneStore, lease_s: float, now: float, clock: Callable[[], float]):
        self.st = st
        self.lease_s = lease_s
        self.started = now
        self.lease_until = now + lease_s
        self.clock = clock
        self.t0 = clock()
        self.held: dict[str, int] = {}
        self.done: list[str] = []

    def now(self) -> float:
        return self.started + (self.clock() - self.t0)

    def keep_leases(self, outcomes: dict[str, Outcome]) -> dict[str, int]:
        """What is still held, its leases renewed first when less than half is left."""
        at = self.now()
        if self.held and self.lease_until - at < self.lease_s / 2:
            self.flush()
            renewed = at + self.lease_s
            kept = renew_deliveries(
                self.st, self.held, lease_until=self.lease_until, new_lease_until=renewed
            )
            for rid in self.held.keys() - kept:
                outcomes[rid] = Outcome("lost", self.held[rid])
                log.warning("delivery lease lost", extra={"request_id": rid})
            self.held = {rid: n for rid, n in self.held.items() if rid in kept}
            self.lease_until = renewed
        return self.held

    def flush(self) -> None:
        """Mark what was delivered, while its lease still holds."""
        if self.done:
            self.st.delivered_many(self.done, now=self.now())
            self.done = []


def _failed(
    st: LaneStore,
    request_id: str,
    err: DeliveryError,
    attempt: int,
    max_attempts: int,
    policy: RetryPolicy,
    now: float,
    rng: random.Random | None,
) -> Outcome:
    info = err.to_error_info()
    delay = next_delay_s(err, attempt, policy, rng)
    extra = {"request_id": request_id, "attempt": attempt, "sink": err.sink, "code": err.code}
    if delay is None or attempt >= max_attempts:
        if err.retryable:
            info = info.model_copy(
                update={"message": f"{info.message} (gave up after {attempt} delivery attempts)"}
            )
        st.dlq.add(request_id, info, now=now)
        log.warning("dead-lettered", extra=extra)
        return Outcome("dead letter", attempt, info)
    st.retry_delivery(request_id, info, due_at=now + delay)
    log.info("delivery retry", extra={**extra, "delay_s": round(delay, 3)})
    return Outcome("retry", attempt, info, delay)
