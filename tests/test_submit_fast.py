"""The bulk submit path's shortcuts: ids made a chunk at a time, and a prepared request built
from fields already validated. Each must give exactly what the slow way gives."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

from routing.callbacks import SinkCallback
from routing.client import as_request
from routing.keys import Keys, lane_of, new_request_ids, shard_of, ulid, ulids
from routing.models import Prepared, ServiceConfig, Ticket, prepare, trusted
from routing.store.lanes import LaneStore

BODY: dict[str, Any] = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def test_ulids_have_ulids_format_and_the_ms_prefix() -> None:
    now = time.time()
    batch = ulids(500, now)
    one = ulid(now)
    assert len(set(batch)) == 500
    for uid in batch:
        assert len(uid) == 26
        assert uid[:10] == one[:10]  # the same 48 bits of milliseconds, same encoding
        assert set(uid) <= set("0123456789ABCDEFGHJKMNPQRSTVWXYZ")
    later = ulids(3, now + 0.002)
    assert max(batch) < min(later)  # ids of a later chunk sort after
    assert ulids(0, now) == []


def test_ulids_decode_to_the_time_and_random_bits() -> None:
    now = 1_700_000_000.123
    alphabet = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
    for uid in ulids(20, now):
        value = 0
        for ch in uid:
            value = value * 32 + alphabet.index(ch)
        assert value >> 80 == int(now * 1000)


def test_new_request_ids_spread_over_shards() -> None:
    ids = new_request_ids([("bulk", 4)] * 8 + [("urgent", 1)], time.time())
    assert {shard_of(i) for i in ids[:8]} == {0, 1, 2, 3}
    assert lane_of(ids[8]) == "urgent" and shard_of(ids[8]) == 0


def test_prepare_builds_what_validation_builds(service_config: ServiceConfig) -> None:
    sinks = service_config.model_copy(update={"sinks": ("hook",)})
    now = time.time()
    for raw in (
        {"body": BODY, "lane": "bulk", "custom_id": "x", "metadata": {"a": "b"}},
        {"body": BODY, "deadline": "2h", "max_attempts": 7, "callback": {"sink": "hook"}},
    ):
        fast = prepare(as_request(raw, "t1"), sinks, now)
        slow = Prepared(**fast.model_dump())
        assert fast == slow
        assert fast.model_dump_json() == slow.model_dump_json()
        assert fast.model_fields_set == slow.model_fields_set
    assert isinstance(fast.callback, SinkCallback)


def test_trusted_equals_the_validated_model() -> None:
    fields: dict[str, Any] = {
        "id": "a.01J",
        "custom_id": None,
        "lane": "a",
        "deadline": 5.0,
        "duplicate": False,
    }
    assert trusted(Ticket, dict(fields)) == Ticket(**fields)
    assert trusted(Ticket, dict(fields)).model_copy(update={"duplicate": True}).duplicate


def test_bulk_submit_stores_and_queues_every_request(
    store: LaneStore, service_config: ServiceConfig
) -> None:
    """Over one script chunk (1000 rows): every hash, and both sorted sets, filled in one ZADD
    each per chunk, hold each request at its deadline and creation time."""
    now = time.time()
    items = [
        prepare(
            as_request(
                {"body": BODY, "lane": "standard", "deadline": timedelta(seconds=60 + n)}, "t"
            ),
            service_config,
            now,
        )
        for n in range(1200)
    ]
    tickets = store.submit_many(items, service_config, now=now)
    assert len({t.id for t in tickets}) == 1200
    keys = Keys(store.keys.ns)
    for ticket, item in zip(tickets[::97], items[::97], strict=True):
        lane, shard = lane_of(ticket.id), shard_of(ticket.id)
        assert ticket.lane == "standard" and ticket.deadline == item.deadline
        data = store.redis.hget(keys.request(ticket.id), "data")
        assert data is not None
        assert Prepared.model_validate_json(data) == item
        assert store.redis.zscore(keys.queue(lane, shard), ticket.id) == item.deadline
        assert store.redis.zscore(keys.queue_age(lane, shard), ticket.id) == now
