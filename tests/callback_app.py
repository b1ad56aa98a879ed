"""A producer's own Celery app, as a Django or Flask project would have: its callback task
records every delivery in Redis so the end-to-end tests can count them."""

from __future__ import annotations

import json
import os
from typing import Any

import redis
from celery import Celery

app = Celery("e2e-callbacks", broker=os.environ.get("MIXBATCH_REDIS_URL"))
app.conf.update(task_serializer="json", accept_content=["json"], task_ignore_result=True)

_client: redis.Redis | None = None


def _redis() -> redis.Redis:
    global _client
    if _client is None:
        _client = redis.Redis.from_url(os.environ["MIXBATCH_REDIS_URL"])
    return _client


def counts_key(namespace: str) -> str:
    return f"e2e:{namespace}:count"


def payloads_key(namespace: str) -> str:
    return f"e2e:{namespace}:payload"


@app.task(name="e2e.record")
def record(payload: dict[str, Any]) -> None:
    ns = os.environ["MIXBATCH_NAMESPACE"]
    pipe = _redis().pipeline(transaction=True)
    pipe.hincrby(counts_key(ns), payload["id"], 1)
    pipe.hset(payloads_key(ns), payload["id"], json.dumps(payload))
    pipe.execute()
