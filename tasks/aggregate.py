"""``mixbatch.aggregate`` (beat, every 2 s): claim what waits, choose routes, dispatch groups."""

from __future__ import annotations

import logging
import time

from config import app
from config.settings import get_settings
from routing.engine.aggregate import chunks, lane_ranks, route_claimed
from routing.models import Claimed, Route
from tasks.batch import stage
from tasks.deliver import dispatch
from tasks.explain import learned_options, record_decisions
from tasks.gpu import gpu_batch
from tasks.realtime import realtime
from tasks.runtime import service_config, store

log = logging.getLogger(__name__)


@app.task(name="mixbatch.aggregate", acks_late=False, ignore_result=True)
def aggregate() -> dict[str, int]:
    """Claim up to ``max_inflight`` leased requests, most urgent lanes first, and dispatch.

    Never claims more than workers can start within a lease: what is claimed but not yet
    started counts against ``max_inflight``, so a backlog stays in the lanes (durable, ordered
    by deadline) rather than in Celery queues.
    """
    s, st, lanes = get_settings(), store(), service_config().by_priority()
    end = time.monotonic() + s.aggregate_budget_s
    dispatched = 0
    while time.monotonic() < end:
        room = s.max_inflight - st.leased_count([spec.name for spec in lanes])
        if room <= 0:
            break
        claimed = st.claim_lanes(lanes, min(room, s.claim_batch), lease_s=s.lease_s)
        dispatch(claimed.failed)  # stored requests that could not be read: failed, delivered
        if not claimed:
            if claimed.failed:
                continue
            break
        now = time.time()
        chosen, groups = route_claimed(claimed, now, learned_options(now))
        record_decisions(chosen)  # kept for `mixbatch explain`
        for (route, provider, model), items in groups.items():
            if route == Route.BATCH.value:
                stage(items, provider, now)
            else:
                _send(route, provider, model, items)
        dispatched += len(claimed)
        log.info("aggregated", extra={"claimed": len(claimed), "groups": len(groups)})
    return {"dispatched": dispatched}


def _send(route: str, provider: str, model: str, items: list[Claimed]) -> None:
    """Realtime or local groups, in messages of the route's chunk size, urgent lanes first."""
    s, rank = get_settings(), lane_ranks(service_config().by_priority())
    local = route == Route.GPU.value
    for chunk in chunks(items, s.gpu_chunk if local else s.realtime_chunk):
        pairs = [[c.id, c.token] for c in chunk]
        options = {
            "priority": min(rank[c.request.lane] for c in chunk),
            "argsrepr": f"provider={provider} model={model} n={len(chunk)} first={chunk[0].id}",
        }
        if local:
            gpu_batch.apply_async(args=[pairs], **options)
        else:
            realtime.apply_async(args=[provider, pairs, route], **options)
