"""``mixbatch.deliver``: hand a finished request's result to the sink its callback names.

Delivery is at-least-once: the outbox in the store, not this message, is what makes it durable
(the sweeper re-sends anything overdue), and each sink applies a result once per request id.
``run_delivery`` holds the policy and takes the store and the sink factory as arguments, so it
is tested against a real Redis without a worker; the task only wires in this process's handles.

    sink raises             what happens
    ---------------------   ------------------------------------------------------------------
    nothing                 delivered
    retryable error         back in the outbox after the shared backoff (Retry-After a floor);
                            after ``MIXBATCH_DELIVERY_MAX_ATTEMPTS`` tries, a dead letter
    non-retryable error     a dead letter at once (4xx, refused address, too large, ...)

A dead letter keeps the result stored and the last error beside it; ``mixbatch dlq replay``
puts it back in the outbox.
"""

from __future__ import annotations

import functools
import logging
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from celery import signals

from config import app
from config.settings import get_settings
from routing.decide.backoff import RetryPolicy, next_delay_s
from routing.models import CallbackSpec, ErrorInfo
from routing.sinks import DeliveryError, Sink, SinkContext, canonical_payload, sink_for
from routing.sinks.settings import get_sink_settings
from routing.store.lanes import LaneStore
from tasks.runtime import store

log = logging.getLogger(__name__)

DELIVERY_POLICY = RetryPolicy(max_tries=100, base_s=2.0, cap_s=600.0)
#: Retries due sooner than this also get a Celery countdown; later ones wait for the sweeper.
#: Far below the broker's visibility timeout (DESIGN.md: no long ETAs on a Redis broker).
COUNTDOWN_MAX_S = 60.0

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


def run_delivery(
    st: LaneStore,
    request_id: str,
    *,
    sinks: SinkFactory,
    max_attempts: int,
    lease_s: float,
    policy: RetryPolicy = DELIVERY_POLICY,
    now: float | None = None,
    rng: random.Random | None = None,
) -> Outcome:
    """One delivery attempt of ``request_id``, if it is due and nobody else holds it."""
    outcomes = run_deliveries(
        st,
        [request_id],
        sinks=sinks,
        max_attempts=max_attempts,
        lease_s=lease_s,
        policy=policy,
        now=now,
        rng=rng,
    )
    return outcomes.get(request_id, Outcome("not due"))


def run_deliveries(
    st: LaneStore,
    request_ids: Sequence[str],
    *,
    sinks: SinkFactory,
    max_attempts: int,
    lease_s: float,
    policy: RetryPolicy = DELIVERY_POLICY,
    now: float | None = None,
    rng: random.Random | None = None,
) -> dict[str, Outcome]:
    """Deliver many in a few round trips: claim, read, send each to its sink, mark delivered.

    Requests not due (or held by another worker) are left out of the answer.
    """
    now = time.time() if now is None else now
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
        st.dead_letter(request_id, info, now=now)
        log.warning("dead-lettered", extra=extra)
        return Outcome("dead letter", attempt, info)
    st.retry_delivery(request_id, info, due_at=now + delay)
    log.info("delivery retry", extra={**extra, "delay_s": round(delay, 3)})
    return Outcome("retry", attempt, info, delay)


@functools.cache
def sink_context() -> SinkContext:
    """This process's sinks: one HTTP client, SQL pools and Redis clients, built lazily."""
    st = store()
    return SinkContext(get_sink_settings(), redis=st.redis, namespace=st.keys.ns, celery_app=app)


def reset() -> None:
    """Drop this process's sink handles: after fork, and between tests."""
    if sink_context.cache_info().currsize:
        sink_context().close()
    sink_context.cache_clear()


@signals.worker_process_init.connect
def _after_fork(**_: object) -> None:
    # The parent's sockets must not be shared with the child; open new ones lazily.
    sink_context.cache_clear()


#: Requests per ``deliver_many`` message: few messages, each done well within a lease.
DELIVER_CHUNK = 200


def dispatch(request_ids: Iterable[str]) -> None:
    """Send deliveries for finished requests, a chunk per message."""
    ids = list(request_ids)
    for i in range(0, len(ids), DELIVER_CHUNK):
        chunk = ids[i : i + DELIVER_CHUNK]
        deliver_many.apply_async(args=[chunk], argsrepr=f"n={len(chunk)} first={chunk[0]}")


def _deliver(request_ids: list[str]) -> dict[str, str]:
    s = get_settings()
    outcomes = run_deliveries(
        store(),
        request_ids,
        sinks=lambda spec: sink_for(spec, sink_context()),
        max_attempts=s.delivery_max_attempts,
        lease_s=s.delivery_lease_s,
    )
    for rid, outcome in outcomes.items():
        if outcome.retry_in_s is not None and outcome.retry_in_s <= COUNTDOWN_MAX_S:
            deliver.apply_async(args=[rid], countdown=outcome.retry_in_s, argsrepr=f"id={rid}")
    return {rid: o.status for rid, o in outcomes.items()}


@app.task(name="mixbatch.deliver", acks_late=True, ignore_result=True)
def deliver(request_id: str) -> str:
    return _deliver([request_id]).get(request_id, "not due")


@app.task(name="mixbatch.deliver_many", acks_late=True, ignore_result=True)
def deliver_many(request_ids: list[str]) -> dict[str, int]:
    statuses = _deliver(request_ids)
    counts: dict[str, int] = {}
    for status in statuses.values():
        counts[status] = counts.get(status, 0) + 1
    return counts
