"""Redis stream sink against the real test Redis: one entry per request id, bounded length."""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Iterator

import pytest
import redis
from redis.crc import key_slot

from routing.callbacks import StreamCallback
from routing.errors import InvalidRequest
from routing.keys import Keys
from routing.models import Result, ServiceConfig, coerce_request
from routing.sinks import DeliveryError, PayloadTooLarge, SinkContext, canonical_payload, sink_for
from routing.states import State
from routing.store.lanes import LaneStore
from tests.test_sinks_webhook import BODY, deliver_once, finished, sink_settings


@pytest.fixture
def context(store: LaneStore) -> Iterator[SinkContext]:
    ctx = SinkContext(sink_settings(), redis=store.redis, namespace=store.keys.ns)
    yield ctx
    ctx.close()


@pytest.fixture
def key(store: LaneStore) -> Iterator[str]:
    name = f"results:{uuid.uuid4().hex[:8]}"
    yield name
    store.redis.delete(name)


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
    sink = sink_for(StreamCallback(key=key, maxlen=1000), context)
    sink.deliver(result, payload)
    sink.deliver(result, payload)
    sink_for(StreamCallback(key=key, maxlen=1000), context).deliver(result, payload)
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
    rid = finished(store, service_config, now, {"kind": "stream", "key": key})
    assert deliver_once(store, context, rid, now + 1).status == "delivered"
    result = store.result(rid)
    assert result is not None
    sink_for(StreamCallback(key=key), context).deliver(result, canonical_payload(result))
    assert store.redis.xlen(key) == 1
    [(_, fields)] = store.redis.xrange(key)
    assert fields[b"id"] == rid.encode()


def test_maxlen_bounds_the_stream(store: LaneStore, context: SinkContext, key: str) -> None:
    sink = sink_for(StreamCallback(key=key, maxlen=10), context)
    for n in range(300):
        result = a_result(n)
        sink.deliver(result, canonical_payload(result))
    length = store.redis.xlen(key)
    # MAXLEN ~ trims whole macro nodes (100 entries by default): at least 10, well under 300.
    assert 10 <= length <= 10 + 100
    [(_, newest)] = store.redis.xrevrange(key, count=1)
    assert newest[b"id"] == a_result(299).id.encode(), "the newest entries are the ones kept"


def test_the_default_maxlen_comes_from_settings(store: LaneStore, key: str) -> None:
    ctx = SinkContext(sink_settings(stream_maxlen=5), redis=store.redis, namespace=store.keys.ns)
    try:
        sink = sink_for(StreamCallback(key=key), ctx)
        assert getattr(sink, "maxlen", None) == 5
        for n in range(250):
            result = a_result(n)
            sink.deliver(result, canonical_payload(result))
    finally:
        ctx.close()
    assert store.redis.xlen(key) <= 5 + 100


def test_a_stream_on_another_redis(store: LaneStore, context: SinkContext, redis_url: str) -> None:
    other = redis_url.rsplit("/", 1)[0] + "/14"
    name = f"{store.keys.ns}:ours-there:{uuid.uuid4().hex[:6]}"  # fine: not the service's Redis
    result = a_result(3)
    sink_for(StreamCallback(key=name, redis_url=other), context).deliver(
        result, canonical_payload(result)
    )
    client = redis.Redis.from_url(other)
    try:
        assert client.xlen(name) == 1
        client.delete(name, store.keys.stream_marker(name, result.id))
    finally:
        client.close()
    assert store.redis.exists(name) == 0


def test_a_key_inside_the_service_namespace_is_refused(
    store: LaneStore, context: SinkContext
) -> None:
    result = a_result()
    sink = sink_for(StreamCallback(key=store.keys.queue("standard")), context)
    with pytest.raises(DeliveryError) as info:
        sink.deliver(result, canonical_payload(result))
    assert not info.value.retryable and "namespace" in str(info.value)


def test_a_key_of_another_type_is_not_retried(
    store: LaneStore, context: SinkContext, key: str
) -> None:
    store.redis.set(key, "not a stream")
    result = a_result()
    with pytest.raises(DeliveryError) as info:
        sink_for(StreamCallback(key=key), context).deliver(result, canonical_payload(result))
    assert not info.value.retryable and "WRONGTYPE" in str(info.value)
    assert store.redis.get(store.keys.stream_marker(key, result.id)) is None


def test_an_unreachable_redis_is_retried(
    store: LaneStore, service_config: ServiceConfig, context: SinkContext
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    now = time.time()
    callback = {"kind": "stream", "key": "s", "redis_url": f"redis://127.0.0.1:{port}/0"}
    rid = finished(store, service_config, now, callback)
    out = deliver_once(store, context, rid, now + 1)
    assert out.status == "retry" and out.error is not None
    assert out.error.code == "redis_unavailable" and out.error.retryable
    assert store.result(rid) is not None


def test_a_result_too_large_for_the_stream(store: LaneStore, key: str) -> None:
    ctx = SinkContext(sink_settings(sink_max_payload_bytes={"stream": 64}), redis=store.redis)
    try:
        result = a_result()
        with pytest.raises(PayloadTooLarge) as info:
            sink_for(StreamCallback(key=key), ctx).deliver(result, canonical_payload(result))
    finally:
        ctx.close()
    assert "stream sink" in str(info.value) and "limit of 64" in str(info.value)
    assert store.redis.exists(key) == 0


@pytest.mark.parametrize("stream", ["results", "{tenant:acme}:results", "a{b}c", "x}y{z}"])
def test_the_marker_shares_the_streams_slot(stream: str) -> None:
    StreamCallback(key=stream)
    assert key_slot(Keys("mb").stream_marker(stream, "standard.01X").encode()) == key_slot(
        stream.encode()
    )


@pytest.mark.parametrize(
    "callback,field",
    [
        ({"kind": "stream", "key": "odd}{key"}, "callback.key"),
        ({"kind": "stream", "key": "{}x"}, "callback.key"),
        ({"kind": "stream", "key": ""}, "callback.key"),
        ({"kind": "stream", "key": "s", "maxlen": 0}, "callback.maxlen"),
        ({"kind": "stream", "key": "s", "redis_url": "http://x"}, "callback.redis_url"),
    ],
)
def test_a_bad_stream_callback_is_refused_at_submit(
    callback: dict[str, object], field: str
) -> None:
    with pytest.raises(InvalidRequest) as info:
        coerce_request({"body": BODY, "callback": callback})
    assert info.value.field == field
