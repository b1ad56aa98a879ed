"""The delivery policy (``routing.engine.deliver.run_delivery``) against a real Redis store, no worker.

The central claim: delivery is at-least-once, and every sink applies a result once. Each sink
is made to see the same result twice the way it happens in production: the worker writes to
the sink and dies before recording the delivery, so after its lease another worker delivers
again. What the caller sees afterwards is one row, one stream entry, one applied webhook, one
applied Celery callback.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from config.settings import reset_settings
from routing.callbacks import CallbackSpec
from routing.client import Client
from routing.engine.deliver import run_delivery
from routing.errors import InvalidRequest
from routing.models import Result, ServiceConfig, coerce_request
from routing.sinks import DeliveryError, Sink, SinkContext, sink_for
from routing.sinks.celery import CelerySink
from routing.states import State
from routing.store.lanes import LaneStore
from tasks import deliver as deliver_module
from tasks import runtime
from tests.test_sinks_webhook import (
    BODY,
    Receiver,
    deliver_once,
    finished,
    serve_receiver,
    sink_settings,
)

LEASE_S = 30


class FakeCeleryApp:
    """Records ``send_task`` calls; ``applied`` is what a caller's task does: one per id."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, list[Any], dict[str, Any]]] = []
        self.applied: dict[str, dict[str, Any]] = {}

    def send_task(self, name: str, args: Any = None, **options: Any) -> None:
        self.sent.append((name, list(args or []), options))
        self.applied.setdefault(options["headers"]["mixbatch_request_id"], args[0])


@pytest.fixture
def now() -> float:
    return time.time()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with serve_receiver() as rec:
        yield rec


@pytest.fixture
def app() -> FakeCeleryApp:
    return FakeCeleryApp()


@pytest.fixture
def context(store: LaneStore, app: FakeCeleryApp) -> Iterator[SinkContext]:
    ctx = SinkContext(sink_settings(), redis=store.redis, namespace=store.keys.ns, celery_app=app)
    yield ctx
    ctx.close()


class DiesAfterWriting(Sink):
    """Writes through the real sink, then the worker "dies" before recording the delivery."""

    def __init__(self, inner: Sink) -> None:
        super().__init__(max_payload_bytes=inner.max_payload_bytes)
        self.kind = inner.kind  # type: ignore[misc]
        self.inner = inner

    def write(self, result: Result, payload: bytes) -> None:
        self.inner.write(result, payload)
        raise RuntimeError("worker killed after writing, before recording the delivery")


# Each case: a callback for the request, and a probe of what the caller's side holds.
Case = tuple[dict[str, Any], Callable[[str], int]]


@pytest.fixture(params=["celery", "webhook", "sql", "stream"])
def case(
    request: pytest.FixtureRequest,
    store: LaneStore,
    app: FakeCeleryApp,
    receiver: Receiver,
    tmp_path: Path,
) -> Iterator[Case]:
    kind = request.param
    if kind == "celery":
        yield (
            {"kind": "celery", "task": "app.save", "queue": "q"},
            lambda rid: len([a for a in app.applied if a == rid]),
        )
    elif kind == "webhook":
        yield {"kind": "webhook", "url": receiver.url}, lambda rid: int(rid in receiver.applied)
    elif kind == "sql":
        url = f"sqlite:///{tmp_path / 'answers.db'}"
        engine = sa.create_engine(url)

        def rows(rid: str) -> int:
            with engine.connect() as conn:
                q = sa.text("SELECT count(*) FROM mixbatch_results WHERE request_id = :r")
                return int(conn.execute(q, {"r": rid}).scalar_one())

        yield {"kind": "sql", "url": url}, rows
        engine.dispose()
    else:
        key = f"answers:{uuid.uuid4().hex[:8]}"

        def entries(rid: str) -> int:
            return sum(1 for _, f in store.redis.xrange(key) if f[b"id"] == rid.encode())

        yield {"kind": "stream", "key": key}, entries
        store.redis.delete(key)


def test_a_duplicate_delivery_is_applied_once_by_every_sink(
    case: Case, store: LaneStore, service_config: ServiceConfig, context: SinkContext, now: float
) -> None:
    callback, applied = case
    rid = finished(store, service_config, now, callback)
    crashes = iter([True])

    def factory(spec: CallbackSpec) -> Sink:
        sink = sink_for(spec, context)
        return DiesAfterWriting(sink) if next(crashes, False) else sink

    first = run_delivery(store, rid, sinks=factory, max_attempts=5, lease_s=LEASE_S, now=now + 1)
    assert first.status == "retry", "an unexpected error is retried, never lost"
    assert applied(rid) == 1, "the first write landed"
    second = run_delivery(
        store, rid, sinks=factory, max_attempts=5, lease_s=LEASE_S, now=now + 1000
    )
    assert second.status == "delivered" and second.attempt == 2
    assert applied(rid) == 1, "delivered twice, applied once"
    assert store.status(rid).state is State.DELIVERED
    for later in (now + 2000, now + 100_000):
        assert deliver_once(store, context, rid, later).status == "not due"
    assert applied(rid) == 1


def test_celery_sends_the_payload_with_the_idempotency_header(
    store: LaneStore,
    service_config: ServiceConfig,
    context: SinkContext,
    app: FakeCeleryApp,
    now: float,
) -> None:
    callback = {"kind": "celery", "task": "app.tasks.save", "queue": "results"}
    rid = finished(store, service_config, now, callback, custom_id="doc-9")
    assert deliver_once(store, context, rid, now + 1).status == "delivered"
    [(name, args, options)] = app.sent
    assert (name, options["queue"]) == ("app.tasks.save", "results")
    assert options["headers"] == {"mixbatch_request_id": rid}
    assert args[0]["id"] == rid and args[0]["custom_id"] == "doc-9"
    assert args[0]["status"] == "done"


def test_two_workers_racing_deliver_once(
    store: LaneStore,
    service_config: ServiceConfig,
    context: SinkContext,
    app: FakeCeleryApp,
    now: float,
) -> None:
    """A duplicated Celery message: the second worker finds the delivery leased, not due."""
    rid = finished(store, service_config, now, {"kind": "celery", "task": "t"})
    assert store.claim_delivery(rid, lease_s=LEASE_S, now=now + 1) == 1  # worker A, mid-send
    assert deliver_once(store, context, rid, now + 2).status == "not due"  # worker B
    assert app.sent == []


class AlwaysDown(Sink):
    kind = "webhook"

    def write(self, result: Result, payload: bytes) -> None:
        raise DeliveryError(
            "receiver answered 503", sink="webhook", retryable=True, status_code=503
        )


def test_dead_letter_after_max_attempts(
    store: LaneStore, service_config: ServiceConfig, now: float
) -> None:
    rid = finished(store, service_config, now, {"kind": "webhook", "url": "https://example.com/h"})
    down = AlwaysDown(max_payload_bytes=1_000_000)
    statuses, t = [], now + 1
    for _ in range(4):
        out = run_delivery(store, rid, sinks=lambda _: down, max_attempts=3, lease_s=5, now=t)
        statuses.append(out.status)
        t += 10_000
    assert statuses == ["retry", "retry", "dead letter", "not due"]
    [entry] = store.dlq.entries()
    assert entry["id"] == rid and entry["error"]["status_code"] == 503
    assert entry["error"]["message"] == (
        "webhook sink: receiver answered 503 (gave up after 3 delivery attempts)"
    )
    assert store.status(rid).state is State.DONE, "the outcome is kept"
    assert store.result(rid) is not None


def test_a_request_without_callback_is_just_marked_delivered(
    store: LaneStore, service_config: ServiceConfig, now: float
) -> None:
    rid = finished(store, service_config, now, None)

    def no_sink(spec: CallbackSpec) -> Sink:
        raise AssertionError("no sink for a request without callback")

    out = run_delivery(store, rid, sinks=no_sink, max_attempts=3, lease_s=5, now=now + 1)
    assert out.status == "delivered"
    assert store.status(rid).state is State.DELIVERED


def test_an_unknown_sink_is_refused_at_submit(
    store: LaneStore, service_config: ServiceConfig, redis_url: str
) -> None:
    with pytest.raises(InvalidRequest) as info:
        coerce_request({"body": BODY, "callback": {"kind": "carrier-pigeon"}})
    assert info.value.field == "callback.kind"
    assert str(info.value) == (
        "callback.kind: unknown sink 'carrier-pigeon' (known sinks: celery, webhook, sql, stream)"
    )
    with Client(redis_url, namespace=store.keys.ns, config=service_config) as client:
        with pytest.raises(InvalidRequest, match=r"callback\.kind: unknown sink 'ftp'"):
            client.submit(body=BODY, callback={"kind": "ftp", "url": "ftp://x"})
        with pytest.raises(InvalidRequest, match=r"callback\.kind: missing"):
            client.submit(body=BODY, callback={"url": "https://example.com/h"})
    assert store.lane_stats("standard").depth == 0, "nothing was enqueued"


def test_every_callback_kind_round_trips_through_the_store(
    store: LaneStore, service_config: ServiceConfig, now: float
) -> None:
    callbacks: list[dict[str, Any]] = [
        {"kind": "celery", "task": "t", "queue": "q"},
        {"kind": "webhook", "url": "https://example.com/h"},
        {"kind": "sql", "url": "sqlite:///x.db", "table": "answers"},
        {"kind": "stream", "key": "s", "maxlen": 10, "redis_url": "redis://h:6379/1"},
    ]
    for cb in callbacks:
        rid = finished(store, service_config, now, cb)
        spec = store.prepared(rid).callback
        assert spec is not None and spec.model_dump(exclude_none=True) == cb


def test_the_celery_task_wires_the_store_and_the_sinks(
    store: LaneStore,
    service_config: ServiceConfig,
    now: float,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key = f"answers:{uuid.uuid4().hex[:8]}"
    rid = finished(store, service_config, time.time() - 5, {"kind": "stream", "key": key})
    monkeypatch.setenv("MIXBATCH_NAMESPACE", store.keys.ns)
    reset_settings()
    runtime.reset()
    try:
        assert deliver_module.deliver.run(rid) == "delivered"
        assert deliver_module.deliver.run(rid) == "not due"
    finally:
        runtime.reset()
        reset_settings()
    assert store.redis.xlen(key) == 1
    store.redis.delete(key)


def test_celery_sink_maps_a_broker_error_to_retryable(now: float) -> None:
    class Broken:
        def send_task(self, name: str, args: Any = None, **options: Any) -> None:
            raise ConnectionError("broker down")

    from routing.callbacks import CeleryCallback

    sink = CelerySink(CeleryCallback(task="t"), settings=sink_settings(), app=Broken())
    result = Result(
        id="standard.01X", lane="standard", status=State.DONE, deadline=now, created_at=now
    )
    with pytest.raises(DeliveryError) as info:
        sink.deliver(result, b"{}")
    assert info.value.retryable and info.value.code == "broker_unavailable"


def test_routing_sinks_public_surface_and_imports() -> None:
    """``routing.sinks`` is importable by a receiver or producer without the service around it."""
    import subprocess
    import sys

    import routing.sinks

    assert routing.sinks.__all__ == [
        "AddressRefused",
        "DeliveryError",
        "PayloadTooLarge",
        "Sink",
        "SinkContext",
        "SinkSettings",
        "canonical_payload",
        "get_sink_settings",
        "reset_sink_settings",
        "sink_for",
        "verify_signature",
    ]
    code = (
        "import sys, routing.sinks; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('config', 'tasks', 'celery')); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
