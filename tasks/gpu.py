"""``mixbatch.gpu_batch``: the local route, run by the worker on the ``gpu`` queue. It runs with
the solo pool and prefetch 1 (``Procfile``: ``gpu``), so one process owns the device; every model
loads once, at start, and its measured throughput and queue wait go to the route choice after
each micro-batch and once a minute. No torch at import time: every service worker imports it."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING

from celery import signals

from config import app
from config.queues import GPU_QUEUE
from config.settings import get_settings
from routing.engine.claims import start_claimed
from routing.engine.local import local_requests, report, run_local, warm
from routing.engine.pricing import price_gpu
from routing.models import Claimed, Route
from tasks.deliver import dispatch
from tasks.runtime import local_models, observations, prices, service_config, store

if TYPE_CHECKING:
    from gpu_worker.engine import LocalAnswer
    from gpu_worker.registry import Registry

log = logging.getLogger(__name__)

HEARTBEAT_S = 60.0


def answer(models: Registry, started: Sequence[Claimed]) -> list[LocalAnswer]:
    """The local models' answers to started requests, in order; one whose lane expires late
    requests is dropped, not run, once its deadline passed (``expire_after``)."""
    from gpu_worker.engine import LocalRequest  # imports torch: only a gpu worker runs this

    return models.run(local_requests(started, service_config().lanes, LocalRequest))


@signals.worker_ready.connect
def _warm(**_: object) -> None:
    """A worker consuming the gpu queue loads every model at start, then reports every minute."""
    if GPU_QUEUE not in (app.amqp.queues.consume_from or {}):
        return
    log.info("local models warm", extra={"models": warm(local_models())})
    report(observations(), local_models())
    threading.Thread(target=_heartbeat, name="mixbatch-gpu-heartbeat", daemon=True).start()


def _heartbeat() -> None:
    """An idle worker still reports, so the route choice knows it is alive."""
    while True:
        time.sleep(HEARTBEAT_S)
        try:
            report(observations(), local_models())
        except Exception:
            log.warning("gpu heartbeat failed", exc_info=True)


@app.task(name="mixbatch.gpu_batch", acks_late=True, ignore_result=True)
def gpu_batch(items: list[list[str]]) -> dict[str, int]:
    """Answer one micro-batch on the local model, leases renewed meanwhile; priced by busy time."""
    st, s = store(), get_settings()
    started = start_claimed(st, items, route=Route.GPU, lease_s=s.lease_s, now=time.time())
    pricer = partial(price_gpu, prices(), s.route_gpu_usd_per_hour)
    run, drop = partial(answer, local_models()), local_models().cancel
    outcome = run_local(st, started, run, time.time, lease_s=s.lease_s, price=pricer, cancel=drop)
    dispatch(outcome.finished)
    report(observations(), local_models())
    return {"done": len(outcome.finished), "requeued": outcome.requeued}
