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
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NotRequired, TypedDict, Unpack

from routing.callbacks import CallbackSpec
from routing.decide.backoff import RetryPolicy, next_delay_s
from routing.models import ErrorInfo
from routing.sinks import DeliveryError, Sink, canonical_payload
from routing.store.lanes import LaneStore

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
) -> dict[str, Outcome]:
    """Deliver many in a few round trips: claim, read, send each to its sink, mark delivered.

    Requests not due (or held by another worker) are left out of the answer.
    """
    attempts = st.claim_deliveries(request_ids, lease_s=lease_s, now=now)
    rows = st.finished_many(list(attempts))
    outcomes: dict[str, Outcome] = {}
    done: list[str] = []
    for rid, attempt in attempts.items():
        if rid not in rows:
            outcomes[rid] = Outcome("gone", attempt)
            continue
        prepared, result = rows[rid]
        spec = prepared.callback
        if spec is not None:
            try:
                sinks(spec).deliver(result, canonical_payload(result))
            except Exception as exc:
                err = _as_delivery_error(exc, spec.kind)
                outcomes[rid] = _failed(st, rid, err, attempt, max_attempts, policy, now, rng)
                continue
        done.append(rid)
        outcomes[rid] = Outcome("delivered", attempt)
    st.delivered_many(done, now=now)
    return outcomes


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
