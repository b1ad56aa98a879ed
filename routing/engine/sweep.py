"""The sweep: reclaim expired leases, apply deadline policy, re-send lost deliveries, and forget
what expired.

What makes a lost Celery message harmless: a request whose worker died goes back to its lane
(its attempt counted), one whose lane expires overdue requests is dropped, and a finished
request whose deliver message vanished is sent again. What keeps Redis bounded: each lane's
index of finished requests and its dead letters are trimmed as their results expire.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from routing.models import ErrorInfo, LaneSpec
from routing.states import State
from routing.store.lanes import LaneStore

log = logging.getLogger(__name__)

#: A fresh outbox entry already has a deliver message on its way; only older ones are re-sent.
REDELIVER_GRACE_S = 5.0

LEASE_EXPIRED = ErrorInfo(
    code="lease_expired",
    message="the worker holding this request stopped (crashed or too slow) before finishing",
    retryable=True,
)
DEADLINE_EXPIRED = ErrorInfo(
    code="deadline_expired", message="the deadline passed while queued (lane policy: expire)"
)


def sweep(
    store: LaneStore,
    lanes: Sequence[LaneSpec],
    now: float,
    dispatch: Callable[[Sequence[str]], None],
) -> dict[str, int]:
    """One pass over every lane; counts of what it did to requests. ``dispatch`` sends
    deliveries. Index entries and dead letters whose results expired are forgotten as well
    (``LaneStore.trim``); how many is logged, not returned."""
    report = {"requeued": 0, "failed": 0, "expired": 0, "redelivered": 0}
    forgotten = 0
    store.dlq.adopt_legacy()  # dead letters an older version kept in one list for all lanes
    for lane in lanes:
        for rid in store.expired_leases(lane.name, now):
            state = store.requeue(rid, "*", LEASE_EXPIRED, now=now)
            if state is State.QUEUED:
                report["requeued"] += 1
            elif state is State.FAILED:
                report["failed"] += 1
        if lane.on_deadline == "expire":
            for rid in store.overdue_queued(lane.name, now):
                dropped, _ = store.drop(
                    rid, State.EXPIRED, DEADLINE_EXPIRED, from_states=(State.QUEUED,), now=now
                )
                report["expired"] += int(dropped)
        due = store.due_deliveries(lane.name, now - REDELIVER_GRACE_S)
        dispatch(due)
        report["redelivered"] += len(due)
        forgotten += sum(store.trim(lane.name, now))
    store.beat(now)
    if any(report.values()) or forgotten:
        log.info("swept", extra={**report, "forgotten": forgotten})
    return report
