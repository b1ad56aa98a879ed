"""``mixbatch.sweep`` (beat, every 10 s): reclaim expired leases, apply deadline policy,
re-send deliveries whose message was lost, and forget index entries and dead letters whose
results expired. This is what makes a lost Celery message harmless, and Redis bounded."""

from __future__ import annotations

import time

from config import app
from routing.engine.sweep import sweep as sweep_lanes
from tasks.deliver import dispatch
from tasks.runtime import service_config, store


@app.task(name="mixbatch.sweep", acks_late=False, ignore_result=True)
def sweep() -> dict[str, int]:
    return sweep_lanes(store(), service_config().lanes, time.time(), dispatch)
