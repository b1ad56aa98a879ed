"""Secrets never leak: not through a URL in a message, not through redis-py's complaint about a
malformed URL, not through a SQL sink's errors, and not through what a producer sends through
Celery (the message's headers, the ``task-sent`` event, the worker's log and Flower).

Each case here failed before its fix: ``redact_url`` let a password holding ``/``, ``#`` or
``?`` through whole (a URL parser ends the host part there, so it never saw a password), the
SQL sink rendered URLs with SQLAlchemy's ``hide_password``, which keeps ``?password=``, redis-py
quoted the start of such a password back ("Port could not be cast to integer value as 'pa'"),
and a producer's ``send_task`` carried the request's body as its ``argsrepr``.
"""

from __future__ import annotations

import base64
import json
import traceback
import uuid
from typing import Any

import pytest
import redis
from celery import Celery

from config.redaction import is_readable, summarize
from routing.client import Client
from routing.contrib.common import (
    ENQUEUE_TASK,
    enqueue_options,
    request_summary,
    send_enqueue,
)
from routing.errors import ConfigError
from routing.models import Result
from routing.sinks import DeliveryError, canonical_payload
from routing.sinks.sql import EngineCache, SqlSink
from routing.sinks.table import SqlTarget
from routing.states import State
from routing.store.base import redact_url
from routing.store.lanes import LaneStore
from tests.test_sinks_webhook import sink_settings

PASSWORD_CASES = [
    ("redis://:pa/ss@cache.internal:6379/0", "pa/ss", "redis://:***@cache.internal:6379/0"),
    ("redis://user:p#ss@cache.internal/0", "p#ss", "redis://user:***@cache.internal/0"),
    ("redis://:p?ss=1@cache.internal/0", "p?ss=1", "redis://:***@cache.internal/0"),
    ("rediss://:p@ss/w0rd@cache.internal:6380", "p@ss/w0rd", "rediss://:***@cache.internal:6380"),
    ("redis://:s3cr#t/x?y@h/0?db=1", "s3cr#t/x?y", "redis://:***@h/0?db=1"),
    (
        "postgresql://app@db.internal/app?passwd=s3cret&sslmode=require",
        "s3cret",
        "postgresql://***@db.internal/app?passwd=***&sslmode=require",
    ),
    (
        "postgresql://app:pw1@db/app?sslpassword=k3y-pass",
        "k3y-pass",
        "postgresql://app:***@db/app?sslpassword=***",
    ),
    ("redis://cache/0?password=a#b/c", "a#b/c", "redis://cache/0?password=***"),
]


@pytest.mark.parametrize(("url", "password", "expected"), PASSWORD_CASES)
def test_redact_url_hides_passwords_with_url_delimiters(
    url: str, password: str, expected: str
) -> None:
    shown = redact_url(url)
    assert shown == expected
    for piece in {password, *password.replace("#", "/").replace("?", "/").split("/")}:
        if len(piece) >= 2:
            assert piece not in shown


@pytest.mark.parametrize(
    "url",
    [
        "redis://localhost:6379/0",
        "redis://cache.internal/3?socket_timeout=5",
        "unix:///run/redis.sock?db=2",
        "postgresql://db.internal:5432/app",
    ],
)
def test_redact_url_leaves_urls_without_a_password_alone(url: str) -> None:
    assert redact_url(url) == url


@pytest.mark.parametrize("password", ["pa/ss", "s3cr#t", "sec?ret"])
def test_a_malformed_redis_url_is_our_error_without_the_password(password: str) -> None:
    """redis-py reads an unencoded '/' in a password as the end of the host and quotes what it
    took for a port: the start of the password. The client says which URL, redacted."""
    url = f"redis://:{password}@cache.internal:6379/0"
    with pytest.raises(ConfigError) as info:
        Client(url)
    text = "".join(traceback.format_exception(info.value))
    prefix = password[:3]
    assert prefix not in text, text
    assert "redis://:***@cache.internal:6379/0" in str(info.value)
    assert "MIXBATCH_REDIS_URL" in str(info.value) and "%2F" in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_the_lane_store_refuses_the_same_way() -> None:
    with pytest.raises(ConfigError) as info:
        LaneStore.from_url("redis://:pa/ss@cache.internal:6379/0")
    assert "'pa'" not in str(info.value)


def test_a_sql_sink_error_hides_a_query_password(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing listens on port 1: the connection is refused, and the error names the URL."""
    monkeypatch.setenv("MIXBATCH_TEST_DB_URL", "postgresql://app@127.0.0.1:1/app?password=s3cret")
    pytest.importorskip("psycopg")
    engines = EngineCache(connect_timeout_s=2)
    sink = SqlSink(
        SqlTarget(name="appdb", url_env="MIXBATCH_TEST_DB_URL"),
        settings=sink_settings(sql_connect_timeout_s=2),
        engines=engines,
    )
    result = Result(id="standard.01X", lane="standard", status=State.DONE, deadline=0, created_at=0)
    try:
        with pytest.raises(DeliveryError) as info:
            sink.deliver(result, canonical_payload(result))
    finally:
        engines.close()
    assert info.value.code == "sql_unavailable"
    assert "s3cret" not in str(info.value)
    assert "password=***" in str(info.value)


# -- what producers send through Celery ---------------------------------------------------------

MARKER = f"confidential-{uuid.uuid4().hex}"
REQUEST: dict[str, Any] = {
    "lane": "urgent",
    "custom_id": "doc-1",
    "endpoint": "/v1/embeddings",
    "body": {"model": "text-embedding-3-small", "input": f"{MARKER} in the body"},
    "metadata": {"note": f"{MARKER} in the metadata"},
    "callback": {"sink": "crm"},
}


def _sent(redis_url: str, queue: str, send: Any) -> dict[str, Any]:
    """The raw message a producer put on the broker, as the broker holds it."""
    producer = Celery("producer", broker=redis_url, set_as_current=False)
    try:
        send(producer)
    finally:
        producer.close()
    client = redis.Redis.from_url(redis_url)
    try:
        [raw] = client.lrange(queue, 0, -1)
        client.delete(queue)
    finally:
        client.close()
    message: dict[str, Any] = json.loads(raw)
    return message


def test_send_enqueue_keeps_the_body_out_of_the_headers(redis_url: str, namespace: str) -> None:
    queue = f"{namespace}.control"
    message = _sent(redis_url, queue, lambda app: send_enqueue(app, REQUEST, queue=queue))
    headers = message["headers"]
    assert headers["task"] == ENQUEUE_TASK
    assert headers["argsrepr"] == "lane=urgent custom_id=doc-1 endpoint=/v1/embeddings"
    assert headers["kwargsrepr"] == "{}"
    assert is_readable(headers["argsrepr"])
    assert MARKER not in json.dumps(headers), "nothing of the request in the headers"
    args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
    assert args == [REQUEST] and kwargs == {}, "the request itself still travels, as the argument"


def test_a_bare_send_task_puts_the_body_in_the_headers(redis_url: str, namespace: str) -> None:
    """What ``send_enqueue`` is for: Celery's default argsrepr is the repr of the request."""
    queue = f"{namespace}.control"
    message = _sent(
        redis_url,
        queue,
        lambda app: app.send_task(ENQUEUE_TASK, args=[REQUEST], queue=queue),
    )
    assert MARKER in message["headers"]["argsrepr"]


def test_enqueue_options_are_what_send_task_takes() -> None:
    options = enqueue_options(REQUEST)
    assert options["queue"] == "mixbatch.control"
    assert options["args"] == [REQUEST] and options["args"][0] is not REQUEST
    assert MARKER not in options["argsrepr"] + options["kwargsrepr"]


@pytest.mark.parametrize(
    "custom_id",
    [f"{MARKER} typed into an id", "doc {1}", "doc'1", "a\r\nb", "x" * 500],
)
def test_a_summary_leaves_out_values_it_cannot_vouch_for(custom_id: str) -> None:
    """The worker summarises a request before it is validated: a custom_id that holds text
    (or braces, quotes, CR/LF) is left out, not shown."""
    request = {**REQUEST, "custom_id": custom_id}
    for text in (request_summary(request), summarize(ENQUEUE_TASK, [request])):
        assert custom_id not in text and MARKER not in text
        assert text == "lane=urgent endpoint=/v1/embeddings"
        assert is_readable(text)
