"""A producer's own Celery app, as a Django or Flask project would have.

``e2e.record`` records every delivery in Redis (it applies nothing once: it counts what
arrives), so the end-to-end tests can count deliveries. ``e2e.store_answer`` is the Flask
integration's ready callback task (``routing.contrib.flask``, the documented exactly-once
receiver), writing answers into a SQLite file named by ``E2E_ANSWERS_DB``; every message it
receives, and every one it has handled, is counted in Redis by Celery's own signals, so a test
sees what was sent apart from what was applied.
"""

from __future__ import annotations

import json
import os
from typing import Any

import redis
import sqlalchemy as sa
from celery import Celery, signals
from flask import Flask

from routing.contrib.flask import Mixbatch

app = Celery(
    "e2e-callbacks",
    broker=os.environ.get("MIXBATCH_BROKER_URL") or os.environ.get("MIXBATCH_REDIS_URL"),
)
app.conf.update(task_serializer="json", accept_content=["json"], task_ignore_result=True)
if os.environ.get("MIXBATCH_BROKER_MASTER_NAME"):  # a sentinel:// broker (tests/test_sentinel.py)
    app.conf.broker_transport_options = {"master_name": os.environ["MIXBATCH_BROKER_MASTER_NAME"]}

STORE_ANSWER = "e2e.store_answer"
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


def received_key(namespace: str, stage: str) -> str:
    """How many ``e2e.store_answer`` messages reached ``stage`` (received, handled), by id."""
    return f"e2e:{namespace}:store_answer:{stage}"


@app.task(name="e2e.record")
def record(payload: dict[str, Any]) -> None:
    ns = os.environ["MIXBATCH_NAMESPACE"]
    pipe = _redis().pipeline(transaction=True)
    pipe.hincrby(counts_key(ns), payload["id"], 1)
    pipe.hset(payloads_key(ns), payload["id"], json.dumps(payload))
    pipe.execute()


def answers_table(metadata: sa.MetaData) -> sa.Table:
    """The rows answers are written into, as an app of the caller's would have them."""
    return sa.Table(
        "docs",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("answer", sa.Text, nullable=True),
        sa.Column("mixbatch_status", sa.String(16), nullable=True),
        sa.Column("mixbatch_request_id", sa.String(128), nullable=True),
    )


if os.environ.get("E2E_ANSWERS_DB"):
    metadata = sa.MetaData()
    answers_table(metadata)
    mixbatch = Mixbatch(metadata=metadata)
    flask_app = Flask("e2e-answers")
    engine = sa.create_engine(f"sqlite:///{os.environ['E2E_ANSWERS_DB']}")
    mixbatch.init_app(flask_app, engine=engine)
    mixbatch.callback_task(app, app=flask_app, name=STORE_ANSWER)


def _count(stage: str, task: Any, args: Any) -> None:
    if getattr(task, "name", None) != STORE_ANSWER or not args:
        return
    ns = os.environ["MIXBATCH_NAMESPACE"]
    _redis().hincrby(received_key(ns, stage), str(args[0].get("id")), 1)


@signals.task_prerun.connect
def _received(task: Any = None, args: Any = None, **_: Any) -> None:
    _count("received", task, args)


@signals.task_postrun.connect
def _handled(task: Any = None, args: Any = None, **_: Any) -> None:
    _count("handled", task, args)
