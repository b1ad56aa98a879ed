"""Celery wiring of the provider batch route; the steps are in ``routing.engine.batch``.

``batch_flush`` (beat) sends each group that is due to ``batch_submit``; ``batch_poll`` (beat)
reconciles, polls, hedges and collects. State lives in the registry and the lanes, so a lost or
repeated message neither loses nor doubles a request.
"""

from __future__ import annotations

from config import app
from config.settings import get_settings
from routing.decide.cost import failed_cost
from routing.engine import batch as engine
from routing.engine.batch_handles import BatchHandles, BatchSettings
from routing.models import Claimed, Route
from tasks import runtime
from tasks.deliver import dispatch
from tasks.explain import learned_options
from tasks.runtime import batch_adapter, observations, price, registry, service_config, store


def handles() -> BatchHandles:
    """This process's stores, adapters and settings, as the engine's steps take them."""
    s = get_settings()
    settings = BatchSettings(
        target_bytes=s.batch_target_bytes,
        max_wait_s=s.batch_max_wait_s,
        flush_interval_s=s.batch_flush_interval_s,
        poll_interval_s=s.batch_poll_interval_s,
        poll_max_interval_s=s.batch_poll_max_interval_s,
        delete_files=s.batch_delete_files,
        intent_grace_s=s.batch_intent_grace_s,
        collect_lease_s=s.batch_collect_lease_s,
        submit_windows=tuple(w for spec in service_config().lanes for w in spec.submit_windows),
    )
    return BatchHandles(
        store=store(),
        registry=registry(),
        adapter=batch_adapter,
        observations=observations(),
        options=learned_options,
        price=price,
        dispatch=dispatch,
        settings=settings,
        failed_price=lambda p, model, usage: failed_cost(
            runtime.prices(), p, model, usage, Route.BATCH
        ),
    )


def stage(claimed: list[Claimed], provider: str, now: float) -> int:
    """Hand claimed requests to the batch route (called by the aggregator)."""
    return engine.stage(handles(), claimed, provider, now)


@app.task(name="mixbatch.batch_flush", acks_late=False, ignore_result=True)
def batch_flush() -> dict[str, int]:
    """Send each waiting group whose time has come to ``batch_submit``."""
    due = engine.groups_due(handles())
    for group, why in due:
        batch_submit.apply_async(
            args=[group.gid], argsrepr=f"group={group.gid} n={group.count} why={why}"
        )
    return {"groups": len(due)}


@app.task(name="mixbatch.batch_submit", acks_late=True, ignore_result=True)
def batch_submit(gid: str) -> dict[str, int]:
    """Plan and create the provider batches of one waiting group."""
    return {"batches": engine.submit(handles(), gid)}


@app.task(name="mixbatch.batch_poll", acks_late=False, ignore_result=True)
def batch_poll() -> dict[str, int]:
    """Reconcile what dead workers left (takes, intents), then poll every batch that is due."""
    return engine.poll(handles())
