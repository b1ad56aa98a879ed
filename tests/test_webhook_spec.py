"""Webhooks follow Standard Webhooks: a receiver verifies every delivery with the spec's own
library (``standardwebhooks``: ``Webhook(secret).verify(body, headers)``), never with mixbatch.

The receiver is a small HTTP server on loopback, in a thread. Each request's raw body and
headers go through the library; a delivery it refuses gets 401 (and so goes to the dead letters,
as a 4xx does). Deliveries are real: requests submitted, finished and delivered through
``run_delivery`` against a real Redis, to a sink named in a ``SinkTable``.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from routing.callbacks import SinkCallback
from routing.engine.deliver import Outcome
from routing.models import ServiceConfig
from routing.sinks import SinkContext, sink_for, verify_signature
from routing.sinks.signing import new_secret, webhook_headers
from routing.states import State
from routing.store.lanes import LaneStore
from tests.test_sinks_webhook import (
    HOOK,
    deliver_once,
    finished,
    hook,
    serving,
    sink_settings,
    webhook_context,
    webhook_target,
)

NEW_ENV, OLD_ENV = "MIXBATCH_TEST_SPEC_SECRET", "MIXBATCH_TEST_SPEC_SECRET_OLD"


@dataclass
class Seen:
    """One delivery as the receiver saw it, and what the library said of it."""

    headers: dict[str, str]
    body: bytes
    verified: Any = None
    refused: str | None = None


@dataclass
class SpecReceiver:
    """Verifies with ``Webhook(secret).verify`` for each of ``secrets`` (a receiver that knows
    either key accepts); dedupes on the signed ``webhook-id``, as the docs tell receivers to."""

    secrets: list[str]
    seen: list[Seen] = field(default_factory=list)
    applied: dict[str, Any] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""

    def handle(self, headers: dict[str, str], body: bytes) -> int:
        seen = Seen(headers, body)
        for secret in self.secrets:
            try:
                seen.verified = Webhook(secret).verify(body, headers)
                seen.refused = None
                break
            except WebhookVerificationError as exc:
                seen.refused = str(exc)
        with self.lock:
            self.seen.append(seen)
            if seen.refused is not None:
                return 401
            self.applied.setdefault(headers["webhook-id"], seen.verified)
        return 204


@contextmanager
def spec_receiver(*secrets: str) -> Iterator[SpecReceiver]:
    rec = SpecReceiver(list(secrets))

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            status = rec.handle(dict(self.headers.items()), body)
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    with serving(Handler) as server:
        rec.url = f"http://127.0.0.1:{server.server_address[1]}/hooks"
        yield rec


@pytest.fixture
def secrets(monkeypatch: pytest.MonkeyPatch) -> tuple[str, str]:
    """The sink's current and previous secrets, in the variables the table names."""
    new, old = new_secret(), new_secret()
    monkeypatch.setenv(NEW_ENV, new)
    monkeypatch.setenv(OLD_ENV, old)
    return new, old


def context_for(
    store: LaneStore, url: str, *, rotating: bool = False, **settings: Any
) -> SinkContext:
    target = webhook_target(url, secret_env=NEW_ENV, previous=OLD_ENV if rotating else None)
    return webhook_context(store, target, settings=sink_settings(**settings))


def deliver_to(
    store: LaneStore,
    config: ServiceConfig,
    receiver_secret: str,
    *,
    tenants: tuple[str, ...] = ("acme",),
    rotating: bool = False,
    signed_ago_s: float = 0.0,
) -> tuple[SpecReceiver, list[str], list[Outcome]]:
    """Requests of ``tenants`` finished and delivered, one attempt each, to a receiver that
    knows ``receiver_secret``; the sink signs ``signed_ago_s`` in the past."""
    now = time.time()
    receiver = spec_receiver(receiver_secret)
    with receiver as rec, closing(context_for(store, rec.url, rotating=rotating)) as ctx:
        ctx.clock = lambda: time.time() - signed_ago_s
        ids = [
            finished(store, config, now - 5, hook(), tenant=tenant, custom_id=f"d{i}")
            for i, tenant in enumerate(tenants)
        ]
        outcomes = [deliver_once(store, ctx, rid, now) for rid in ids]
    return rec, ids, outcomes


def test_every_delivery_verifies_with_the_standard_webhooks_library(
    store: LaneStore, service_config: ServiceConfig, secrets: tuple[str, str]
) -> None:
    new, _ = secrets
    rec, ids, outcomes = deliver_to(store, service_config, new, tenants=("acme",) * 3)
    assert [o.status for o in outcomes] == ["delivered"] * 3
    assert [s.refused for s in rec.seen] == [None] * 3
    for rid, seen in zip(ids, rec.seen, strict=True):
        assert seen.headers["webhook-id"] == rid
        assert seen.verified["id"] == rid, "the body's id is the request id"
        assert abs(int(seen.headers["webhook-timestamp"]) - time.time()) < 60
    assert set(rec.applied) == set(ids)
    assert all(store.status(rid).state is State.DELIVERED for rid in ids)


@pytest.mark.parametrize("receiver_knows", ["new", "old"])
def test_during_a_rotation_either_secret_verifies(
    store: LaneStore,
    service_config: ServiceConfig,
    secrets: tuple[str, str],
    receiver_knows: str,
) -> None:
    new, old = secrets
    known = new if receiver_knows == "new" else old
    rec, [rid], [out] = deliver_to(store, service_config, known, rotating=True)
    assert out.status == "delivered"
    [seen] = rec.seen
    assert seen.refused is None and seen.verified["id"] == rid
    signatures = seen.headers["webhook-signature"].split(" ")
    assert len(signatures) == 2 and all(s.startswith("v1,") for s in signatures)


def test_after_a_rotation_the_retired_secret_no_longer_verifies(
    store: LaneStore, service_config: ServiceConfig, secrets: tuple[str, str]
) -> None:
    _, old = secrets
    rec, _, [out] = deliver_to(store, service_config, old, rotating=False)
    [seen] = rec.seen
    assert seen.refused == "No matching signature found"
    assert out.status == "dead letter" and out.error is not None and out.error.status_code == 401


def test_the_secret_is_the_sinks_never_a_tenants(
    store: LaneStore,
    service_config: ServiceConfig,
    secrets: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Whatever tenant a producer names, and whatever per-tenant secrets an old configuration
    still sets, the delivery is signed with the sink target's secret."""
    new, _ = secrets
    tenant_secret = new_secret()
    monkeypatch.setenv("MIXBATCH_WEBHOOK_SECRETS", json.dumps({"acme": tenant_secret}))
    monkeypatch.setenv("MIXBATCH_WEBHOOK_SECRET", tenant_secret)
    rec, _, outcomes = deliver_to(store, service_config, new, tenants=("acme", "x"))
    assert [o.status for o in outcomes] == ["delivered"] * 2
    assert [s.refused for s in rec.seen] == [None, None]
    for seen in rec.seen:
        with pytest.raises(WebhookVerificationError):
            Webhook(tenant_secret).verify(seen.body, seen.headers)


def test_a_tampered_body_fails_verification(
    store: LaneStore, service_config: ServiceConfig, secrets: tuple[str, str]
) -> None:
    new, _ = secrets
    rec, _, [out] = deliver_to(store, service_config, new)
    assert out.status == "delivered"
    [seen] = rec.seen
    tampered = seen.body.replace(b'"status":"done"', b'"status":"failed"')
    assert tampered != seen.body
    with pytest.raises(WebhookVerificationError, match="No matching signature"):
        Webhook(new).verify(tampered, seen.headers)
    other_id = {**seen.headers, "webhook-id": "standard.01OTHER"}
    with pytest.raises(WebhookVerificationError, match="No matching signature"):
        Webhook(new).verify(seen.body, other_id)
    assert not verify_signature(new, seen.headers, tampered)
    assert verify_signature(new, seen.headers, seen.body), "our helper agrees with the library"


def test_an_old_timestamp_fails_verification(
    store: LaneStore, service_config: ServiceConfig, secrets: tuple[str, str]
) -> None:
    """A delivery signed ten minutes ago (a replay, or a sender's clock that is off) is refused
    by the receiver, and so is a dead letter until someone looks."""
    new, _ = secrets
    rec, _, [out] = deliver_to(store, service_config, new, signed_ago_s=600)
    [seen] = rec.seen
    assert seen.refused == "Message timestamp too old"
    assert out.status == "dead letter" and out.error is not None and out.error.status_code == 401
    assert not verify_signature(new, seen.headers, seen.body)


def test_our_signing_matches_the_librarys_own() -> None:
    secret = new_secret()
    body = b'{"id":"standard.01X","status":"done","body":{"text":"caf\xc3\xa9"}}'
    stamp = int(time.time())
    ours = webhook_headers([secret], "standard.01X", body, timestamp=stamp)
    theirs = Webhook(secret).sign("standard.01X", datetime.fromtimestamp(stamp, UTC), body.decode())
    assert ours["webhook-signature"] == theirs
    assert Webhook(secret).verify(body, ours)["id"] == "standard.01X"


def test_sink_for_names_the_sink(store: LaneStore, secrets: tuple[str, str]) -> None:
    with closing(context_for(store, "http://127.0.0.1:9/hooks")) as ctx:
        assert sink_for(SinkCallback(sink=HOOK), ctx).kind == "webhook"
