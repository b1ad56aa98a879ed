"""``mixbatch.gpu_batch``: the local route, run by the worker on the ``gpu`` queue.

The worker runs with the solo pool and prefetch 1 (``Procfile``: ``gpu``), so one process owns
the device; models are loaded and warmed once per process, at start for every configured model.
Each message carries a micro-batch of claimed requests (ids and lease tokens only); the task
re-reads them from the store, answers them through ``gpu_worker`` (which packs by token budget,
earliest deadline first, and splits on out-of-memory), stores each answer, and publishes the
engine's measured throughput and queue wait to Redis for the route choice.

This module must not import torch at import time: every service worker imports it.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from celery import signals

from config import app
from config.queues import GPU_QUEUE
from config.settings import get_settings
from routing.errors import ConfigError
from routing.models import Claimed, ErrorInfo, Route, StoredResult
from routing.states import State
from tasks.deliver import dispatch
from tasks.runtime import store

if TYPE_CHECKING:
    from gpu_worker.registry import Registry

log = logging.getLogger(__name__)

HEARTBEAT_S = 60.0
DEFAULT_MODELS_FILE = Path(__file__).resolve().parent.parent / "config" / "models.toml"


def models_file() -> Path:
    return getattr(get_settings(), "gpu_models_file", None) or DEFAULT_MODELS_FILE


@functools.cache
def served_models() -> frozenset[str]:
    """Names (aliases included) the local route serves, read without importing torch."""
    path = models_file()
    try:
        doc = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the local models table ({exc})") from None
    names: set[str] = set()
    for name, spec in doc.get("models", {}).items():
        names.add(name)
        names.update(spec.get("aliases", []) if isinstance(spec, dict) else [])
    return frozenset(names)


@functools.cache
def registry() -> Registry:
    import os

    from gpu_worker.registry import Registry

    return Registry.from_file(models_file(), os.environ.get("MIXBATCH_GPU_DEVICE") or None)


def stats_key() -> str:
    return f"{get_settings().namespace}:gpu:stats"


def publish_stats() -> None:
    """The engines' measured throughput and queue wait, for the route choice (TTL: stale = gone)."""
    from tasks.explain import observations

    st = store()
    reg = registry()
    stats = reg.stats()
    if not stats:
        return
    for model, values in stats.items():
        aliases = [name for name in reg.served() if reg.spec(name).name == model and name != model]
        observations().record_gpu(
            model,
            texts_per_s=values.get("texts_per_s"),
            queue_wait_s=values.get("queue_wait_s"),
            aliases=aliases,
        )
    now = time.time()
    pipe = st.redis.pipeline(transaction=False)
    for model, values in stats.items():
        pipe.hset(stats_key(), model, json.dumps({**values, "at": now}, default=str))
    pipe.expire(stats_key(), 600)
    pipe.execute()


def gpu_stats() -> dict[str, dict[str, Any]]:
    """What the gpu workers last published, by model."""
    raw = store().redis.hgetall(stats_key())
    return {k.decode(): json.loads(v) for k, v in raw.items()}


@signals.worker_ready.connect
def _warm(**_: object) -> None:
    """A worker consuming the gpu queue loads and warms every configured model once, at start."""
    if GPU_QUEUE not in (app.amqp.queues.consume_from or {}):
        return
    reg = registry()
    names = sorted({reg.spec(name).name for name in reg.served()})
    for name in names:
        reg.engine(name)
    log.info("local models warm", extra={"models": names})
    publish_stats()
    threading.Thread(target=_heartbeat, name="mixbatch-gpu-heartbeat", daemon=True).start()


def _heartbeat() -> None:
    """An idle worker still reports once a minute, so the route choice knows it is alive."""
    while True:
        time.sleep(HEARTBEAT_S)
        try:
            publish_stats()
        except Exception:
            log.warning("gpu heartbeat failed", exc_info=True)


@app.task(name="mixbatch.gpu_batch", acks_late=True, ignore_result=True)
def gpu_batch(items: list[list[str]]) -> dict[str, int]:
    """Answer one micro-batch of claimed requests on the local model."""
    from gpu_worker.engine import LocalRequest

    s, st, now = get_settings(), store(), time.time()
    holders = st.holders([rid for rid, _ in items])
    started: list[Claimed] = []
    candidates = [
        Claimed(id=rid, token=token, attempts=0, request=holders[rid][0])
        for rid, token in items
        if rid in holders and holders[rid][2] == token
    ]
    for claimed, ok in zip(
        candidates,
        st.start_many(candidates, state=State.RUNNING, route=Route.GPU, lease_s=s.lease_s, now=now),
        strict=True,
    ):
        if ok:
            started.append(claimed)
    if not started:
        return {"done": 0}
    requests = [
        LocalRequest(
            id=c.id,
            endpoint=c.request.endpoint.value,
            body=c.request.body,
            lane=c.request.lane,
            deadline=c.request.deadline,
        )
        for c in started
    ]
    answers = registry().run(requests)
    finishes: list[tuple[str, str, State, StoredResult]] = []
    requeued = 0
    for claimed, answer in zip(started, answers, strict=True):
        if answer.ok:
            body = answer.body or {}
            usage = body.get("usage")
            result = StoredResult(
                status_code=answer.status_code,
                body=body,
                usage=usage if isinstance(usage, dict) else None,
                provider="local",
                truncated=answer.truncated,
            )
            finishes.append((claimed.id, claimed.token, State.DONE, result))
            continue
        error = answer.error or {"code": "error", "message": "no answer"}
        info = ErrorInfo(
            code=error["code"],
            message=error["message"],
            retryable=answer.retryable,
            status_code=answer.status_code,
        )
        if answer.retryable:
            st.requeue(claimed.id, claimed.token, info)
            requeued += 1
            continue
        finishes.append(
            (
                claimed.id,
                claimed.token,
                State.FAILED,
                StoredResult(status_code=answer.status_code, error=info, provider="local"),
            )
        )
    won = st.finish_many(finishes)
    dispatch([rid for (rid, *_), ok in zip(finishes, won, strict=True) if ok])
    publish_stats()
    return {"done": sum(won), "requeued": requeued}
