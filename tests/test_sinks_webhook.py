"""Webhook sink against a real HTTP receiver on loopback (allow-listed here, as it must be).

The receiver checks the signature of every delivery with ``verify_signature``, the helper a
real receiver would use, and applies each ``Mixbatch-Request-Id`` once. Deliveries go through
``run_delivery`` against a real Redis store, with ``now`` passed in so backoff needs no sleeping.
The helpers here (``Receiver``, ``finished``, ``sink_settings``) are shared with
``test_deliver.py`` and ``test_dlq.py``.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from routing.callbacks import CallbackSpec, WebhookCallback
from routing.engine.deliver import Outcome, run_delivery
from routing.errors import InvalidRequest
from routing.models import (
    Request,
    Result,
    ServiceConfig,
    StoredResult,
    coerce_request,
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
from routing.sinks.signing import signature_header
from routing.sinks.webhook import AddressPolicy, WebhookSink
from routing.states import State
from routing.store.lanes import LaneStore
from tasks.cli.dlq import replay_dead_letter

SECRET = "whsec-acme-test"
DEFAULT_SECRET = "whsec-default-test"
BODY: dict[str, Any] = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
ANSWER: dict[str, Any] = {"choices": [{"message": {"role": "assistant", "content": "hello"}}]}
LOOPBACK = ["127.0.0.1/32"]


# -- shared helpers ----------------------------------------------------------------------------


def sink_settings(**overrides: Any) -> SinkSettings:
    values: dict[str, Any] = {
        "webhook_allow": LOOPBACK,
        "webhook_secrets": {"acme": SECRET},
        "webhook_secret": DEFAULT_SECRET,
        "webhook_timeout_s": 2.0,
    }
    values.update(overrides)
    return SinkSettings(_env_file=None, **values)  # type: ignore[call-arg]


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
    """A request submitted, claimed and finished DONE: its result waits in the outbox."""
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
    signature: str | None
    body: bytes
    valid: bool
    status: int


@dataclass
class Receiver:
    """A webhook receiver as a caller would write one: verify, then apply each id once.

    ``script`` holds the answers to give, in order (status, headers, delay_s); when it runs out,
    every answer is 200.
    """

    secret: str = SECRET
    script: list[tuple[int, dict[str, str], float]] = field(default_factory=list)
    deliveries: list[Delivery] = field(default_factory=list)
    applied: dict[str, dict[str, Any]] = field(default_factory=dict)
    accepted: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}/hooks/mixbatch?token=abc"

    def answer(self, *statuses: int, headers: dict[str, str] | None = None) -> None:
        self.script.extend((s, headers or {}, 0.0) for s in statuses)

    def stall(self, delay_s: float) -> None:
        self.script.append((200, {}, delay_s))

    def handle(
        self, request_id: str | None, signature: str | None, body: bytes
    ) -> tuple[int, dict[str, str], float]:
        valid = verify_signature(self.secret, signature, body)
        with self.lock:
            status, headers, delay = self.script.pop(0) if self.script else (200, {}, 0.0)
            if not valid:
                status = 401
            self.deliveries.append(Delivery(request_id, signature, body, valid, status))
            if valid and 200 <= status < 300 and request_id is not None:
                self.accepted[request_id] = self.accepted.get(request_id, 0) + 1
                self.applied.setdefault(request_id, json.loads(body))
        return status, headers, delay


def _handler(receiver: Receiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            status, headers, delay = receiver.handle(
                self.headers.get("Mixbatch-Request-Id"),
                self.headers.get("Mixbatch-Signature"),
                body,
            )
            if delay:
                time.sleep(delay)
            reply = json.dumps({"status": status}).encode()
            try:
                self.send_response(status)
                for name, value in headers.items():
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
def serve_receiver() -> Iterator[Receiver]:
    """A ``Receiver`` listening on a free loopback port, in a thread, for the block."""
    rec = Receiver()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(rec))
    server.daemon_threads = True
    rec.server = server
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield rec
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with serve_receiver() as rec:
        yield rec


@pytest.fixture
def now() -> float:
    return time.time()


@pytest.fixture
def context(store: LaneStore) -> Iterator[SinkContext]:
    ctx = SinkContext(sink_settings(), redis=store.redis, namespace=store.keys.ns)
    yield ctx
    ctx.close()


def _hook(receiver: Receiver) -> dict[str, Any]:
    return {"kind": "webhook", "url": receiver.url}


# -- signed deliveries --------------------------------------------------------------------------


def test_a_delivery_is_signed_and_carries_the_request_id(
    store: LaneStore,
    service_config: ServiceConfig,
    context: SinkContext,
    receiver: Receiver,
    now: float,
) -> None:
    rid = finished(store, service_config, now, _hook(receiver), custom_id="doc-1")
    assert deliver_once(store, context, rid, now + 1).status == "delivered"
    [got] = receiver.deliveries
    assert got.valid and got.request_id == rid
    result = store.result(rid)
    assert result is not None and result.delivered
    assert got.body == canonical_payload(result.model_copy(update={"delivered": False}))
    assert receiver.applied[rid]["custom_id"] == "doc-1"
    assert receiver.applied[rid]["body"] == ANSWER
    assert store.status(rid).state is State.DELIVERED


def test_each_tenant_signs_with_its_own_secret(
    store: LaneStore,
    service_config: ServiceConfig,
    context: SinkContext,
    receiver: Receiver,
    now: float,
) -> None:
    rid = finished(store, service_config, now, _hook(receiver), tenant="globex")
    receiver.secret = DEFAULT_SECRET  # globex has no secret of its own: the default signs
    assert deliver_once(store, context, rid, now + 1).status == "delivered"
    [got] = receiver.deliveries
    assert got.valid
    assert not verify_signature(SECRET, got.signature, got.body), "not acme's key"


def test_500_then_success_is_retried_with_backoff(
    store: LaneStore,
    service_config: ServiceConfig,
    context: SinkContext,
    receiver: Receiver,
    now: float,
) -> None:
    receiver.answer(500, 503)
    rid = finished(store, service_config, now, _hook(receiver))
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
    rid = finished(store, service_config, now, _hook(receiver))
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
    rid = finished(store, service_config, now, _hook(receiver))
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
    rid = finished(store, service_config, now, _hook(receiver))
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
    rid = finished(store, service_config, now, _hook(receiver))
    outcomes = [
        deliver_once(store, context, rid, now + 1000 * i, max_attempts=3).status for i in (1, 2, 3)
    ]
    assert outcomes == ["retry", "retry", "dead letter"]
    [entry] = store.dlq.entries()
    assert entry["error"]["status_code"] == 503
    assert "gave up after 3 delivery attempts" in entry["error"]["message"]


def test_a_timeout_is_retried(
    store: LaneStore,
    service_config: ServiceConfig,
    store_ns_context: SinkContext,
    receiver: Receiver,
    now: float,
) -> None:
    receiver.stall(1.0)
    rid = finished(store, service_config, now, _hook(receiver))
    out = deliver_once(store, store_ns_context, rid, now + 1)
    assert out.status == "retry" and out.error is not None
    assert out.error.code == "timeout" and "MIXBATCH_WEBHOOK_TIMEOUT_S" in out.error.message


@pytest.fixture
def store_ns_context(store: LaneStore) -> Iterator[SinkContext]:
    ctx = SinkContext(
        sink_settings(webhook_timeout_s=0.3), redis=store.redis, namespace=store.keys.ns
    )
    yield ctx
    ctx.close()


def test_a_closed_port_is_retried(
    store: LaneStore, service_config: ServiceConfig, context: SinkContext, now: float
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again when the block ends: nothing listens
    url = f"http://127.0.0.1:{port}/hook"
    rid = finished(store, service_config, now, {"kind": "webhook", "url": url})
    out = deliver_once(store, context, rid, now + 1)
    assert out.status == "retry" and out.error is not None and out.error.code == "connect_failed"


def test_a_redirect_is_not_followed(
    store: LaneStore,
    service_config: ServiceConfig,
    context: SinkContext,
    receiver: Receiver,
    now: float,
) -> None:
    receiver.answer(302, headers={"Location": "http://169.254.169.254/latest/meta-data/"})
    rid = finished(store, service_config, now, _hook(receiver))
    out = deliver_once(store, context, rid, now + 1)
    assert out.status == "dead letter" and out.error is not None
    assert out.error.code == "receiver_redirected"
    assert len(receiver.deliveries) == 1


def test_no_secret_for_the_tenant_is_a_dead_letter_naming_the_setting(
    store: LaneStore, service_config: ServiceConfig, receiver: Receiver, now: float
) -> None:
    ctx = SinkContext(sink_settings(webhook_secret=None), redis=store.redis)
    try:
        rid = finished(store, service_config, now, _hook(receiver), tenant="globex")
        out = deliver_once(store, ctx, rid, now + 1)
    finally:
        ctx.close()
    assert out.status == "dead letter" and out.error is not None
    assert out.error.code == "webhook_secret_missing"
    assert "MIXBATCH_WEBHOOK_SECRETS" in out.error.message and "globex" in out.error.message
    assert receiver.deliveries == [], "nothing unsigned is sent"


def test_a_result_too_large_is_a_dead_letter_naming_the_limit(
    store: LaneStore, service_config: ServiceConfig, receiver: Receiver, now: float
) -> None:
    ctx = SinkContext(sink_settings(sink_max_payload_bytes={"webhook": 2000}), redis=store.redis)
    try:
        big = {"choices": [{"message": {"content": "x" * 5000}}]}
        rid = finished(store, service_config, now, _hook(receiver), answer=big)
        out = deliver_once(store, ctx, rid, now + 1)
    finally:
        ctx.close()
    assert out.status == "dead letter" and out.error is not None
    assert out.error.code == "payload_too_large"
    assert "webhook sink" in out.error.message and "limit of 2000" in out.error.message
    assert receiver.deliveries == []
    result = store.result(rid)
    assert result is not None and result.body == big, "the result stays stored"


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
    from routing.sinks.webhook import resolve_host

    def resolver(host: str, port: int) -> Sequence[str]:
        return resolved if resolved is not None else resolve_host(host, port)

    with httpx.Client(transport=_NoNetwork()) as client:
        sink = WebhookSink(
            WebhookCallback(url=url),
            settings=sink_settings(webhook_allow=[]),
            client=client,
            resolver=resolver,
        )
        result = _result(now)
        with pytest.raises(AddressRefused) as info:
            sink.deliver(result, canonical_payload(result))
    assert not info.value.retryable and info.value.code == "address_refused"
    assert reason in str(info.value) and "MIXBATCH_WEBHOOK_ALLOW" in str(info.value)


def test_a_refused_address_is_a_dead_letter_at_once(
    store: LaneStore, service_config: ServiceConfig, receiver: Receiver, now: float
) -> None:
    ctx = SinkContext(sink_settings(webhook_allow=[]), redis=store.redis)
    try:
        rid = finished(store, service_config, now, _hook(receiver))
        out = deliver_once(store, ctx, rid, now + 1)
    finally:
        ctx.close()
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


@pytest.mark.parametrize(
    "url,fragment",
    [
        ("ftp://example.com/hook", "scheme 'ftp'"),
        ("file:///etc/passwd", "scheme 'file'"),
        ("gopher://example.com/", "scheme 'gopher'"),
        ("example.com/hook", "scheme '(none)'"),
        ("http:///hook", "has no host"),
    ],
)
def test_a_non_http_url_is_refused_at_submit(url: str, fragment: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        coerce_request({"body": BODY, "callback": {"kind": "webhook", "url": url}})
    assert info.value.field == "callback.url"
    assert fragment in str(info.value)


# -- verify_signature --------------------------------------------------------------------------

PAYLOAD = b'{"id":"standard.01X","status":"done"}'


def test_verify_signature_accepts_a_fresh_signature() -> None:
    header = signature_header(SECRET, PAYLOAD, timestamp=1_700_000_000)
    assert verify_signature(SECRET, header, PAYLOAD, now=1_700_000_100)
    assert verify_signature(SECRET.encode(), header, PAYLOAD, now=1_700_000_100)


def test_verify_signature_has_a_replay_window() -> None:
    header = signature_header(SECRET, PAYLOAD, timestamp=1_700_000_000)
    assert verify_signature(SECRET, header, PAYLOAD, now=1_700_000_300)
    assert not verify_signature(SECRET, header, PAYLOAD, now=1_700_000_301), "too old"
    assert not verify_signature(SECRET, header, PAYLOAD, now=1_699_999_600), "from the future"
    assert verify_signature(SECRET, header, PAYLOAD, tolerance=3600, now=1_700_003_000)


def test_verify_signature_refuses_a_tampered_body_or_another_key() -> None:
    header = signature_header(SECRET, PAYLOAD, timestamp=1_700_000_000)
    at = 1_700_000_001
    assert not verify_signature(SECRET, header, PAYLOAD.replace(b"done", b"fail"), now=at)
    assert not verify_signature(SECRET, header, PAYLOAD + b" ", now=at)
    assert not verify_signature("another-secret", header, PAYLOAD, now=at)
    moved = header.replace("t=1700000000", "t=1700000001")
    assert not verify_signature(SECRET, moved, PAYLOAD, now=at), "the timestamp is signed too"


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "garbage",
        "t=1700000000",
        "v1=00ff",
        "t=soon,v1=00ff",
        "t=1700000000;v1=00ff",
        "t=1700000000,v1=",
        "t=1700000000,v1=é",
    ],
)
def test_verify_signature_refuses_a_bad_header(header: str | None) -> None:
    assert not verify_signature(SECRET, header, PAYLOAD, now=1_700_000_000)


def test_verify_signature_accepts_any_of_several_v1_during_rotation() -> None:
    old = signature_header("old-secret", PAYLOAD, timestamp=1_700_000_000)
    new = signature_header(SECRET, PAYLOAD, timestamp=1_700_000_000).split(",")[1]
    assert verify_signature(SECRET, f"{old},{new}", PAYLOAD, now=1_700_000_000)
    assert verify_signature("old-secret", f"{old},{new}", PAYLOAD, now=1_700_000_000)


def test_sink_for_a_webhook_spec(context: SinkContext) -> None:
    sink = sink_for(WebhookCallback(url="https://example.com/hook"), context)
    assert isinstance(sink, WebhookSink)
    assert sink.max_payload_bytes == 1_000_000


def test_delivery_error_names_the_sink() -> None:
    err = PayloadTooLarge("webhook", 10, 5)
    assert str(err).startswith("webhook sink: ")
    assert isinstance(err, DeliveryError) and not err.retryable
