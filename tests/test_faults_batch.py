"""A real worker dies at each step of the batch route; another finishes: nothing lost, nothing
doubled.

For each fault point (``routing.faults``) a worker process runs with
``MIXBATCH_FAULT_POINTS=<point>`` and ends with ``os._exit`` the first time it gets there (no
``finally``, no ack, like a SIGKILL). A second worker, with no fault, is started. Every request
must end DONE with its own answer, be delivered exactly once (the callback app counts what it
receives), and no request may have been sent to the provider in two batches (the sandbox counts
custom_ids it saw twice).

Short graces and leases (``FAULT_ENV``) let the second worker reconcile what the first left
within seconds: a take or an intent whose worker stopped beating, a collection whose lease ran
out.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from routing.client import Client
from routing.faults import FAULT_EXIT_CODE
from routing.models import Route
from routing.sandbox import Knobs
from routing.states import State
from tasks.cli.demo import answer_ok
from tests.test_e2e import CALLBACK, db_url, delivered, make_stack, start_callbacks, wait_for

__all__ = ["db_url"]

#: The batch route's steps, in order (``upload`` is OpenAI's: Anthropic sends requests inline).
BATCH_POINTS = ("take", "intent", "upload", "create", "record", "poll", "download", "apply")
FAULT_ENV = {
    "MIXBATCH_BATCH_INTENT_GRACE_S": "2",
    "MIXBATCH_BATCH_COLLECT_LEASE_S": "3",
}


def workload() -> list[dict[str, Any]]:
    """Three OpenAI and three Anthropic requests in the bulk lane: all take the batch route."""
    items = []
    for i in range(3):
        text = f"fault request {i}: summarise ticket #{2000 + i}"
        messages = [{"role": "user", "content": text}]
        items.append(
            {
                "endpoint": "/v1/chat/completions",
                "body": {"model": "gpt-4o-mini", "messages": messages},
            }
        )
        items.append(
            {
                "endpoint": "/v1/messages",
                "body": {"model": "claude-haiku-4-5", "max_tokens": 64, "messages": messages},
            }
        )
    return [
        {**item, "custom_id": f"fault-{n}", "lane": "bulk", "callback": CALLBACK}
        for n, item in enumerate(items)
    ]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("point", BATCH_POINTS)
def test_a_worker_dying_at_a_batch_step_loses_and_doubles_nothing(
    tmp_path: Path, db_url: str, point: str
) -> None:
    once = tmp_path / "fault-once"
    once.mkdir()
    stack = make_stack(tmp_path, db_url, Knobs(batch_turnaround_s=1.0), **FAULT_ENV)
    try:
        start_callbacks(stack)
        doomed = stack.start_worker(
            "doomed",
            concurrency=1,
            pool="solo",  # the worker itself dies, not a pool child its parent would replace
            env={"MIXBATCH_FAULT_POINTS": point, "MIXBATCH_FAULT_ONCE_DIR": str(once)},
        )
        stack.start_beat()
        stack.wait_workers(["doomed", "callbacks"])
        items = workload()
        with Client(db_url, namespace="e2e") as client:
            ids = [t.id for t in client.submit_many(items)]
            wait_for(lambda: doomed.poll() is not None, 90, f"the worker to die at {point}")
            assert doomed.returncode == FAULT_EXIT_CODE and (once / point).exists()
            stack.kill("doomed")  # forget it (it is already gone)

            stack.start_worker("rescuer", concurrency=2)
            stack.wait_workers(["rescuer"])
            wait_for(lambda: set(ids) <= set(delivered(db_url)), 120, "every request delivered")
            wait_for(
                lambda: all(client.status(i).state is State.DELIVERED for i in ids),
                30,
                "every request marked delivered",
            )
            time.sleep(4)  # past the collect lease: a second collection would deliver again now
            counts = delivered(db_url)
            assert {i: counts[i] for i in ids} == dict.fromkeys(ids, 1)
            for rid, item in zip(ids, items, strict=True):
                result = client.result(rid, timeout=1)
                assert result.route is Route.BATCH, rid
                assert answer_ok(item["endpoint"], item["body"], result), rid
        batches = stack.sandbox.stats()["batches"]
        assert batches["custom_ids_resent"] == 0, "a request was sent in two batches"
        assert sum(batches["lines_processed"].values()) == len(ids)
    finally:
        stack.stop()
