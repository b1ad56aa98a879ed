"""Webhook sink against real HTTP receivers on loopback (allow-listed here, as it must be).

The receiver checks the signature of every delivery with ``verify_signature``, the helper a
real receiver would use, and applies each ``webhook-id`` once. Deliveries go to a named sink of
a ``SinkTable`` through ``run_delivery`` against a real Redis store, with ``now`` passed in so
backoff needs no sleeping. A second kind of receiver trickles its answer one byte a second: a
delivery to it ends at its total deadline, and the rest of its batch is delivered inside live
leases. The helpers here (``Receiver``, ``finished``, ``sink_settings``, ``webhook_context``,
``hook``) are shared with ``test_deliver.py``, ``test_dlq.py`` and ``test_webhook_spec.py``.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from routing.callbacks import CallbackSpec, SinkCallback
from routing.engine.deliver import Outcome, run_deliveries, run_delivery
from routing.models import (
    Request,
    Result,
    ServiceConfig,
    StoredResult,
    prepare,
)
from routing.sinks import (
    AddressRefused,
    DeliveryError,
    PayloadTooLarge,
    SinkContext,
    SinkSettings,
    canonical_payload,
    sink_for,
    verify_signature,
)
from routing.sinks.guard import AddressPolicy, resolve_host
from routing.sinks.signing import webhook_headers
from routing.sinks.table import SinkTable, WebhookTarget
from routing.sinks.webhook import WebhookSink
from routing.states import State
from routing.store.lanes import LaneStore
from tasks.cli.dlq import replay_dead_letter

SECRET = "whsec_" + base64.b64encode(b"mixbatch-test-key-for-acme-hooks").decode()
OTHER_SECRET = "whsec_" + base64.b64encode(b"mixbatch-test-key-of-another-sink").decode()
#: The variable the test sinks read their secret from (set by ``webhook_context``).
SECRET_ENV = "MIXBATCH_TEST_WEBHOOK_SECRET"
HOOK = "hooks"
BODY: dict[str, Any] = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
ANSWER: dict[str, Any] = {"choices": [{"message": {"role": "assistant", "content": "hello"}}]}
LOOPBACK = ["127.0.0.1/32"]


# -- shared helpers ----------------------------------------------------------------------------


def sink_settings(**overrides: Any) -> SinkSettings:
    values: dict[str, Any] = {"sink_allow": LOOPBACK, "webhook_timeout_s": 2.0}
    values.update(overrides)
    return SinkSettings(_env_file=None, **values)  # type: ignore[call-arg]


def hook(name: str = HOOK) -> dict[str, str]:
    """The callback of a request delivered to the test sink ``name``."""
    return {"sink": name}


def webhook_target(
    url: str, *, name: str = HOOK, secret_env: str = SECRET_ENV, previous: str | None = None
) -> WebhookTarget:
    return WebhookTarget(name=name, url=url, secret_env=secret_env, previous_secret_env=previous)


def webhook_context(
    store: LaneStore,
    *targets: WebhookTarget | str,
    settings: SinkSettings | None = None,
    **kwargs: Any,
) -> SinkContext:
    """A ``SinkContext`` whose table holds ``targets`` (a URL is the sink ``hooks`` at that URL,
    signing with ``SECRET``, which this sets in the environment for it)."""
    os.environ[SECRET_ENV] = SECRET
    table = SinkTable(webhook_target(t) if isinstance(t, str) else t for t in targets)
    return SinkContext(
        settings or sink_settings(),
        sinks=table,
        redis=store.redis,
        namespace=store.keys.ns,
        **kwargs,
    )


def finished(
    store: LaneStore,
    config: ServiceConfig,
    now: float,
    callback: CallbackSpec | dict[str, Any] | None,
    *,
    tenant: str = "acme",
    custom_id: str | None = None,
    answer: dict[str, Any] | None = None,
) -> str:
    """A request submitted, claimed and finished DONE: its result waits in the outbox. A sink
    the callback names is published in the service's config first, as the service would."""
    name = callback.get("sink") if isinstance(callback, dict) else None
    if isinstance(callback, SinkCallback):
        name = callback.sink
    if name is not None and name not in config.sinks:
        config = config.model_copy(update={"sinks": (*config.sinks, name)})
    request = Request(body=dict(BODY), callback=callback, tenant=tenant, custom_id=custom_id)  # type: ignore[arg-type]
    [ticket] = store.submit_many([prepare(request, config, now)], config, now=now)
    [claimed] = store.claim(ticket.lane, 1, lease_s=60, now=now)
    assert claimed.id == ticket.id
    stored = {
        "status_code": 200,
        "body": answer if answer is not None else ANSWER,
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
        "provider": "sandbox",
    }
    assert store.finish(
        ticket.id, claimed.token, State.DONE, StoredResult.model_validate(stored), now=now + 0.5
    )
    return ticket.id


def deliver_once(
    store: LaneStore, context: SinkContext, request_id: str, now: float, **kw: Any
) -> Outcome:
    kw.setdefault("max_attempts", 5)
    return run_delivery(
        store,
        request_id,
        sinks=lambda spec: sink_for(spec, context),
        lease_s=30,
        now=now,
        **kw,
    )


@dataclass
class Delivery:
    request_id: str | None
    headers: dict[str, str]
    body: bytes
    valid: bool
    status: int


@dataclass
class Receiver:
    """A webhook receiver as a caller would write one: verify, then apply each id once.

    ``script`` holds the answers to give, in order (status, headers, delay_s); when it runs out,
    every answer is 200. ``on_delivery`` (if set) sees each delivery's id as it arrives.
    """

    secret: str = SECRET
    script: list[tuple[int, dict[str, str], float]] = field(default_factory=list)
    deliveries: list[Delivery] = field(default_factory=list)
    applied: dict[str, dict[str, Any]] = field(default_factory=dict)
    accepted: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None
    on_delivery: Callable[[str], None] | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}/hooks/mixbatch?token=abc"

    def answer(self, *statuses: int, headers: dict[str, str] | None = None) -> None:
        self.script.extend((s, headers or {}, 0.0) for s in statuses)

    def stall(self, delay_s: float) -> None:
        self.script.append((200, {}, delay_s))

    def handle(self, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], float]:
        valid = verify_signature(self.secret, headers, body)
        request_id = headers.get("webhook-id")
        if self.on_delivery is not None and request_id is not None:
            self.on_delivery(request_id)
        with self.lock:
            status, extra, delay = self.script.pop(0) if self.script else (200, {}, 0.0)
            if not valid:
                status = 401
            self.deliveries.append(Delivery(request_id, headers, body, valid, status))
            if valid and 200 <= status < 300 and request_id is not None:
                self.accepted[request_id] = self.accepted.get(request_id, 0) + 1
                self.applied.setdefault(request_id, json.loads(body))
        return status, extra, delay


def _handler(receiver: Receiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            headers = {k.lower(): v for k, v in self.headers.items()}
            status, extra, delay = receiver.handle(headers, body)
            if delay:
                time.sleep(delay)
            reply = json.dumps({"status": status}).encode()
            try:
                self.send_response(status)
                for name, value in extra.items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)
            except (BrokenPipeError, ConnectionResetError):
                pass

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@contextmanager
def serving(handler: type[BaseHTTPRequestHandler]) -> Iterator[ThreadingHTTPServer]:
    """``handler`` listening on a free loopback port, in a thread, for the block."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@contextmanager
def serve_receiver(secret: str = SECRET) -> Iterator[Receiver]:
    """A ``Receiver`` listening on a free loopback port, in a thread, for the block."""
    rec = Receiver(secret=secret)
    with serving(_handler(rec)) as server:
        rec.server = server
        yield rec


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with serve_receiver() as rec:
        yield rec


@pytest.fixture
def now() -> float:
    return time.time()


@pytest.fixture
def context(store: LaneStore, receiver: Receiver) -> Iterator[SinkContext]:
    ctx = webhook_context(store, receiver.url)
    yield ctx
    ctx.close()


# -- signed deliveries --------------------------------------------------------------------------


def test_a_delivery_is_signed_and_carries_the_request_id(
    store: LaneStore,
    service_config: ServiceConfig,
    context: SinkContext,
    receiver: Receiver,
    now: float,
) -> None:
    rid = finished(store, service_config, now, hook(), custom_id="doc-1")
    assert deliver_once(store, context, rid, now + 1).status == "delivered"
    [got] = receiver.deliveries
    assert got.valid and got.request_id == rid
    assert got.headers["webhook-timestamp"].isdigit()
    assert got.headers["webhook-signature"].startswith("v1,")
    result = store.result(rid)
    assert result is not None and result.delivered
    assert got.body == canonical_payload(result.model_copy(update={"delivered": False}))
    assert receiver.applied[rid]["id"] == rid, "the body's id is the webhook-id"
    assert receiver.applied[rid]["custom_id"] == "doc-1"
    assert receiver.applied[rid]["body"] == ANSWER
    assert store.status(rid).state is State.DELIVERED


def test_each_sink_signs_with_its_own_secret(
    store: LaneStore, service_config: ServiceConfig, now: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MIXBATCH_TEST_OTHER_SECRET", OTHER_SECRET)
    with serve_receiver() as first, serve_receiver(OTHER_SECRET) as second:
        other = webhook_target(second.url, name="other", secret_env="MIXBATCH_TEST_OTHER_SECRET")
        with closing(webhook_context(store, first.url, other)) as ctx:
            a = finished(store, service_config, now, hook())
            b = finished(store, service_config, now, hook("other"))
            assert deliver_once(store, ctx, a, now + 1).status == "delivered"
            assert deliver_once(store, ctx, b, now + 1).status == "delivered"
    [to_first], [to_second] = first.deliveries, second.deliveries
    assert to_first.valid and to_second.valid
    assert not verify_signature(OTHER_SECRET, to_first.headers, to_first.body)
    assert not verify_signature(SECRET, to_second.headers, to_second.body)


def test_500_then_success_is_retried_with_backoff(
    store: LaneStore,
    service_config: ServiceConfig,
    context: SinkContext,
    receiver: Receiver,
    now: float,
) -> None:
    receiver.answer(500, 503)
    rid = finished(store, service_config, now, hook())
    first = deliver_once(store, context, rid, now + 1)
    assert first.status == "retry" and first.error is not None
    assert first.error.code == "receiver_error" and first.error.status_code == 500
    assert first.retry_in_s is not None and 1.6 <= first.retry_in_s <= 2.0
    assert deliver_once(store, context, rid, now + 1.5).status == "not due", "backing off"
    second = deliver_once(store, context, rid, now + 10)
    assert second.status == "retry" and second.attempt == 2
    assert second.retry_in_s is not None and 3.2 <= second.retry_in_s <= 4.0, "exponential"
    assert deliver_once(store, context, rid, now + 20).status == "delivered"
    assert [d.status for d in receiver.deliveries] == [500, 503, 200]
    assert all(d.valid for d in receiver.deliveries), "every try is signed"
    assert len({d.request_id for d in receiver.deliveries}) == 1, "one webhook-id for all tries"
    assert receiver.accepted == {rid: 1}
    assert store.status(rid).state is State.DELIVERED


def test_429_retry_after_is_a_floor(
    store: LaneStore,
    service_config: ServiceConfig,
    context: SinkContext,
    receiver: Receiver,
    now: float,
) -> None:
    receiver.answer(429, headers={"Retry-After": "120"})
    rid = finished(store, service_config, now, hook())
    out = deliver_once(store, context, rid, now + 1)
    assert out.status == "retry" and out.error is not None and out.error.code == "rate_limited"
    assert out.retry_in_s is not None and out.retry_in_s >= 120
    assert deliver_once(store, context, rid, now + 60).status == "not due"


def test_410_goes_straight_to_the_dead_letters(
    store: LaneStore,
    service_config: ServiceConfig,
    context: SinkContext,
    receiver: Receiver,
    now: float,
) -> None:
    receiver.answer(410)
    rid = finished(store, service_config, now, hook())
    out = deliver_once(store, context, rid, now + 1)
    assert out.status == "dead letter" and out.attempt == 1
    [entry] = store.dlq.entries()
    assert entry["id"] == rid
    assert entry["error"]["code"] == "receiver_rejected"
    assert entry["error"]["status_code"] == 410
    assert "410 Gone" in entry["error"]["message"] and "not retried" in entry["error"]["message"]
    assert "token=abc" not in entry["error"]["message"], "no query string in messages"
    for later in (now + 100, now + 10_000):
        assert deliver_once(store, context, rid, later).status == "not due"
    assert len(receiver.deliveries) == 1, "not retried"
    result = store.result(rid)
    assert result is not None and result.body == ANSWER, "the result stays stored"


def test_a_dead_letter_is_replayed_once_the_receiver_is_back(
    store: LaneStore,
    service_config: ServiceConfig,
    context: SinkContext,
    receiver: Receiver,
    now: float,
) -> None:
    receiver.answer(404)
    rid = finished(store, service_config, now, hook())
    assert deliver_once(store, context, rid, now + 1).status == "dead letter"
    assert store.lane_stats("standard").counts["dead_letters"] == 1
    assert replay_dead_letter(store, rid, now=now + 5)
    assert store.dlq.entries() == []
    assert store.lane_stats("standard").counts["dead_letters"] == 0
    out = deliver_once(store, context, rid, now + 6)
    assert out.status == "delivered" and out.attempt == 1, "a fresh count of attempts"
    assert [d.status for d in receiver.deliveries] == [404, 200]
    assert receiver.accepted == {rid: 1}


def test_gives_up_after_max_attempts_with_the_last_error(
    store: LaneStore,
    service_config: ServiceConfig,
    context: SinkContext,
    receiver: Receiver,
    now: float,
) -> None:
    receiver.answer(502, 502, 503)
    rid = finished(store, service_config, now, hook())
    outcomes = [
        deliver_once(store, context, rid, now + 1000 * i, max_attempts=3).status for i in (1, 2, 3)
    ]
    assert outcomes == ["retry", "retry", "dead letter"]
    [entry] = store.dlq.entries()
    assert entry["error"]["status_code"] == 503
    assert "gave up after 3 delivery attempts" in entry["error"]["message"]


def test_a_timeout_is_retried(
    store: LaneStore, service_config: ServiceConfig, receiver: Receiver, now: float
) -> None:
    receiver.stall(1.0)
    with closing(
        webhook_context(store, receiver.url, settings=sink_settings(webhook_timeout_s=0.3))
    ) as ctx:
        rid = finished(store, service_config, now, hook())
        out = deliver_once(store, ctx, rid, now + 1)
    assert out.status == "retry" and out.error is not None
    assert out.error.code == "timeout" and "MIXBATCH_WEBHOOK_TIMEOUT_S" in out.error.message


def test_a_closed_port_is_retried(
    store: LaneStore, service_config: ServiceConfig, now: float
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again when the block ends: nothing listens
    with closing(webhook_context(store, f"http://127.0.0.1:{port}/hook")) as ctx:
        rid = finished(store, service_config, now, hook())
        out = deliver_once(store, ctx, rid, now + 1)
    assert out.status == "retry" and out.error is not None and out.error.code == "connect_failed"


def test_a_redirect_is_not_followed(
    store: LaneStore,
    service_config: ServiceConfig,
    context: SinkContext,
    receiver: Receiver,
    now: float,
) -> None:
    receiver.answer(302, headers={"Location": "http://169.254.169.254/latest/meta-data/"})
    rid = finished(store, service_config, now, hook())
    out = deliver_once(store, context, rid, now + 1)
    assert out.status == "dead letter" and out.error is not None
    assert out.error.code == "receiver_redirected"
    assert len(receiver.deliveries) == 1


@pytest.mark.parametrize("value", [None, "not base64 at all!", "whsec_"])
def test_a_missing_or_malformed_secret_is_a_dead_letter_naming_the_variable(
    store: LaneStore,
    service_config: ServiceConfig,
    context: SinkContext,
    receiver: Receiver,
    now: float,
    monkeypatch: pytest.MonkeyPatch,
    value: str | None,
) -> None:
    if value is None:
        monkeypatch.delenv(SECRET_ENV)
    else:
        monkeypatch.setenv(SECRET_ENV, value)
    rid = finished(store, service_config, now, hook())
    out = deliver_once(store, context, rid, now + 1)
    assert out.status == "dead letter" and out.error is not None
    assert out.error.code == "webhook_secret_missing"
    assert SECRET_ENV in out.error.message and HOOK in out.error.message
    assert "not base64 at all" not in out.error.message, "the value is never shown"
    assert receiver.deliveries == [], "nothing unsigned is sent"


def test_a_result_too_large_is_a_dead_letter_naming_the_limit(
    store: LaneStore, service_config: ServiceConfig, receiver: Receiver, now: float
) -> None:
    with closing(
        webhook_context(
            store, receiver.url, settings=sink_settings(sink_max_payload_bytes={"webhook": 2000})
        )
    ) as ctx:
        big = {"choices": [{"message": {"content": "x" * 5000}}]}
        rid = finished(store, service_config, now, hook(), answer=big)
        out = deliver_once(store, ctx, rid, now + 1)
    assert out.status == "dead letter" and out.error is not None
    assert out.error.code == "payload_too_large"
    assert "webhook sink" in out.error.message and "limit of 2000" in out.error.message
    assert receiver.deliveries == []
    result = store.result(rid)
    assert result is not None and result.body == big, "the result stays stored"


# -- a slow receiver cannot hold a worker ------------------------------------------------------

#: What the trickling receiver answers, one byte a second: over a minute in all.
TRICKLED = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


class Trickler:
    """A receiver that reads each request whole, then answers one byte a second: no read
    waits as long as a second, so per-read timeouts never fire."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.stop = threading.Event()
        self.requests: list[str] = []
        self.threads: list[threading.Thread] = []
        self.thread = threading.Thread(target=self._accept)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}/slow"

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            thread = threading.Thread(target=self._trickle, args=(conn,))
            self.threads.append(thread)
            thread.start()

    def _trickle(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            data = b""
            try:
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, _, body = data.partition(b"\r\n\r\n")
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                while len(body) < length:
                    body += conn.recv(65536)
                ids = [ln for ln in head.split(b"\r\n") if ln.lower().startswith(b"webhook-id:")]
                self.requests.append(ids[0].split(b":", 1)[1].strip().decode())
                for byte in TRICKLED:
                    if self.stop.wait(1.0):
                        return
                    conn.sendall(bytes([byte]))
            except OSError:
                return  # the sender hung up: what a deadline does

    def __enter__(self) -> Trickler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(5)
        for thread in self.threads:
            thread.join(5)
        self.listener.close()


@contextmanager
def trickling(
    store: LaneStore,
    deadline_s: float,
    targets: Callable[[str], Sequence[WebhookTarget | str]] = lambda url: [url],
) -> Iterator[tuple[Trickler, SinkContext]]:
    """A ``Trickler``, and sinks with a total deadline of ``deadline_s``: ``targets`` of its URL
    (by default the sink ``hooks`` is the trickler)."""
    with Trickler() as slow:
        settings = sink_settings(webhook_timeout_s=deadline_s)
        with closing(webhook_context(store, *targets(slow.url), settings=settings)) as ctx:
            yield slow, ctx


@pytest.mark.timeout(40)
def test_a_trickling_receiver_is_cut_off_at_the_total_deadline(
    store: LaneStore, service_config: ServiceConfig, now: float
) -> None:
    # Two seconds in all: longer than any wait between two bytes, so only a total counts.
    with trickling(store, 2.0) as (slow, ctx):
        rid = finished(store, service_config, now, hook())
        started = time.monotonic()
        out = deliver_once(store, ctx, rid, now + 1)
        took = time.monotonic() - started
    assert slow.requests == [rid], "the request was sent; the answer was trickling"
    assert out.status == "retry" and out.error is not None and out.error.code == "timeout"
    assert "all of it" in out.error.message and "MIXBATCH_WEBHOOK_TIMEOUT_S" in out.error.message
    # The answer takes over a minute at a byte a second; the worker is back long before.
    assert took < len(TRICKLED) / 4


@pytest.mark.timeout(60)
def test_a_slow_target_does_not_push_the_rest_of_its_batch_past_their_leases(
    store: LaneStore, service_config: ServiceConfig, receiver: Receiver
) -> None:
    lease_s, deadline_s = 5.0, 2.0
    left: dict[str, float] = {}

    def lease_left(rid: str) -> None:
        """At the moment a delivery arrives: how long its lease still runs."""
        score = store.redis.zscore(store.keys.outbox("standard"), rid)
        left[rid] = (score or 0.0) - time.time()

    receiver.on_delivery = lease_left
    slow_sinks = [f"slow{i}" for i in range(3)]

    def targets(url: str) -> list[WebhookTarget | str]:
        return [receiver.url, *(webhook_target(url, name=name) for name in slow_sinks)]

    with trickling(store, deadline_s, targets) as (slow, ctx):
        t0 = time.time() - 5  # finished a while ago: due now
        slow_ids = [finished(store, service_config, t0, hook(name)) for name in slow_sinks]
        fast_ids = [finished(store, service_config, t0, hook(), tenant=f"t{i}") for i in range(3)]
        start = time.time()
        outcomes = run_deliveries(
            store,
            slow_ids + fast_ids,
            sinks=lambda spec: sink_for(spec, ctx),
            max_attempts=5,
            lease_s=lease_s,
            now=start,
        )
        took = time.time() - start
    assert took > lease_s, "the slow targets used up more than one lease"
    assert sorted(slow.requests) == sorted(slow_ids), "each slow target was tried once"
    for rid in slow_ids:
        out = outcomes[rid]
        assert out.status == "retry" and out.error is not None and out.error.code == "timeout"
    assert [outcomes[rid].status for rid in fast_ids] == ["delivered"] * 3
    assert set(left) == set(fast_ids)
    for rid in fast_ids:
        assert left[rid] > deadline_s, f"{rid} was sent {-left[rid]:.2f}s past its lease"
    assert receiver.accepted == dict.fromkeys(fast_ids, 1)
    assert all(store.status(rid).state is State.DELIVERED for rid in fast_ids)


@pytest.mark.timeout(60)
def test_a_target_that_timed_out_is_not_tried_again_in_the_same_batch(
    store: LaneStore, service_config: ServiceConfig, now: float
) -> None:
    with trickling(store, 1.0) as (slow, ctx):
        ids = [finished(store, service_config, now, hook(), tenant=f"t{i}") for i in range(3)]
        outcomes = run_deliveries(
            store,
            ids,
            sinks=lambda spec: sink_for(spec, ctx),
            max_attempts=5,
            lease_s=30,
            now=now + 1,
        )
    assert slow.requests == ids[:1], "one deadline for the batch, not one per delivery"
    for rid in ids:
        out = outcomes[rid]
        assert out.status == "retry" and out.error is not None and out.error.code == "timeout"
    for rid in ids[1:]:
        error = outcomes[rid].error
        assert error is not None and "not tried" in error.message


def test_a_delivery_another_worker_took_meanwhile_is_left_to_it(
    store: LaneStore,
    service_config: ServiceConfig,
    context: SinkContext,
    receiver: Receiver,
    now: float,
) -> None:
    """Time moves only when the first sink is called: by more than half the lease, after
    which another worker claims the second delivery (as it may once the lease ran out)."""
    lease_s = 10.0
    first, second, third = (finished(store, service_config, now, hook()) for _ in range(3))
    elapsed = [0.0]

    def sinks(spec: CallbackSpec) -> Any:
        if not elapsed[0]:
            elapsed[0] = lease_s + 1
            assert store.claim_deliveries([second], lease_s=lease_s, now=now + 1 + lease_s + 1)
        return sink_for(spec, context)

    outcomes = run_deliveries(
        store,
        [first, second, third],
        sinks=sinks,
        max_attempts=5,
        lease_s=lease_s,
        now=now + 1,
        clock=lambda: elapsed[0],
    )
    assert outcomes[first].status == "delivered"
    assert outcomes[second].status == "lost", "the other worker holds it now"
    assert outcomes[third].status == "delivered", "still ours: renewed before it was sent"
    assert set(receiver.accepted) == {first, third}


# -- refused addresses -----------------------------------------------------------------------


def _result(now: float) -> Result:
    return Result(
        id="standard.01TEST", lane="standard", status=State.DONE, deadline=now + 60, created_at=now
    )


class _NoNetwork(httpx.BaseTransport):
    def handle_request(self, request: httpx.Request) -> httpx.Response:
        raise AssertionError(f"a refused address was contacted: {request.url}")


@pytest.mark.parametrize(
    "url,resolved,reason",
    [
        ("http://127.0.0.1:8080/hook", None, "loopback"),
        ("http://localhost/hook", None, "loopback"),
        ("http://[::1]/hook", None, "loopback"),
        ("http://169.254.169.254/latest/meta-data/", None, "link-local"),
        ("http://10.0.0.1/hook", None, "private"),
        ("https://192.168.1.20/hook", None, "private"),
        ("http://[::ffff:10.0.0.1]/hook", None, "private"),
        ("http://0.0.0.0/hook", None, "unspecified"),
        ("http://100.64.0.1/hook", None, "not globally routable"),
        ("https://hooks.example.com/x", ["93.184.216.34", "169.254.169.254"], "link-local"),
        ("https://rebound.example.com/x", ["10.1.2.3"], "private"),
    ],
)
def test_refused_addresses_without_an_allow_list(
    url: str, resolved: list[str] | None, reason: str, now: float
) -> None:
    def resolver(host: str, port: int) -> Sequence[str]:
        return resolved if resolved is not None else resolve_host(host, port)

    os.environ[SECRET_ENV] = SECRET
    with httpx.Client(transport=_NoNetwork()) as client:
        sink = WebhookSink(
            webhook_target(url),
            settings=sink_settings(sink_allow=[]),
            client=client,
            resolver=resolver,
        )
        result = _result(now)
        with pytest.raises(AddressRefused) as info:
            sink.deliver(result, canonical_payload(result))
    assert not info.value.retryable and info.value.code == "address_refused"
    assert reason in str(info.value) and "MIXBATCH_SINK_ALLOW" in str(info.value)


def test_a_refused_address_is_a_dead_letter_at_once(
    store: LaneStore, service_config: ServiceConfig, receiver: Receiver, now: float
) -> None:
    with closing(
        webhook_context(store, receiver.url, settings=sink_settings(sink_allow=[]))
    ) as ctx:
        rid = finished(store, service_config, now, hook())
        out = deliver_once(store, ctx, rid, now + 1)
    assert out.status == "dead letter" and out.attempt == 1
    assert out.error is not None and out.error.code == "address_refused"
    assert receiver.deliveries == []


@pytest.mark.parametrize(
    "allow,host,addresses,ok",
    [
        (["127.0.0.1/32"], "127.0.0.1", ["127.0.0.1"], True),
        (["127.0.0.0/8"], "127.0.0.2", ["127.0.0.2"], True),
        (["10.0.0.0/8"], "hooks.lan", ["10.9.8.7"], True),
        (["10.0.0.0/8"], "hooks.lan", ["10.9.8.7", "192.168.0.1"], False),
        (["hooks.lan"], "Hooks.LAN.", ["192.168.0.1"], True),
        (["hooks.lan"], "other.lan", ["192.168.0.1"], False),
        (["::1/128"], "::1", ["::1"], True),
        ([], "example.com", ["93.184.216.34"], True),
        ([], "example.com", ["2606:2800:220:1:248:1893:25c8:1946"], True),
        ([], "example.com", ["fd00:ec2::254"], False),
    ],
)
def test_address_policy(allow: list[str], host: str, addresses: list[str], ok: bool) -> None:
    policy = AddressPolicy.from_allow(allow)
    if ok:
        assert policy.check(host, addresses) == addresses
    else:
        with pytest.raises(AddressRefused):
            policy.check(host, addresses)


# -- verify_signature --------------------------------------------------------------------------

PAYLOAD = b'{"id":"standard.01X","status":"done"}'
T = 1_700_000_000


def signed(secrets: Sequence[str] = (SECRET,), msg_id: str = "standard.01X") -> dict[str, str]:
    return webhook_headers(list(secrets), msg_id, PAYLOAD, timestamp=T)


def test_verify_signature_accepts_a_fresh_signature() -> None:
    headers = signed()
    assert verify_signature(SECRET, headers, PAYLOAD, now=T + 100)
    upper = {k.title(): v for k, v in headers.items()}
    assert verify_signature(SECRET, upper, PAYLOAD, now=T + 100), "header names in any case"
    assert verify_signature(SECRET, list(headers.items()), PAYLOAD, now=T + 100)


def test_verify_signature_has_a_replay_window() -> None:
    headers = signed()
    assert verify_signature(SECRET, headers, PAYLOAD, now=T + 300)
    assert not verify_signature(SECRET, headers, PAYLOAD, now=T + 301), "too old"
    assert not verify_signature(SECRET, headers, PAYLOAD, now=T - 400), "from the future"
    assert verify_signature(SECRET, headers, PAYLOAD, tolerance=3600, now=T + 3000)


def test_verify_signature_refuses_a_tampered_body_another_key_or_another_id() -> None:
    headers = signed()
    at = T + 1
    assert not verify_signature(SECRET, headers, PAYLOAD.replace(b"done", b"fail"), now=at)
    assert not verify_signature(SECRET, headers, PAYLOAD + b" ", now=at)
    assert not verify_signature(OTHER_SECRET, headers, PAYLOAD, now=at)
    moved = {**headers, "webhook-timestamp": str(T + 1)}
    assert not verify_signature(SECRET, moved, PAYLOAD, now=at), "the timestamp is signed too"
    other_id = {**headers, "webhook-id": "standard.01Y"}
    assert not verify_signature(SECRET, other_id, PAYLOAD, now=at), "so is the id"


@pytest.mark.parametrize(
    "change",
    [
        {"webhook-signature": None},
        {"webhook-id": None},
        {"webhook-timestamp": None},
        {"webhook-timestamp": "soon"},
        {"webhook-timestamp": "1.7e9"},
        {"webhook-signature": ""},
        {"webhook-signature": "garbage"},
        {"webhook-signature": "v1,"},
        {"webhook-signature": "v1,é"},
        {"webhook-signature": "v2,AAAA"},
    ],
)
def test_verify_signature_refuses_bad_headers(change: dict[str, str | None]) -> None:
    headers: dict[str, str] = dict(signed())
    for name, value in change.items():
        if value is None:
            headers.pop(name)
        else:
            headers[name] = value
    assert not verify_signature(SECRET, headers, PAYLOAD, now=T)


def test_verify_signature_accepts_either_secret_during_rotation() -> None:
    headers = signed([SECRET, OTHER_SECRET])
    assert len(headers["webhook-signature"].split(" ")) == 2
    assert verify_signature(SECRET, headers, PAYLOAD, now=T)
    assert verify_signature(OTHER_SECRET, headers, PAYLOAD, now=T)
    assert verify_signature([OTHER_SECRET, SECRET], signed([SECRET]), PAYLOAD, now=T)
    third = "whsec_" + base64.b64encode(b"a third key, not in use").decode()
    assert not verify_signature(third, headers, PAYLOAD, now=T)


def test_verify_signature_never_raises_on_a_bad_secret() -> None:
    assert not verify_signature("not base64!", signed(), PAYLOAD, now=T)


def test_sink_for_a_named_webhook(context: SinkContext) -> None:
    sink = sink_for(SinkCallback(sink=HOOK), context)
    assert isinstance(sink, WebhookSink)
    assert sink.max_payload_bytes == 1_000_000


def test_delivery_error_names_the_sink() -> None:
    err = PayloadTooLarge("webhook", 10, 5)
    assert str(err).startswith("webhook sink: ")
    assert isinstance(err, DeliveryError) and not err.retryable
