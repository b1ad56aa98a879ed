"""Hot lanes sharded (issue 13, item 4): a lane with ``shards = N`` spreads over N hash slots.

Submit spreads a lane's requests round robin over its shards; a request id names its shard,
so every per-request operation finds its keys from the id; claims merge the shards' queues by
priority and deadline; counts, results, sweeps, dead letters and cancel see every shard. One
end-to-end run through real workers closes the module.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.crc import key_slot

from routing.client import Client
from routing.decide.lanes import parse_lanes
from routing.engine.sweep import sweep
from routing.errors import LaneFull
from routing.keys import lane_of, new_request_id, shard_of
from routing.models import ErrorInfo, LaneSpec, Route, ServiceConfig, StoredResult
from routing.sandbox import Knobs
from routing.states import State
from routing.store.lanes import LaneStore
from tasks.cli.demo import demo_workload
from tests.test_e2e import (
    CALLBACK,
    ROOT,
    db_url,  # noqa: F401  (the fixture)
    delivered,
    make_stack,
    start_callbacks,
    wait_for,
)
from tests.test_store import make

BOOM = ErrorInfo(code="server_error", message="upstream 503", retryable=True, status_code=503)


@pytest.fixture
def now() -> float:
    return time.time()


def with_hot_lanes(base: ServiceConfig) -> ServiceConfig:
    """``base`` and ``hot`` (4 shards, 10 queued each at most) and ``tiny`` (1 queued)."""
    hot = LaneSpec(name="hot", deadline_s=600, priority=20, max_queued=40, shards=4)
    tiny = LaneSpec(name="tiny", deadline_s=600, max_queued=1)
    return ServiceConfig(lanes=(*base.lanes, hot, tiny))


@pytest.fixture
def config(service_config: ServiceConfig) -> ServiceConfig:
    return with_hot_lanes(service_config)


@pytest.fixture
def st(store: LaneStore, config: ServiceConfig) -> LaneStore:
    store.publish_config(config)
    return store


def _submit(st: LaneStore, config: ServiceConfig, now: float, n: int, **fields: Any) -> list[str]:
    items = [make(config, now, lane="hot", **fields) for _ in range(n)]
    return [t.id for t in st.submit_many(items, config, now=now)]


def test_ids_name_their_shard_and_unsharded_ids_are_unchanged(now: float) -> None:
    ids = [new_request_id("hot", now, 4) for _ in range(8)]
    assert Counter(shard_of(i) for i in ids) == {0: 2, 1: 2, 2: 2, 3: 2}
    assert {lane_of(i) for i in ids} == {"hot"}
    plain = new_request_id("bulk", now)
    assert plain.count(".") == 1 and shard_of(plain) == 0


def test_submit_spreads_over_the_shards_each_its_own_slot(
    st: LaneStore, config: ServiceConfig, now: float
) -> None:
    ids = _submit(st, config, now, 20)
    assert Counter(shard_of(i) for i in ids) == {0: 5, 1: 5, 2: 5, 3: 5}
    slots = {key_slot(st.keys.request(i).encode()) for i in ids}
    assert len(slots) == 4
    for rid in ids:
        assert st.status(rid).state is State.QUEUED and st.status(rid).lane == "hot"
    stats = st.lane_stats("hot", now=now)
    assert stats.depth == 20 and stats.counts[State.QUEUED.value] == 20
    assert sorted(st.queued_ids("hot")) == sorted(ids)
    one = st.submit_one(make(config, now, lane="hot"), config, now=now)
    assert st.status(one.id).state is State.QUEUED


def test_claims_are_earliest_deadline_first_across_the_shards(
    st: LaneStore, config: ServiceConfig, now: float
) -> None:
    # Deadlines interleaved so that the earliest ones sit in every shard, unevenly.
    deadlines = [now + 100 + ((i * 7) % 24) for i in range(24)]
    items = [make(config, now, lane="hot", deadline=d) for d in deadlines]
    tickets = st.submit_many(items, config, now=now)
    by_deadline = [t.id for t in sorted(tickets, key=lambda t: t.deadline)]
    taken: list[str] = []
    for _ in range(5):
        taken.extend(c.id for c in st.claim("hot", 5, lease_s=60, now=now))
    assert taken == by_deadline, "every claim takes the earliest deadlines of all shards"


def test_claim_lanes_keeps_priority_over_sharded_lanes(
    st: LaneStore, config: ServiceConfig, now: float
) -> None:
    hot = _submit(st, config, now, 6)
    urgent = [
        t.id for t in st.submit_many([make(config, now, lane="urgent") for _ in range(3)], config)
    ]
    bulk = [
        t.id for t in st.submit_many([make(config, now, lane="bulk") for _ in range(3)], config)
    ]
    got = [c.id for c in st.claim_lanes(config.lanes, 10, lease_s=60, now=now)]
    assert set(got[:3]) == set(urgent)  # priority 100, then hot (20), then bulk (10)
    assert set(got[3:9]) == set(hot)
    assert set(got[9:]) <= set(bulk) and len(got) == 10


def test_retries_in_any_shard_come_back_and_two_claimers_never_share(
    st: LaneStore, config: ServiceConfig, now: float
) -> None:
    ids = _submit(st, config, now, 40)
    first = st.claim("hot", 8, lease_s=60, now=now)
    for c in first:
        st.requeue(c.id, c.token, BOOM, ready_at=now + 1, now=now)
    assert st.lane_stats("hot", now=now).delayed == 8
    results: list[list[str]] = [[], []]

    def claimer(slot: int) -> None:
        while True:
            got = st.claim("hot", 3, lease_s=60, now=now + 2)
            if not got:
                return
            results[slot].extend(c.id for c in got)

    threads = [threading.Thread(target=claimer, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    both = results[0] + results[1]
    assert len(both) == len(set(both)) == 40, "each request claimed once, retries included"
    assert set(both) == set(ids)
    stats = st.lane_stats("hot", now=now)
    assert stats.depth == 0 and stats.delayed == 0 and stats.leased == 40


def test_idempotency_on_a_sharded_lane(st: LaneStore, config: ServiceConfig, now: float) -> None:
    items = [make(config, now, lane="hot", custom_id=f"doc-{i}") for i in range(8)]
    first = st.submit_many(items, config, now=now)
    again = st.submit_many([*items, items[0]], config, now=now)
    assert [t.id for t in again] == [*(t.id for t in first), first[0].id]
    assert all(t.duplicate for t in again)
    one = st.submit_one(make(config, now, lane="hot", custom_id="doc-3"), config, now=now)
    assert one.id == first[3].id and one.duplicate
    assert len({shard_of(t.id) for t in first}) == 4
    assert st.lane_stats("hot", now=now).depth == 8


def test_backpressure_is_split_over_the_shards(
    st: LaneStore, config: ServiceConfig, now: float
) -> None:
    _submit(st, config, now, 40)  # max_queued 40 over 4 shards: 10 each
    with pytest.raises(LaneFull) as full:
        _submit(st, config, now, 4)
    assert full.value.rejected == [0, 1, 2, 3]


def test_cancel_status_result_and_wait_on_a_sharded_id(
    st: LaneStore, config: ServiceConfig, now: float
) -> None:
    ids = _submit(st, config, now, 8)
    victim = next(i for i in ids if shard_of(i) == 3)
    assert st.cancel(victim, now=now) is State.CANCELLED
    assert st.status(victim).state is State.CANCELLED
    assert st.wait(victim, timeout_s=1).status is State.CANCELLED
    claimed = st.claim("hot", 10, lease_s=60, now=now)
    assert victim not in {c.id for c in claimed} and len(claimed) == 7
    done = next(c for c in claimed if shard_of(c.id) == 2)
    st.start(done, state=State.RUNNING, route=Route.GPU, lease_s=60, now=now)
    st.finish(done.id, done.token, State.DONE, StoredResult.model_validate({"body": {}}), now=now)
    assert st.result(done.id) is not None
    assert {r.id for r in st.results("hot")} == {victim, done.id}
    counts = st.lane_stats("hot", now=now).counts
    assert counts[State.CANCELLED.value] == 1 and counts[State.DONE.value] == 1


def test_sweep_and_dead_letters_see_every_shard(
    st: LaneStore, config: ServiceConfig, now: float
) -> None:
    ids = _submit(st, config, now, 8)
    claimed = st.claim("hot", 8, lease_s=5, now=now)
    assert {shard_of(c.id) for c in claimed} == {0, 1, 2, 3}
    report = sweep(st, config.lanes, now + 10, lambda _: None)
    assert report["requeued"] == 8
    assert st.lane_stats("hot", now=now).depth == 8
    claimed = st.claim("hot", 8, lease_s=60, now=now + 10)
    for c in claimed:
        st.finish(c.id, c.token, State.DONE, StoredResult.model_validate({"body": {}}), now=now)
    assert sorted(st.due_deliveries("hot", now + 1)) == sorted(ids)
    late = next(i for i in ids if shard_of(i) == 1)
    assert st.dlq.add(late, BOOM, now=now)
    assert [e["id"] for e in st.dlq.entries()] == [late] and st.dlq.count() == 1
    assert st.dlq.replay(late, now=now)
    assert st.dlq.count() == 0
    st.redis.delete(*(st.keys.request(i) for i in ids))  # as if their results expired
    assert st.trim("hot", now + st.result_ttl_s + 1) == (8, 0)


# -- end to end: real workers, a sharded lane ---------------------------------------------


def _sharded_lanes(tmp_path: Path) -> tuple[Path, ServiceConfig]:
    text = (ROOT / "config" / "lanes.toml").read_text()
    for lane, shards in (("urgent", 2), ("standard", 4), ("bulk", 3)):
        text = text.replace(f"[lanes.{lane}]\n", f"[lanes.{lane}]\nshards = {shards}\n")
    path = tmp_path / "lanes.toml"
    path.write_text(text)
    return path, ServiceConfig(lanes=parse_lanes(text))


@pytest.mark.timeout(300)
def test_sharded_lanes_end_to_end_delivered_exactly_once(
    tmp_path: Path,
    db_url: str,  # noqa: F811
) -> None:
    path, config = _sharded_lanes(tmp_path)
    assert {s.name: s.shards for s in config.lanes} == {"urgent": 2, "standard": 4, "bulk": 3}
    knobs = Knobs(latency_ms=5, seed=5, batch_turnaround_s=1.0)
    stack = make_stack(tmp_path, db_url, knobs, MIXBATCH_LANES_FILE=str(path))
    try:
        stack.publish(config)
        for name in ("w1", "w2"):
            stack.start_worker(name, concurrency=2)
        start_callbacks(stack)
        stack.start_beat()
        stack.wait_workers(["w1", "w2", "callbacks"])
        items = [{**item, "callback": CALLBACK} for item in demo_workload(150)]
        with Client(db_url, namespace="e2e") as client:
            ids = [t.id for t in client.submit_many(items)]
            spread = Counter((lane_of(i), shard_of(i)) for i in ids)
            assert {lane for lane, _ in spread} == {"urgent", "standard", "bulk"}
            assert len(spread) == 2 + 4 + 3, "every shard of every lane holds requests"
            wait_for(lambda: len(delivered(db_url)) >= len(ids), 240, "every delivery")
            time.sleep(2)  # a sweep or two more: a duplicate would show up now
            counts = delivered(db_url)
            assert set(counts) == set(ids)
            assert all(n == 1 for n in counts.values())
            assert all(client.result(i, timeout=1).status is State.DONE for i in ids)
            for spec in config.lanes:
                stats = client.store.lane_stats(spec.name)
                assert stats.depth == 0 and stats.leased == 0
            routes = {client.result(i, timeout=1).route for i in ids}
            assert Route.BATCH in routes and Route.REALTIME in routes
        r = redis.Redis.from_url(db_url)
        assert r.exists("e2e:{lane:standard#3}:finished")
        r.close()
    finally:
        stack.stop()


def test_a_claim_skips_a_candidate_taken_between_its_read_and_its_script(
    st: LaneStore, config: ServiceConfig, now: float
) -> None:
    """The two steps of a claim: the script re-checks each candidate it was handed."""
    a, b, c = (t.id for t in st.submit_many([make(config, now) for _ in range(3)], config))
    st.cancel(b, now=now)  # taken after the claim read the queue heads
    k = st.keys
    flat = st.scripts["claim"](
        keys=[
            k.queue("standard"),
            k.queue_age("standard"),
            k.delayed("standard"),
            k.leases("standard"),
            k.counts("standard"),
            *(k.request(i) for i in (a, b, c)),
        ],
        args=[repr(now), 3, repr(now + 60), "tok", State.QUEUED, State.CLAIMED, 0, a, b, c],
    )
    assert sorted(x.decode() for x in flat[::4]) == sorted([a, c])
    counts = st.lane_stats("standard", now=now).counts
    assert counts[State.CLAIMED] == 2 and counts[State.QUEUED] == 0 and counts[State.CANCELLED] == 1
