"""A request of an ``on_deadline = "expire"`` lane that reaches the gpu worker past its deadline
is dropped before the model, through a real gpu worker (solo pool, MiniLM on the CPU).

No beat runs, so neither the aggregator nor the sweeper touches the requests: the test claims
them itself, waits out their deadline, and hands the claims to ``mixbatch.gpu_batch`` as the
aggregator would. The expiring lane's request comes back 408 ``deadline_exceeded`` with the
model never run for it; a request of a lane that runs late requests is answered all the same.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery

from config.queues import GPU_QUEUE
from routing.client import Client
from routing.decide.lanes import parse_lanes
from routing.models import Route, ServiceConfig
from routing.sandbox import Knobs
from routing.states import State
from tasks.cli.demo import LOCAL_MODEL
from tasks.cli.stack import LocalStack
from tests.test_e2e import ROOT, db_url, make_stack, wait_for

__all__ = ["db_url"]

EXPIRING = """
[lanes.late]
deadline = "1m"
priority = 60
max_queued = 1000
on_deadline = "expire"
"""


@pytest.fixture
def gpu_only(tmp_path: Path, db_url: str) -> Iterator[LocalStack]:
    """A gpu worker alone (no beat, no service worker), its lanes table with an expiring lane."""
    lanes = tmp_path / "lanes.toml"
    lanes.write_text((ROOT / "config" / "lanes.toml").read_text() + EXPIRING)
    stack = make_stack(tmp_path, db_url, Knobs(), MIXBATCH_LANES_FILE=str(lanes))
    try:
        stack.publish(ServiceConfig(lanes=parse_lanes(lanes.read_text())))
        stack.start_gpu_worker()
        stack.wait_workers(["gpu"], timeout_s=180)
        yield stack
    finally:
        stack.stop()


@pytest.mark.timeout(300)
def test_an_expiring_lanes_request_past_its_deadline_never_reaches_the_model(
    gpu_only: LocalStack, db_url: str
) -> None:
    body = {"model": LOCAL_MODEL, "input": "a text nobody wants any more"}
    items = [
        {"lane": lane, "endpoint": "/v1/embeddings", "body": body, "deadline": "3s"}
        for lane in ("late", "standard")
    ]
    with Client(db_url, namespace="e2e") as client:
        late, kept = (t.id for t in client.submit_many(items))
    st = gpu_only.store()
    producer = Celery("producer", broker=gpu_only.url, set_as_current=False)
    try:
        claims = [c for lane in ("late", "standard") for c in st.claim(lane, 1, lease_s=120)]
        assert sorted(c.id for c in claims) == sorted([late, kept])
        deadline = max(c.request.deadline for c in claims)
        time.sleep(max(0.0, deadline - time.time()) + 0.5)
        producer.send_task(
            "mixbatch.gpu_batch", args=[[[c.id, c.token] for c in claims]], queue=GPU_QUEUE
        )
        wait_for(lambda: all(st.result(i) for i in (late, kept)), 120, "both answered")
        dropped, answered = st.result(late), st.result(kept)
    finally:
        producer.close()
        st.close()
    assert dropped is not None and answered is not None
    assert dropped.status is State.FAILED and dropped.status_code == 408, dropped
    assert dropped.error is not None and dropped.error.code == "deadline_exceeded"
    assert dropped.body is None and dropped.usage is None, "the model never ran for it"
    assert answered.status is State.DONE and answered.route is Route.GPU
    assert answered.body is not None and answered.missed_deadline
