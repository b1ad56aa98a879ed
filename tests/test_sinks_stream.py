"""Redis stream sink against the real test Redis: one entry per request id, bounded length.

Each stream is a named sink (``StreamTarget``); its key and ``maxlen`` are checked when the table
is loaded (``tests/test_sink_table.py``), the namespace again before each write.
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from pydantic import ValidationError
from redis.crc import key_slot

from routing.callbacks import SinkCallback
from routing.keys import Keys
from routing.models import Result, ServiceConfig
from routing.sinks import DeliveryError, PayloadTooLarge, SinkContext, canonical_payload, sink_for
from routing.sinks.table import StreamTarget
from routing.states import State
from routing.store.lanes import LaneStore
from tests.test_sink_table import context_for, deliver, finished, sink_settings

ANSWERS = SinkCallback(sink="answers")


@pytest.fixture
def key(store: LaneStore) -> Iterator[str]:
    name = f"results:{uuid.uuid4().hex[:8]}"
    yield name
    store.redis.delete(name)


@pytest.fixture
def context(store: LaneStore, key: str) -> Iterator[SinkContext]:
    ctx = context_for(store, StreamTarget(name="answers", key=key, maxlen=1000))
    yield ctx
    ctx.close()


def stream_context(store: LaneStore, target: StreamTarget, **settings: Any) -> SinkContext:
    return context_for(store, target, settings=sink_settings(**settings))


def a_result(n: int = 0, **fields: object) -> Result:
    now = time.time()
    values: dict[str, object] = {
        "id": f"standard.01STREAM{n:06d}",
        "custom_id": f"doc-{n}",
        "tenant": "acme",
        "lane": "standard",
        "status": State.DONE,
        "body": {"n": n},
        "deadline": now + 60,
        "created_at": now,
    }
    values.update(fields)
    return Result.model_validate(values)


def test_delivering_twice_adds_one_entry(store: LaneStore, context: SinkContext, key: str) -> None:
    result = a_result(1)
    payload = canonical_payload(result)
    sink = sink_for(ANSWERS, context)
    sink.deliver(result, payload)
    sink.deliver(result, payload)
    sink_for(ANSWERS, context).deliver(result, payload)
    [(entry_id, fields)] = store.redis.xrange(key)
    assert fields[b"id"] == result.id.encode()
    assert fields[b"custom_id"] == b"doc-1"
    assert (fields[b"tenant"], fields[b"status"]) == (b"acme", b"done")
    assert fields[b"payload"] == payload
    assert json.loads(fields[b"payload"])["body"] == {"n": 1}
    marker = store.keys.stream_marker(key, result.id)
    assert store.redis.get(marker) == entry_id
    assert 0 < store.redis.ttl(marker) <= 7 * 86400


def test_delivering_twice_through_the_store_adds_one_entry(
    store: LaneStore, service_config: ServiceConfig, context: SinkContext, key: str
) -> None:
    now = time.time()
    rid = finished(store, service_config, now, {"sink": "answers"})
    assert deliver(store, context, rid, now + 1).status == "delivered"
    result = store.result(rid)
    assert result is not None
    sink_for(ANSWERS, context).deliver(result, canonical_payload(result))
    assert store.redis.xlen(key) == 1
    [(_, fields)] = store.redis.xrange(key)
    assert fields[b"id"] == rid.encode()


def test_maxlen_bounds_the_stream(store: LaneStore, key: str) -> None:
    ctx = stream_context(store, StreamTarget(name="answers", key=key, maxlen=10))
    try:
        sink = sink_for(ANSWERS, ctx)
        for n in range(300):
            result = a_result(n)
            sink.deliver(result, canonical_payload(result))
    finally:
        ctx.close()
    length = store.redis.xlen(key)
    # MAXLEN ~ trims whole macro nodes (100 entries by default): at least 10, well under 300.
    assert 10 <= length <= 10 + 100
    [(_, newest)] = store.redis.xrevrange(key, count=1)
    assert newest[b"id"] == a_result(299).id.encode(), "the newest entries are the ones kept"


def test_the_default_maxlen_comes_from_settings(store: LaneStore, key: str) -> None:
    ctx = stream_context(store, StreamTarget(name="answers", key=key), stream_maxlen=5)
    try:
        sink = sink_for(ANSWERS, ctx)
        assert getattr(sink, "maxlen", None) == 5
        for n in range(250):
            result = a_result(n)
            sink.deliver(result, canonical_payload(result))
    finally:
        ctx.close()
    assert store.redis.xlen(key) <= 5 + 100


def test_the_ceiling_holds_at_delivery_too(store: LaneStore, key: str) -> None:
    """A target built in code, past the load's check, is still trimmed at the ceiling."""
    target = StreamTarget(name="answers", key=key, maxlen=50_000_000)
    ctx = stream_context(store, target, stream_maxlen_ceiling=1000)
    try:
        assert getattr(sink_for(ANSWERS, ctx), "maxlen", None) == 1000
    finally:
        ctx.close()


def test_a_stream_on_another_redis(
    store: LaneStore, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``url_env`` names another Redis (its URL, and password, stay in the environment)."""
    other = redis_url.rsplit("/", 1)[0] + "/14"
    monkeypatch.setenv("OTHER_REDIS_URL", other)
    name = f"elsewhere:{uuid.uuid4().hex[:6]}"
    target = StreamTarget(name="answers", key=name, url_env="OTHER_REDIS_URL")
    ctx = stream_context(store, target)
    result = a_result(3)
    try:
        sink_for(ANSWERS, ctx).deliver(result, canonical_payload(result))
    finally:
        ctx.close()
    client = redis.Redis.from_url(other)
    try:
        assert client.xlen(name) == 1
        client.delete(name, store.keys.stream_marker(name, result.id))
    finally:
        client.close()
    assert store.redis.exists(name) == 0


def test_a_key_inside_the_service_namespace_is_refused_on_any_redis(store: LaneStore) -> None:
    """The load refuses it (tests/test_sink_table.py); a target built in code past the load
    is refused before the write, whichever Redis it names."""
    result = a_result()
    ctx = stream_context(store, StreamTarget(name="answers", key=store.keys.queue("standard")))
    try:
        with pytest.raises(DeliveryError) as info:
            sink_for(ANSWERS, ctx).deliver(result, canonical_payload(result))
    finally:
        ctx.close()
    assert not info.value.retryable and "namespace" in str(info.value)
    assert store.redis.type(store.keys.queue("standard")) != b"stream"


def test_a_key_of_another_type_is_not_retried(
    store: LaneStore, context: SinkContext, key: str
) -> None:
    store.redis.set(key, "not a stream")
    result = a_result()
    with pytest.raises(DeliveryError) as info:
        sink_for(ANSWERS, context).deliver(result, canonical_payload(result))
    assert not info.value.retryable and "WRONGTYPE" in str(info.value)
    assert store.redis.get(store.keys.stream_marker(key, result.id)) is None


def test_an_unreachable_redis_is_retried(
    store: LaneStore, service_config: ServiceConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("GONE_REDIS_URL", f"redis://127.0.0.1:{port}/0")
    ctx = stream_context(store, StreamTarget(name="answers", key="s", url_env="GONE_REDIS_URL"))
    now = time.time()
    rid = finished(store, service_config, now, {"sink": "answers"})
    try:
        out = deliver(store, ctx, rid, now + 1)
    finally:
        ctx.close()
    assert out.status == "retry" and out.error is not None
    assert out.error.code == "redis_unavailable" and out.error.retryable
    assert store.result(rid) is not None


def test_a_result_too_large_for_the_stream(store: LaneStore, key: str) -> None:
    target = StreamTarget(name="answers", key=key)
    ctx = stream_context(store, target, sink_max_payload_bytes={"stream": 64})
    try:
        result = a_result()
        with pytest.raises(PayloadTooLarge) as info:
            sink_for(ANSWERS, ctx).deliver(result, canonical_payload(result))
    finally:
        ctx.close()
    assert "stream sink" in str(info.value) and "limit of 64" in str(info.value)
    assert store.redis.exists(key) == 0


@pytest.mark.parametrize("stream", ["results", "{tenant:acme}:results", "a{b}c", "x}y{z}"])
def test_the_marker_shares_the_streams_slot(stream: str) -> None:
    StreamTarget(name="s", key=stream)
    assert key_slot(Keys("mb").stream_marker(stream, "standard.01X").encode()) == key_slot(
        stream.encode()
    )


@pytest.mark.parametrize("stream", ["odd}{key", "{}x", "", "a\rb", "a\nb", "nul\x00"])
def test_a_bad_stream_key_is_refused(stream: str) -> None:
    with pytest.raises(ValidationError):
        StreamTarget(name="s", key=stream)
