"""Redis does not grow with the traffic already served (issue 12, "Nothing grows without bound").

Requests are submitted, answered, delivered (some dead-lettered, some cancelled, some retried)
on the real test Redis, with a result TTL of one second; once the results have expired (real
time) and the sweeper has run, the namespace holds as many keys after 1,100 requests as after
100. Before, each lane's ``finished`` index kept an entry per request ever finished, and the
dead-letter list kept every entry ever filed.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
import redis

from routing.engine.sweep import sweep
from routing.models import (
    Claimed,
    ErrorInfo,
    Prepared,
    Request,
    Route,
    ServiceConfig,
    StoredResult,
    prepare,
)
from routing.states import State
from routing.store import ledger
from routing.store import submit as store_submit
from routing.store.lanes import LaneStore

LANES = ("urgent", "standard", "bulk")
TTL_S = 1
GONE = ErrorInfo(code="http_410", message="the receiver is gone", status_code=410)
BUSY = ErrorInfo(code="rate_limited", message="429", retryable=True, status_code=429)


@pytest.fixture
def short_lived(
    redis_url: str, service_config: ServiceConfig, monkeypatch: pytest.MonkeyPatch
) -> Iterator[LaneStore]:
    """A store whose results live one second, in a namespace of its own.

    A custom_id reservation lasts the wait to its deadline (capped), the result TTL and an hour
    of slack; here only the result TTL, so that it too expires within the test.
    """
    monkeypatch.setattr(store_submit, "IDEMPOTENCY_WAIT_MAX_S", 0)
    monkeypatch.setattr(store_submit, "IDEMPOTENCY_SLACK_S", 0)
    st = LaneStore(
        redis.Redis.from_url(redis_url),
        namespace=f"g{uuid.uuid4().hex[:10]}",
        url=redis_url,
        result_ttl_s=TTL_S,
    )
    st.publish_config(service_config)
    yield st
    st.close()


def keys_of(store: LaneStore) -> list[str]:
    """Every live key of the namespace (SCAN skips keys whose TTL has run out; DBSIZE does not)."""
    return sorted(k.decode() for k in store.redis.scan_iter(match=f"{store.keys.ns}:*", count=1000))


def sizes(store: LaneStore, keys: list[str]) -> dict[str, int]:
    """Entries per key (members, fields, items; 1 for a string): a key that grows counts too."""
    measure = {"zset": "zcard", "hash": "hlen", "set": "scard", "list": "llen", "stream": "xlen"}
    out = {}
    for key in keys:
        kind = store.redis.type(key).decode()
        out[key] = getattr(store.redis, measure[kind])(key) if kind in measure else 1
    return out


def serve(store: LaneStore, config: ServiceConfig, n: int, round_: int) -> None:
    """Serve ``n`` requests, 100 at a time (so each is done well within its one-second TTL):
    most answered and delivered, every 10th dead-lettered, every 25th cancelled while queued,
    every 7th retried once first."""
    for start in range(0, n, 100):
        serve_chunk(store, config, [f"r{round_}-{i}" for i in range(start, min(n, start + 100))])


def serve_chunk(store: LaneStore, config: ServiceConfig, names: list[str]) -> None:
    now = time.time()
    items = [
        prepare(
            Request(
                lane=LANES[i % 3],
                custom_id=name,
                deadline=now + 3600,
                body={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": name}]},
                metadata={"job": name},
            ),
            config,
            now,
        )
        for i, name in enumerate(names)
    ]
    tickets = store.submit_many(items, config, now=now)
    cancelled = {t.id for i, t in enumerate(tickets) if i % 25 == 0}
    for rid in cancelled:
        assert store.cancel(rid, now=now) is State.CANCELLED
    retried: set[str] = set()
    answered: list[Claimed] = []
    while claimed := store.claim_lanes(config.lanes, 500, lease_s=30, now=now):
        assert claimed.failed == []
        store.start_many(claimed, state=State.RUNNING, route=Route.REALTIME, lease_s=30, now=now)
        finishes = []
        for i, c in enumerate(claimed):
            if i % 7 == 0 and c.id not in retried:
                retried.add(c.id)
                assert store.requeue(c.id, c.token, BUSY, now=now) is State.QUEUED
                continue
            result = StoredResult.model_validate({"body": {"ok": i}, "cost_usd": 0.001})
            finishes.append((c.id, c.token, State.DONE, result))
            answered.append(c)
        assert all(store.finish_many(finishes, now=now))
    cost = ledger.Cost(cost_usd=0.001, saved_usd=0.0, estimated_usd=0.001, priced=True)
    ledger.record_many(store, [(c.request, Route.REALTIME, cost) for c in answered])
    outbox = sorted(cancelled | {c.id for c in answered})
    assert sorted(store.claim_deliveries(outbox, lease_s=30, now=now)) == outbox
    dead = [rid for i, rid in enumerate(outbox) if i % 10 == 0]
    for rid in dead:
        assert store.dlq.add(rid, GONE, now=now)
    assert all(store.delivered_many([rid for rid in outbox if rid not in dead], now=now))


def settle_and_sweep(store: LaneStore, config: ServiceConfig) -> dict[str, int]:
    """Let every result expire (real time), run the sweeper, and size what is left (but the
    ledger, whose capped growth is checked on its own)."""
    time.sleep(TTL_S + 1.2)
    sent: list[str] = []
    report = sweep(store, config.lanes, time.time(), sent.extend)
    assert report == {"requeued": 0, "failed": 0, "expired": 0, "redelivered": 0}
    assert sent == []
    return sizes(store, [k for k in keys_of(store) if k != store.keys.ledger()])


def test_keys_do_not_grow_with_the_traffic_served(
    short_lived: LaneStore, service_config: ServiceConfig
) -> None:
    store = short_lived
    serve(store, service_config, 100, 1)
    assert len(keys_of(store)) > 100, "while results live, each request has its keys"
    after_100 = settle_and_sweep(store, service_config)

    serve(store, service_config, 1000, 2)
    after_1100 = settle_and_sweep(store, service_config)

    assert after_1100 == after_100, "the keys left, and their sizes, do not grow with traffic"
    assert len(after_1100) <= 10, after_1100
    for lane in LANES:
        k = store.keys
        assert store.redis.zcard(k.finished(lane)) == 0, "finished index trimmed"
        assert store.redis.zcard(k.dead_letters(lane)) == 0, "dead letters forgotten"
        assert store.redis.hlen(k.dead_letters(lane, "entries")) == 0
        assert store.lane_stats(lane).counts["dead_letters"] == 0
    assert store.dlq.entries() == []
    # The ledger is one key; its spend-tag rows are capped (1,100 distinct tags were sent).
    tags = [f for f in store.redis.hkeys(k.ledger()) if f.startswith(b"count|tag:")]
    assert len(tags) == ledger.MAX_COST_TAGS + 1
    assert ledger.totals(store)["tag"]["other"]["count"] > 0


def test_a_new_spend_tag_past_the_cap_is_folded_into_other(
    short_lived: LaneStore, service_config: ServiceConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tags came from producers' metadata with no bound: each new one added three fields to the
    ledger for good. Past ``MAX_COST_TAGS`` distinct tags, a new one is summed as ``tag:other``;
    a tag already kept still counts under its own name."""
    store = short_lived
    monkeypatch.setattr(ledger, "MAX_COST_TAGS", 3)
    now = time.time()
    cost = ledger.Cost(cost_usd=0.25, saved_usd=0.125, estimated_usd=0.25, priced=True)

    def request(team: str) -> Prepared:
        return prepare(
            Request(body={"model": "gpt-4o-mini", "messages": []}, metadata={"team": team}),
            service_config,
            now,
        )

    ledger.record_many(store, [(request(t), Route.BATCH, cost) for t in ("a", "b", "c", "d", "e")])
    ledger.record(store, request("a"), Route.BATCH, cost)
    ledger.record(store, request("f"), Route.BATCH, cost)
    tags = ledger.totals(store)["tag"]
    assert sorted(tags) == ["other", "team=a", "team=b", "team=c"]
    assert tags["team=a"] == {"cost": 0.5, "saved": 0.25, "count": 2}
    assert tags["other"] == {"cost": 0.75, "saved": 0.375, "count": 3}
    assert ledger.totals(store)["all"]["all"]["count"] == 7
