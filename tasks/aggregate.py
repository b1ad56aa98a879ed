"""``mixbatch.aggregate`` (beat, every 2 s): claim what waits, choose routes, dispatch groups."""

from __future__ import annotations

import logging
import time
from collections import defaultdict

from config import app
from config.settings import get_settings
from routing.decide.route import choose_route, group_key
from routing.models import Claimed, Route
from tasks.batch import stage
from tasks.explain import learned_options, record_decisions
from tasks.gpu import gpu_batch
from tasks.realtime import realtime
from tasks.runtime import service_config, store

log = logging.getLogger(__name__)


def _chunks(items: list[Claimed], size: int) -> list[list[Claimed]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


@app.task(name="mixbatch.aggregate", acks_late=False, ignore_result=True)
def aggregate() -> dict[str, int]:
    """Claim up to ``max_inflight`` leased requests, most urgent lanes first, and dispatch.

    Never claims more than workers can start within a lease: what is claimed but not yet
    started counts against ``max_inflight``, so a backlog stays in the lanes (durable, ordered
    by deadline) rather than in Celery queues.
    """
    s, st, cfg = get_settings(), store(), service_config()
    lanes = cfg.by_priority()
    rank = {spec.name: min(i * 3, 9) for i, spec in enumerate(lanes)}
    end = time.monotonic() + s.aggregate_budget_s
    dispatched = 0
    while time.monotonic() < end:
        room = s.max_inflight - st.leased_count([spec.name for spec in lanes])
        if room <= 0:
            break
        claimed = st.claim_lanes(lanes, min(room, s.claim_batch), lease_s=s.lease_s)
        if not claimed:
            break
        now = time.time()
        groups: dict[tuple[str, str, str], list[Claimed]] = defaultdict(list)
        options = learned_options(now)
        chosen = {c.id: choose_route(c.request, now, options) for c in claimed}
        for c in claimed:
            groups[group_key(c.request, chosen[c.id])].append(c)
        record_decisions(chosen)  # kept for `mixbatch explain`
        for (route, provider, model), items in groups.items():
            if route == Route.BATCH.value:
                stage(items, provider, now)
                continue
            if route == Route.GPU.value:
                for chunk in _chunks(items, s.gpu_chunk):
                    gpu_batch.apply_async(
                        args=[[[c.id, c.token] for c in chunk]],
                        priority=min(rank[c.request.lane] for c in chunk),
                        argsrepr=f"model={model} n={len(chunk)} first={chunk[0].id}",
                    )
                continue
            for chunk in _chunks(items, s.realtime_chunk):
                realtime.apply_async(
                    args=[provider, [[c.id, c.token] for c in chunk]],
                    priority=min(rank[c.request.lane] for c in chunk),
                    argsrepr=f"provider={provider} model={model} n={len(chunk)} first={chunk[0].id}",
                )
        dispatched += len(claimed)
        log.info("aggregated", extra={"claimed": len(claimed), "groups": len(groups)})
    return {"dispatched": dispatched}
