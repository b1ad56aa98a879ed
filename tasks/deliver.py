"""``mixbatch.deliver`` / ``mixbatch.deliver_many``: hand finished results to their sinks.

The policy (retries, dead letters) is ``routing.engine.deliver``; this module wires in this
process's store and sinks and schedules what comes next. A retry due soon also gets a Celery
countdown; a later one waits for the sweeper, which re-sends everything overdue.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from config import app
from config.settings import get_settings
from routing.engine.deliver import run_deliveries
from routing.sinks import sink_for
from tasks.runtime import sink_context, store

#: Retries due sooner than this also get a Celery countdown; later ones wait for the sweeper.
#: Far below the broker's visibility timeout: no long ETAs on a Redis broker.
COUNTDOWN_MAX_S = 60.0
#: Requests per ``deliver_many`` message: few messages, each done well within a lease.
DELIVER_CHUNK = 200


def dispatch(request_ids: Iterable[str]) -> None:
    """Send deliveries for finished requests, a chunk per message."""
    ids = list(request_ids)
    for i in range(0, len(ids), DELIVER_CHUNK):
        chunk = ids[i : i + DELIVER_CHUNK]
        deliver_many.apply_async(args=[chunk], argsrepr=f"n={len(chunk)} first={chunk[0]}")


def _deliver(request_ids: list[str]) -> dict[str, str]:
    s, sinks = get_settings(), sink_context()
    outcomes = run_deliveries(
        store(),
        request_ids,
        sinks=lambda spec: sink_for(spec, sinks),
        max_attempts=s.delivery_max_attempts,
        # each attempt starts with half a lease left: room for a webhook's whole deadline
        lease_s=max(s.delivery_lease_s, 3 * sinks.settings.webhook_timeout_s),
        now=time.time(),
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
