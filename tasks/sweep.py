"""``mixbatch.sweep`` (beat, every 10 s): reclaim expired leases, apply deadline policy, and
re-send deliveries whose message was lost. This is what makes a lost Celery message harmless."""

from __future__ import annotations

import logging
import time

from config import app
from routing.models import ErrorInfo
from routing.states import State
from tasks.deliver import dispatch
from tasks.runtime import service_config, store

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


@app.task(name="mixbatch.sweep", acks_late=False, ignore_result=True)
def sweep() -> dict[str, int]:
    st, now = store(), time.time()
    report = {"requeued": 0, "failed": 0, "expired": 0, "redelivered": 0}
    for lane in service_config().lanes:
        for rid in st.expired_leases(lane.name, now):
            state = st.requeue(rid, "*", LEASE_EXPIRED, now=now)
            if state is State.QUEUED:
                report["requeued"] += 1
            elif state is State.FAILED:
                report["failed"] += 1
        if lane.on_deadline == "expire":
            for rid in st.overdue_queued(lane.name, now):
                dropped, _ = st.drop(
                    rid, State.EXPIRED, DEADLINE_EXPIRED, from_states=(State.QUEUED,), now=now
                )
                report["expired"] += int(dropped)
        due = st.due_deliveries(lane.name, now - REDELIVER_GRACE_S)
        dispatch(due)
        report["redelivered"] += len(due)
    st.beat(now)
    if any(report.values()):
        log.info("swept", extra=report)
    return report
