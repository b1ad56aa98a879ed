"""The delivery policy (``routing.engine.deliver.run_delivery``) against a real Redis store.

The central claim: delivery is at-least-once, and every sink applies a result once. Each sink
is made to see the same result twice the way it happens in production: the worker writes to
the sink and dies before recording the delivery, so after its lease another worker delivers
again. What the caller sees afterwards is one row, one stream entry, one applied webhook.

For Celery the sink cannot apply anything itself: it sends a message, and the receiving task
applies it. So that case runs a real Celery worker with the Flask integration's ready task (the
documented exactly-once receiver) and shows both sides honestly: the message is sent, and
received, twice; the row is written once.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from celery import Celery

from config.settings import reset_settings
from routing.callbacks import CallbackSpec, CeleryCallback
from routing.contrib.answers import Target
from routing.contrib.common import settings_from
from routing.engine.deliver import run_delivery
from routing.errors import InvalidRequest
from routing.models import Result, ServiceConfig, coerce_request
from routing.sinks import DeliveryError, Sink, SinkContext, sink_for
from routing.sinks.celery import CelerySink
from routing.sinks.table import SqlTarget, StreamTarget
from routing.states import State
from routing.store.lanes import LaneStore
from tasks import deliver as deliver_module
from tasks import runtime
from tests.callback_app import STORE_ANSWER, answers_table, received_key
from tests.test_sink_table import BODY, context_for, deliver, finished, sink_settings
from tests.test_sinks_webhook import SECRET, SECRET_ENV, Receiver, serve_receiver, webhook_target

ROOT = Path(__file__).resolve().parent.parent
LEASE_S = 30


@pytest.fixture
def now() -> float:
    return time.time()


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    with serve_receiver() as rec:
        yield rec


class DiesAfterWriting(Sink):
    """Writes through the real sink, then the worker "dies" before recording the delivery."""

    def __init__(self, inner: Sink) -> None:
        super().__init__(max_payload_bytes=inner.max_payload_bytes)
        self.kind = inner.kind  # type: ignore[misc]
        self.inner = inner

    def write(self, result: Result, payload: bytes) -> None:
        self.inner.write(result, payload)
        raise RuntimeError("worker killed after writing, before recording the delivery")


def deliver_twice(store: LaneStore, context: SinkContext, rid: str, now: float) -> None:
    """Deliver ``rid``: the first worker writes and dies; after its lease, another delivers."""
    crashes = iter([True])

    def factory(spec: CallbackSpec) -> Sink:
        sink = sink_for(spec, context)
        return DiesAfterWriting(sink) if next(crashes, False) else sink

    first = run_delivery(store, rid, sinks=factory, max_attempts=5, lease_s=LEASE_S, now=now + 1)
    assert first.status == "retry", "an unexpected error is retried, never lost"
    second = run_delivery(
        store, rid, sinks=factory, max_attempts=5, lease_s=LEASE_S, now=now + 1000
    )
    assert second.status == "delivered" and second.attempt == 2
    assert store.status(rid).state is State.DELIVERED
    for later in (now + 2000, now + 100_000):
        assert deliver(store, context, rid, later).status == "not due"


# Each case: the sink's target, and a probe of what the caller's side holds for a request id.
Case = tuple[Any, Callable[[str], int]]


@pytest.fixture(params=["webhook", "sql", "stream"])
def case(
    request: pytest.FixtureRequest,
    store: LaneStore,
    receiver: Receiver,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Case]:
    kind = request.param
    if kind == "webhook":
        yield webhook_target(receiver.url, name="out"), lambda rid: int(rid in receiver.applied)
    elif kind == "sql":
        url = f"sqlite:///{tmp_path / 'answers.db'}"
        monkeypatch.setenv("OUT_DB_URL", url)
        engine = sa.create_engine(url)

        def rows(rid: str) -> int:
            with engine.connect() as conn:
                q = sa.text("SELECT count(*) FROM mixbatch_results WHERE request_id = :r")
                return int(conn.execute(q, {"r": rid}).scalar_one())

        yield SqlTarget(name="out", url_env="OUT_DB_URL"), rows
        engine.dispose()
    else:
        key = f"answers:{uuid.uuid4().hex[:8]}"

        def entries(rid: str) -> int:
            return sum(1 for _, f in store.redis.xrange(key) if f[b"id"] == rid.encode())

        yield StreamTarget(name="out", key=key), entries
        store.redis.delete(key)


def test_a_duplicate_delivery_is_applied_once_by_every_sink(
    case: Case, store: LaneStore, service_config: ServiceConfig, now: float, tmp_path: Path
) -> None:
    target, applied = case
    context = context_for(store, target, settings=sink_settings([tmp_path]))
    rid = finished(store, service_config, now, {"sink": "out"})
    try:
        deliver_twice(store, context, rid, now)
    finally:
        context.close()
    assert applied(rid) == 1, "delivered twice, applied once"


# -- Celery: a real worker, the integration's receiver --------------------------------------


@pytest.fixture
def answers_db(tmp_path: Path) -> Iterator[tuple[Path, Callable[[str], Any]]]:
    """The receiving app's SQLite database, with one row to fill and a trigger counting every
    write to it: the database's own count, not the receiver's word."""
    path = tmp_path / "answers.db"
    engine = sa.create_engine(f"sqlite:///{path}")
    answers_table(metadata := sa.MetaData())
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE writes (n INTEGER NOT NULL)"))
        conn.execute(sa.text("INSERT INTO writes VALUES (0)"))
        conn.execute(
            sa.text(
                "CREATE TRIGGER count_writes AFTER UPDATE OF answer ON docs "
                "BEGIN UPDATE writes SET n = n + 1; END"
            )
        )
        conn.execute(sa.text("INSERT INTO docs (id) VALUES (1)"))
    engine.dispose()

    def query(sql: str) -> Any:
        with sqlite3.connect(path) as conn:
            return conn.execute(sql).fetchone()

    yield path, query


@pytest.fixture
def callback_worker(
    redis_url: str, namespace: str, answers_db: tuple[Path, Any], tmp_path: Path
) -> Iterator[str]:
    """``celery -A tests.callback_app worker`` on a queue of this test's own; its queue."""
    queue = f"e2e.answers.{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "MIXBATCH_REDIS_URL": redis_url,
        "MIXBATCH_NAMESPACE": namespace,
        "E2E_ANSWERS_DB": str(answers_db[0]),
    }
    argv = [
        sys.executable, "-m", "celery", "-A", "tests.callback_app", "worker", "-Q", queue,
        "-c", "1", "-P", "solo", "-n", f"{queue}@%h", "--without-gossip", "--without-mingle",
        "--without-heartbeat", "-l", "WARNING",
    ]  # fmt: skip
    log = (tmp_path / "worker.log").open("wb")
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield queue
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


def _wait_for(check: Callable[[], bool], what: str, log: Path, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; worker log:\n{log.read_text()}")
        time.sleep(0.1)


def test_celery_delivered_twice_is_applied_once_by_the_receiver(
    store: LaneStore,
    service_config: ServiceConfig,
    redis_url: str,
    answers_db: tuple[Path, Callable[[str], Any]],
    callback_worker: str,
    tmp_path: Path,
    now: float,
) -> None:
    """At-least-once, honestly: the real ``CelerySink`` sends the result twice (the first
    worker died after sending), a real worker receives both messages, and the Flask
    integration's task writes the row once; the database's own trigger counts the writes."""
    _, query = answers_db
    sender = Celery("the-service", broker=redis_url)
    sender.conf.update(task_serializer="json", accept_content=["json"])
    callback = {"kind": "celery", "task": STORE_ANSWER, "queue": callback_worker}
    custom_id = Target("docs", "1", "answer").custom_id
    rid = finished(store, service_config, now, callback, custom_id=custom_id)
    context = context_for(store, celery_app=sender)
    try:
        deliver_twice(store, context, rid, now)
    finally:
        context.close()
        sender.close()
    counted = store.redis.hget
    log = tmp_path / "worker.log"
    handled = received_key(store.keys.ns, "handled")
    _wait_for(lambda: counted(handled, rid) == b"2", "both messages to be handled", log)
    assert counted(received_key(store.keys.ns, "received"), rid) == b"2", "sent twice"
    assert query("SELECT n FROM writes") == (1,), "written once"
    assert query("SELECT answer, mixbatch_status, mixbatch_request_id FROM docs") == (
        "hello",
        "done",
        rid,
    )
    assert query("SELECT count(*) FROM mixbatch_applied") == (1,)


def test_celery_sends_the_payload_with_the_idempotency_header(
    store: LaneStore, service_config: ServiceConfig, now: float
) -> None:
    sent: list[tuple[str, list[Any], dict[str, Any]]] = []

    class Recorder:
        """Records ``send_task`` calls: what the sink hands to Celery, nothing more."""

        def send_task(self, name: str, args: Any = None, **options: Any) -> None:
            sent.append((name, list(args or []), options))

    callback = {"kind": "celery", "task": "app.tasks.save", "queue": "results"}
    rid = finished(store, service_config, now, callback, custom_id="doc-9")
    context = context_for(store, celery_app=Recorder())
    try:
        assert deliver(store, context, rid, now + 1).status == "delivered"
    finally:
        context.close()
    [(name, args, options)] = sent
    assert (name, options["queue"]) == ("app.tasks.save", "results")
    assert options["headers"] == {"mixbatch_request_id": rid}
    assert args[0]["id"] == rid and args[0]["custom_id"] == "doc-9"
    assert args[0]["status"] == "done"


def test_two_workers_racing_deliver_once(
    store: LaneStore, service_config: ServiceConfig, now: float
) -> None:
    """A duplicated Celery message: the second worker finds the delivery leased, not due."""
    rid = finished(store, service_config, now, {"kind": "celery", "task": "t"})
    assert store.claim_delivery(rid, lease_s=LEASE_S, now=now + 1) == 1  # worker A, mid-send
    context = context_for(store)
    try:
        assert deliver(store, context, rid, now + 2).status == "not due"  # worker B
    finally:
        context.close()


@pytest.mark.parametrize(
    ("task", "queue", "why"),
    [
        ("mixbatch.enqueue", None, "task 'mixbatch.enqueue' is in mixbatch's own namespace"),
        ("mixbatch.deliver", None, "mixbatch's own namespace"),
        ("celery.backend_cleanup", None, "Celery's own namespace"),
        ("app.save", "mixbatch.realtime", "queue 'mixbatch.realtime' is in mixbatch's own"),
        ("app.save", "celery", "queue 'celery' is in Celery's own namespace"),
        ("app.save", "worker1.celery.pidbox", "Celery's control queues"),
        ("app.save\r\nx", None, "is not a Celery task name"),
    ],
)
def test_a_celery_callback_into_a_reserved_namespace_is_refused_at_submit(
    task: str, queue: str | None, why: str
) -> None:
    callback = {"kind": "celery", "task": task, "queue": queue}
    with pytest.raises(InvalidRequest) as info:
        coerce_request({"body": BODY, "callback": callback})
    assert info.value.field == ("callback.task" if queue is None else "callback.queue")
    assert why in str(info.value)


@pytest.mark.parametrize("name", ["CALLBACK_TASK", "CALLBACK_QUEUE"])
def test_the_integrations_refuse_a_reserved_name_at_start(name: str) -> None:
    """A Django or Flask app configured with the old ``mixbatch.*`` names fails at start-up,
    naming the key, instead of having every request refused at submit."""
    with pytest.raises(TypeError) as info:
        settings_from(
            {name: "mixbatch.django.store_answer"},
            default_task="mixbatch_django.store_answer",
            where=lambda k: f"settings.MIXBATCH[{k!r}]",
        )
    assert str(info.value).startswith(f"settings.MIXBATCH['{name}']: 'mixbatch.django")
    assert "mixbatch's own namespace" in str(info.value)


def test_the_services_own_queues_are_refused_at_delivery(now: float) -> None:
    """Queues the service consumes outside ``mixbatch.*`` (the GPU worker's) only the worker
    knows: its context names them, and a callback to one is a dead letter."""
    sent: list[str] = []

    class Recorder:
        def send_task(self, name: str, args: Any = None, **options: Any) -> None:
            sent.append(name)

    sink = CelerySink(
        CeleryCallback(task="app.save", queue="gpu"),
        settings=sink_settings(),
        app=Recorder(),
        reserved_queues=("gpu",),
    )
    result = Result(
        id="standard.01X", lane="standard", status=State.DONE, deadline=now, created_at=now
    )
    with pytest.raises(DeliveryError) as info:
        sink.deliver(result, b"{}")
    assert not info.value.retryable and info.value.code == "reserved_name"
    assert "queue 'gpu' is in the service's own queues" in str(info.value)
    assert sent == []


def test_a_callback_stored_before_named_sinks_is_a_dead_letter(
    store: LaneStore, service_config: ServiceConfig, now: float
) -> None:
    """An inline webhook stored by an older version: reading the request still works, and its
    delivery says why it will not be made, without reaching any URL."""
    rid = finished(store, service_config, now, None)
    key = store.keys.request(rid)
    data = store.redis.hget(key, "data")
    assert data is not None
    legacy = data.decode().replace(
        '"callback":null', '"callback":{"kind":"webhook","url":"http://169.254.169.254/x"}'
    )
    store.redis.hset(key, "data", legacy)
    context = context_for(store)
    try:
        out = deliver(store, context, rid, now + 1)
    finally:
        context.close()
    assert out.status == "dead letter" and out.error is not None
    assert out.error.code == "callback_retired"
    assert "inline webhook callbacks are no longer accepted" in out.error.message
    assert store.result(rid) is not None


class AlwaysDown(Sink):
    kind = "webhook"

    def write(self, result: Result, payload: bytes) -> None:
        raise DeliveryError(
            "receiver answered 503", sink="webhook", retryable=True, status_code=503
        )


def test_dead_letter_after_max_attempts(
    store: LaneStore, service_config: ServiceConfig, now: float
) -> None:
    rid = finished(store, service_config, now, {"sink": "crm"})
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


def test_every_callback_shape_round_trips_through_the_store(
    store: LaneStore, service_config: ServiceConfig, now: float
) -> None:
    callbacks: list[dict[str, Any]] = [
        {"kind": "celery", "task": "t", "queue": "q"},
        {"sink": "crm"},
    ]
    for cb in callbacks:
        rid = finished(store, service_config, now, cb)
        spec = store.prepared(rid).callback
        assert spec is not None and spec.model_dump(exclude_none=True) == cb


def test_the_celery_task_wires_the_store_and_the_sinks(
    store: LaneStore,
    service_config: ServiceConfig,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The worker loads the table from MIXBATCH_SINKS_FILE and delivers to the sink it names."""
    key = f"answers:{uuid.uuid4().hex[:8]}"
    sinks = tmp_path / "sinks.toml"
    sinks.write_text(f'[sinks.answers]\nkind = "stream"\nkey = "{key}"\n')
    rid = finished(store, service_config, time.time() - 5, {"sink": "answers"})
    monkeypatch.setenv("MIXBATCH_NAMESPACE", store.keys.ns)
    monkeypatch.setenv("MIXBATCH_SINKS_FILE", str(sinks))
    reset_settings()
    runtime.reset()
    try:
        assert runtime.service_config().sinks == ("answers",)
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

    sink = CelerySink(CeleryCallback(task="t"), settings=sink_settings(), app=Broken())
    result = Result(
        id="standard.01X", lane="standard", status=State.DONE, deadline=now, created_at=now
    )
    with pytest.raises(DeliveryError) as info:
        sink.deliver(result, b"{}")
    assert info.value.retryable and info.value.code == "broker_unavailable"


def test_routing_sinks_public_surface_and_imports() -> None:
    """``routing.sinks`` is importable by a receiver or producer without the service around it."""
    import routing.sinks

    assert routing.sinks.__all__ == [
        "AddressRefused",
        "DeliveryError",
        "PayloadTooLarge",
        "Sink",
        "SinkContext",
        "SinkSettings",
        "SinkTable",
        "SqlTarget",
        "StreamTarget",
        "WebhookTarget",
        "canonical_payload",
        "get_sink_settings",
        "load_sinks",
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
