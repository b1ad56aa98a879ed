"""``mixbatch.enqueue`` and ``mixbatch.enqueue_many``: for producers that only have a Celery app
(``send_task``), such as an app's own beat schedule (``routing.contrib.common.enqueue_many_entry``).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from config import app
from routing.errors import InvalidRequest, LaneFull
from routing.models import Prepared, coerce_request, prepare
from tasks.runtime import service_config, store

log = logging.getLogger(__name__)


@app.task(name="mixbatch.enqueue", acks_late=True, ignore_result=True)
def enqueue(request: dict[str, Any]) -> dict[str, Any]:
    """Same fields as ``routing.client.Request``; idempotent on (tenant, custom_id)."""
    cfg = service_config()
    prepared = prepare(coerce_request(request), cfg, time.time())
    return store().submit_many([prepared], cfg)[0].model_dump()


@app.task(name="mixbatch.enqueue_many", acks_late=True, ignore_result=True)
def enqueue_many(requests: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Each item as ``mixbatch.enqueue`` takes it. A bad item is refused with its index and the
    field it got wrong, and the others are enqueued: a nightly job is not lost to one bad row.
    Returns ``{"tickets": [{"index", ...ticket}], "refused": [{"index", "field", "error"}]}``;
    idempotent on (tenant, custom_id), so a redelivered message enqueues nothing twice."""
    cfg = service_config()
    now = time.time()
    good: list[tuple[int, Prepared]] = []
    refused: list[dict[str, Any]] = []
    for i, item in enumerate(requests):
        try:
            good.append((i, prepare(coerce_request(item), cfg, now)))
        except InvalidRequest as exc:
            refused.append({"index": i, "field": exc.field, "error": str(exc)})
    try:
        tickets = store().submit_many([p for _, p in good], cfg, now=now)
        kept = [(i, t) for (i, _), t in zip(good, tickets, strict=True)]
    except LaneFull as exc:
        accepted = iter(exc.accepted)
        rejected = set(exc.rejected)
        kept = [(i, next(accepted)) for n, (i, _) in enumerate(good) if n not in rejected]
        refused += [{"index": good[n][0], "field": "lane", "error": str(exc)} for n in rejected]
    for r in refused:
        log.warning("enqueue_many refused index=%s field=%s", r["index"], r["field"])
    return {
        "tickets": [{"index": i, **t.model_dump()} for i, t in kept],
        "refused": sorted(refused, key=lambda r: r["index"]),
    }
