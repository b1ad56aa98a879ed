"""``mixbatch.enqueue``: for producers that only have a Celery app (``send_task``)."""

from __future__ import annotations

import time
from typing import Any

from config import app
from routing.models import coerce_request, prepare
from tasks.runtime import service_config, store


@app.task(name="mixbatch.enqueue", acks_late=True, ignore_result=True)
def enqueue(request: dict[str, Any]) -> dict[str, Any]:
    """Same fields as ``routing.client.Request``; idempotent on (tenant, custom_id)."""
    cfg = service_config()
    prepared = prepare(coerce_request(request), cfg, time.time())
    return store().submit_many([prepared], cfg)[0].model_dump()
