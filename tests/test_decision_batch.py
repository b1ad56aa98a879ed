"""A claim's route decisions are kept in a few ``save_decision.lua`` calls, not one per request
(issue 16), and ``explain`` still finds every request's own decision. Real Redis."""

from __future__ import annotations

import time

from redis.crc import key_slot

from routing.decide.route import Decision, choose_routes
from routing.models import LaneSpec, Prepared, Request, Route, ServiceConfig, prepare
from routing.store.base import DECISION_CHUNK, decision_calls
from routing.store.lanes import LaneStore
from routing.store.observations import DecisionStore
from tests.test_route_choice import options

CHAT = "/v1/chat/completions"


def evalsha_calls(store: LaneStore) -> int:
    stats = store.redis.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


def test_a_claim_is_saved_per_shard_and_chunk_and_explained_per_request(
    store: LaneStore, service_config: ServiceConfig
) -> None:
    wide = LaneSpec(name="wide", deadline_s=3600, max_queued=10_000, shards=3)
    config = ServiceConfig(lanes=(*service_config.lanes, wide))
    store.publish_config(config)
    now = time.time()
    items: list[Prepared] = []
    for i in range(DECISION_CHUNK + 300):  # bulk: one shard, two chunks
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"t{i}"}]}
        items.append(prepare(Request(lane="bulk", endpoint=CHAT, body=body), config, now))
    for i in range(60):  # wide: three shards; every fifth a body far longer, its own class
        text = "word " * (2000 if i % 5 == 0 else 1)
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]}
        items.append(prepare(Request(lane="wide", endpoint=CHAT, body=body), config, now))
    tickets = store.submit_many(items, config, now=now)
    requests = {t.id: p for t, p in zip(tickets, items, strict=True)}
    chosen = choose_routes(requests, now, options())
    gone = f"bulk.{'0' * 26}"
    chosen[gone] = Decision(route=Route.REALTIME, provider="openai", reason="vanished")

    calls = list(decision_calls(store.keys, chosen))
    for keys, args in calls:
        assert len({key_slot(k.encode()) for k in keys}) == 1, "one slot per call"
        assert len(keys) <= DECISION_CHUNK and int(args[0]) < len(keys)
    shards = {(rid.split(".")[0], store.keys.request(rid).split("}")[0]) for rid in chosen}
    assert len(calls) == len(shards) + 1  # bulk's second chunk

    decisions = DecisionStore(store.redis, store.keys, url=store.url)
    before = evalsha_calls(store)
    decisions.save_many(chosen)
    assert evalsha_calls(store) - before == len(calls)
    assert not store.redis.exists(store.keys.request(gone)), "no hash resurrected"
    for rid in requests:
        found = decisions.explain(rid)
        assert found.decisions == 1
        assert found.decision is not None
        assert found.decision.model_dump() == chosen[rid].model_dump(), rid
    long_ones = {chosen[t.id].reason for t in tickets[-60::5]}
    assert long_ones.isdisjoint({chosen[t.id].reason for t in tickets[-59::5]})
