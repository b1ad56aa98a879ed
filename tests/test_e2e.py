"""End to end: real Redis, real worker processes, real beat, the sandbox over real HTTP.

Each test gets its own Redis database, so broker queues and lanes of one test never meet
another's workers. The thousand-request run also runs with RabbitMQ as Celery's broker
(``MIXBATCH_BROKER_URL=amqp://``), the lanes staying in Redis.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from routing.client import Client
from routing.decide.lanes import parse_lanes
from routing.models import Route, ServiceConfig
from routing.sandbox import Knobs
from routing.states import State
from routing.store.embedded import EmbeddedRedis
from tasks.cli.demo import answer_ok, demo_workload
from tasks.cli.stack import LocalStack
from tests.callback_app import counts_key, payloads_key

ROOT = Path(__file__).resolve().parent.parent
CALLBACK = {"kind": "celery", "task": "e2e.record", "queue": "e2e.callbacks"}
FAST = {
    "MIXBATCH_AGGREGATE_INTERVAL_S": "0.3",
    "MIXBATCH_SWEEP_INTERVAL_S": "1",
    "MIXBATCH_LOG_LEVEL": "WARNING",
    # The sandbox finishes batches in seconds; the route choice is told so, so standard and bulk
    # requests take the batch route and urgent ones realtime.
    "MIXBATCH_BATCH_TURNAROUND_S": '{"openai": 5, "anthropic": 5}',
    "MIXBATCH_BATCH_MARGIN_S": "60",
    "MIXBATCH_BATCH_MAX_WAIT_S": "1",
    "MIXBATCH_BATCH_FLUSH_INTERVAL_S": "0.5",
    "MIXBATCH_BATCH_POLL_INTERVAL_S": "0.5",
    "MIXBATCH_BATCH_POLL_MAX_INTERVAL_S": "1",
}
_dbs = itertools.count(1)


def _config() -> ServiceConfig:
    return ServiceConfig(lanes=parse_lanes((ROOT / "config" / "lanes.toml").read_text()))


def _db_url(base: str, db: int) -> str:
    return base.rsplit("/", 1)[0] + f"/{db}"


def wait_for(
    check: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.25
) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if check():
            return
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


@pytest.fixture
def db_url(redis_url: str) -> Iterator[str]:
    url = _db_url(redis_url, next(_dbs) % 16 or 15)
    r = redis.Redis.from_url(url)
    r.flushdb()
    r.close()
    yield url


def make_stack(tmp_path: Path, url: str, knobs: Knobs, **env: str) -> LocalStack:
    stack = LocalStack(
        tmp_path / "stack", redis_url=url, namespace="e2e", knobs=knobs, env={**FAST, **env}
    )
    stack.start()
    stack.publish(_config())
    return stack


def start_callbacks(stack: LocalStack) -> None:
    stack.start_worker(
        "callbacks", queues=["e2e.callbacks"], concurrency=2, app="tests.callback_app", cwd=ROOT
    )


def delivered(url: str) -> dict[str, int]:
    r = redis.Redis.from_url(url)
    try:
        return {k.decode(): int(v) for k, v in r.hgetall(counts_key("e2e")).items()}
    finally:
        r.close()


def payloads(url: str) -> dict[str, dict[str, Any]]:
    r = redis.Redis.from_url(url)
    try:
        return {k.decode(): json.loads(v) for k, v in r.hgetall(payloads_key("e2e")).items()}
    finally:
        r.close()


@pytest.fixture(params=["redis", "amqp"])
def broker_env(request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    """Celery's broker: the lanes' own Redis (the default), or a RabbitMQ node, which must then
    have carried the callbacks (so the case cannot pass on Redis by mistake)."""
    if request.param == "redis":
        yield {}
        return
    node = request.getfixturevalue("rabbit")
    yield {"MIXBATCH_BROKER_URL": node.url}
    queues = node.ctl("list_queues", "name")
    assert queues.returncode == 0, queues.stderr.decode()
    assert b"e2e.callbacks" in queues.stdout, queues.stdout.decode()


@pytest.mark.timeout(420)
def test_thousand_requests_two_workers_delivered_exactly_once(
    tmp_path: Path, db_url: str, broker_env: dict[str, str]
) -> None:
    knobs = Knobs(
        latency_ms=5,
        rate_429=0.05,
        retry_after_s=0.1,
        rate_500=0.02,
        seed=3,
        batch_turnaround_s=1.0,
    )
    stack = make_stack(tmp_path, db_url, knobs, **broker_env)
    try:
        stack.start_worker("w1", concurrency=2)
        stack.start_worker("w2", concurrency=2)
        start_callbacks(stack)
        stack.start_beat()
        stack.wait_workers(["w1", "w2", "callbacks"])
        items = [{**item, "callback": CALLBACK} for item in demo_workload(1000)]
        with Client(db_url, namespace="e2e") as client:
            tickets = client.submit_many(items)
            by_id = {t.id: item for t, item in zip(tickets, items, strict=True)}
            assert len(by_id) == 1000
            wait_for(lambda: len(delivered(db_url)) >= 1000, 360, "1000 deliveries")
            time.sleep(3)  # a few sweeps more: a duplicate would show up now
            counts = delivered(db_url)
            assert set(counts) == set(by_id)
            assert all(n == 1 for n in counts.values()), {k: n for k, n in counts.items() if n != 1}
            got = payloads(db_url)
            routes = {client.result(rid, timeout=1).route for rid in by_id}
            assert routes == {Route.BATCH, Route.REALTIME}
            for rid, item in by_id.items():
                payload = got[rid]
                assert payload["custom_id"] == item["custom_id"]
                assert payload["status"] == State.DONE.value
                result = client.result(rid, timeout=1)
                assert answer_ok(item["endpoint"], item["body"], result), rid
            wait_for(
                lambda: all(client.status(rid).state is State.DELIVERED for rid in by_id),
                30,
                "every request marked delivered",
            )
        assert stack.sandbox.stats()["faults_total"] > 0, "the run should have met 429s and 500s"
    finally:
        stack.stop()


@pytest.mark.timeout(240)
def test_worker_killed_after_claiming_requests_return_and_complete_once(
    tmp_path: Path, db_url: str
) -> None:
    knobs = Knobs(latency_ms=20_000)
    stack = make_stack(
        tmp_path, db_url, knobs, MIXBATCH_LEASE_S="4", MIXBATCH_REALTIME_TIMEOUT_S="30"
    )
    try:
        stack.start_worker("doomed", concurrency=2)
        start_callbacks(stack)
        stack.start_beat()
        stack.wait_workers(["doomed", "callbacks"])
        items = [{**item, "callback": CALLBACK} for item in demo_workload(20)]
        with Client(db_url, namespace="e2e") as client:
            tickets = client.submit_many(items)
            ids = [t.id for t in tickets]
            wait_for(
                lambda: any(client.status(i).state is State.RUNNING for i in ids),
                30,
                "a running request",
            )
            running = [i for i in ids if client.status(i).state is State.RUNNING]
            stack.kill("doomed")
            stack.sandbox.configure(latency_ms=0)
            stack.start_worker("rescuer", concurrency=2)
            stack.wait_workers(["rescuer"])
            wait_for(lambda: len(delivered(db_url)) >= len(ids), 120, "every request delivered")
            time.sleep(3)
            counts = delivered(db_url)
            assert set(counts) == set(ids)
            assert all(n == 1 for n in counts.values()), counts
            for rid in running:
                result = client.result(rid, timeout=1)
                assert result.status is State.DONE
                assert result.attempts >= 2, "the killed attempt counts"
    finally:
        stack.stop()


@pytest.mark.timeout(240)
def test_embedded_redis_restart_between_submit_and_work_loses_nothing(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "redis", appendfsync="always").start()
    try:
        items = demo_workload(200)
        with Client(server.url, namespace="e2e", config=_config()) as client:
            client.store.publish_config(_config())
            tickets = client.submit_many(items)
        server.kill()
        server.start()
        stack = make_stack(tmp_path, server.url, Knobs())
        try:
            stack.start_worker("worker", concurrency=2)
            stack.start_beat()
            stack.wait_workers(["worker"])
            with Client(server.url, namespace="e2e") as client:
                for t, item in zip(tickets, items, strict=True):
                    result = client.result(t.id, timeout=120)
                    assert answer_ok(item["endpoint"], item["body"], result)
        finally:
            stack.stop()
    finally:
        server.stop()
