"""The batch route's engine steps, driven one by one: a real Redis, the real batch adapters
against the sandbox on loopback, and a clock the test advances.

Time the engine reads (flush waits, poll schedule, intent grace, hedge point) comes from the
test's clock, so nothing waits for it; the sandbox runs its batches in real time, 20 times
faster, so a batch finishes in a tenth of a second.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from routing.decide.cost import parse_prices
from routing.decide.options import RouteOptions
from routing.engine import batch as engine
from routing.engine.batch_handles import BatchHandles, BatchSettings, poll_delay_s
from routing.engine.pricing import price
from routing.models import Claimed, Request, Result, Route, ServiceConfig, prepare
from routing.providers import BatchAdapter, BatchJob
from routing.sandbox.server import SandboxServer
from routing.states import State
from routing.store.batches import BYID_KEEP_S, BatchRecord, BatchRegistry, Member, group_id
from routing.store.lanes import LaneStore
from routing.store.observations import ObservationStore
from tasks.cli.demo import answer_ok
from tests.test_batch_adapters import (
    CAPS,
    CHAT_MODEL,
    CLAUDE,
    ENDPOINT,
    ROOT,
    decoy_file,
    knobs,
    make_adapter,
    sandbox,
    wait_terminal,
)
from tests.test_batch_adapters import create as create_batch

__all__ = ["sandbox"]

SETTINGS = BatchSettings(
    target_bytes=20 * 1024 * 1024,
    max_wait_s=900.0,
    flush_interval_s=2.0,
    poll_interval_s=5.0,
    poll_max_interval_s=60.0,
    delete_files=True,
)
OPTIONS = RouteOptions(
    batch_turnaround_s={"openai": 300.0, "anthropic": 300.0},
    margin_s=60.0,
    hedge_margin_s=80.0,
    realtime_estimate_s=5.0,
)
#: A request waiting on a batch is hedged once its deadline is this close.
HEDGE_POINT_S = OPTIONS.realtime_estimate_s + OPTIONS.hedge_margin_s
PRICES = parse_prices((ROOT / "config" / "prices.toml").read_text())


class Clock:
    """The engine's clock: starts at the wall clock and moves only when the test says."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


class Crash(Exception):
    """A worker dying at a chosen point."""


@dataclass
class BatchRoute:
    """One test's batch route: its handles, clock, service config and deliveries sent."""

    h: BatchHandles
    clock: Clock
    config: ServiceConfig
    sandbox: SandboxServer
    dispatched: list[str] = field(default_factory=list)

    @property
    def store(self) -> LaneStore:
        return self.h.store

    def submit(self, n: int, protocol: str = "openai", **fields: Any) -> list[str]:
        """``n`` bulk requests of the protocol's endpoint, enqueued at the clock's time."""
        endpoint = ENDPOINT[protocol]
        items = [
            prepare(Request(endpoint=endpoint, body=body(protocol, i), **fields), self.config, t)
            for i, t in enumerate([self.clock()] * n)
        ]
        return [t.id for t in self.store.submit_many(items, self.config, now=self.clock())]

    def claim(self, ids: list[str]) -> list[Claimed]:
        lanes = {self.store.status(i).lane for i in ids}
        found = [c for lane in lanes for c in self.store.claim(lane, 100, lease_s=600)]
        assert {c.id for c in found} == set(ids)
        return found

    def staged(self, ids: list[str], protocol: str = "openai") -> str:
        """Claim and stage ``ids``; returns their group."""
        claimed = self.claim(ids)
        assert engine.stage(self.h, claimed, protocol, self.clock()) == len(ids)
        first = claimed[0].request
        return group_id(protocol, first.endpoint.value, first.model)

    def poll_until(self, done: Callable[[dict[str, int]], bool], timeout_s: float = 10) -> None:
        """Poll, each time once the next look is due, until ``done`` says so."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            self.clock.advance(SETTINGS.poll_max_interval_s)
            if done(engine.poll(self.h)):
                return
            time.sleep(0.05)
        raise AssertionError("the batch never got there")

    def states(self, ids: list[str]) -> set[State]:
        return {self.store.status(i).state for i in ids}

    def results(self, ids: list[str]) -> dict[str, Result]:
        found = {i: self.store.result(i) for i in ids}
        return {i: r for i, r in found.items() if r is not None}

    def record(self) -> BatchRecord:
        (key,) = self.h.registry.inflight()
        return self.h.registry.get(key)


def body(protocol: str, i: int) -> dict[str, Any]:
    message = [{"role": "user", "content": f"question {i}?"}]
    if protocol == "anthropic":
        return {"model": CLAUDE, "max_tokens": 32, "messages": message}
    return {"model": CHAT_MODEL, "messages": message}


def adapters(sandbox: SandboxServer, **caps: Any) -> dict[str, BatchAdapter]:
    """The real batch adapters of both protocols, pointed at the sandbox."""
    return {
        protocol: make_adapter(protocol, base, CAPS[protocol].model_copy(update=caps))
        for protocol, base in (
            ("openai", sandbox.openai_base_url),
            ("anthropic", sandbox.anthropic_base_url),
        )
    }


@pytest.fixture
def route(
    store: LaneStore, namespace: str, service_config: ServiceConfig, sandbox: SandboxServer
) -> Iterator[BatchRoute]:
    sandbox.configure(**knobs())
    sandbox.reset()
    clock = Clock()
    dispatched: list[str] = []
    made = adapters(sandbox)
    h = BatchHandles(
        store=store,
        registry=BatchRegistry(store.redis, namespace=namespace, url=store.url),
        adapter=made.__getitem__,
        observations=ObservationStore(store.redis, namespace=namespace, url=store.url),
        options=lambda _now: OPTIONS,
        price=functools.partial(price, PRICES),
        dispatch=dispatched.extend,
        settings=SETTINGS,
        clock=clock,
    )
    yield BatchRoute(h, clock, service_config, sandbox, dispatched)
    for adapter in made.values():
        adapter.close()


# -- the whole cycle -----------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["openai", "anthropic"])
def test_stage_flush_submit_poll_collect(route: BatchRoute, protocol: str) -> None:
    ids = route.submit(6, protocol, lane="bulk")
    gid = route.staged(ids, protocol)
    assert route.states(ids) == {State.SUBMITTED}

    assert engine.groups_due(route.h) == [], "plenty of slack and far from the target size"
    route.clock.advance(SETTINGS.max_wait_s)
    ((group, why),) = engine.groups_due(route.h)
    assert (group.gid, group.count) == (gid, 6) and why.startswith("max_wait")

    assert engine.submit(route.h, gid) == 1
    assert engine.submit(route.h, gid) == 0, "the group was taken whole"
    record = route.record()
    assert record.state == "submitted" and record.batch_id and record.lines == 6
    assert engine.poll(route.h)["polled"] == 0, "the first look is not due yet"

    route.poll_until(lambda report: report["collected"] == 1)
    results = route.results(ids)
    for i, rid in enumerate(ids):
        assert answer_ok(ENDPOINT[protocol], body(protocol, i), results[rid]), rid
        assert results[rid].route is Route.BATCH and results[rid].cost_usd is not None
    assert route.states(ids) == {State.DELIVERED}, "no callback: the result store is the sink"
    assert route.h.registry.inflight() == []
    assert route.sandbox.stats()["batches"]["created"][protocol] == 1


def test_a_tight_deadline_flushes_at_once(route: BatchRoute) -> None:
    ids = route.submit(2, lane="bulk", deadline=route.clock() + 200)
    route.staged(ids)
    ((_, why),) = engine.groups_due(route.h)
    assert why.startswith("deadline")


def test_polls_back_off_to_the_max_interval() -> None:
    delays = [poll_delay_s(SETTINGS, polls) for polls in range(1, 12)]
    assert delays[:3] == pytest.approx([7.5, 11.25, 16.875])
    assert delays == sorted(delays) and delays[-1] == SETTINGS.poll_max_interval_s


def test_refused_create_fails_the_requests_with_the_reason(route: BatchRoute) -> None:
    refusing = adapters(route.sandbox, models=("another-model",))
    h = dataclasses.replace(route.h, adapter=refusing.__getitem__)
    ids = route.submit(3, lane="bulk")
    gid = route.staged(ids)
    assert engine.submit(h, gid) == 0
    for adapter in refusing.values():
        adapter.close()
    for result in route.results(ids).values():
        assert result.status is State.FAILED and result.error is not None
        assert result.error.code == "batch_rejected" and "does not serve" in result.error.message
    assert sorted(route.dispatched) == sorted(ids)
    assert route.h.registry.inflight() == [] and route.h.registry.stale_intents(1e12) == []


def test_invalid_line_fails_alone_and_the_others_go_back(route: BatchRoute) -> None:
    ids = route.submit(3, lane="bulk")
    bad = prepare(
        Request(endpoint=ENDPOINT["openai"], body={"model": CHAT_MODEL}, lane="bulk"),
        route.config,
        route.clock(),
    )
    [ticket] = route.store.submit_many([bad], route.config, now=route.clock())
    gid = route.staged([*ids, ticket.id])
    assert engine.submit(route.h, gid) == 1
    route.poll_until(lambda report: report["collected"] == 1)
    result = route.store.result(ticket.id)
    assert result is not None and result.status is State.FAILED
    assert result.error is not None and "messages" in result.error.message
    assert route.states(ids) == {State.QUEUED}, "resubmitted: back in their lane"


# -- a crash between steps -----------------------------------------------------------------------


class CrashAfterCreate(BatchRegistry):
    """Dies after the provider's create returned, before its id is recorded."""

    def record_submitted(self, *args: Any, **kwargs: Any) -> bool:
        raise Crash("after create")


class CrashBeforeCreate(BatchRegistry):
    """Dies right after the intent is recorded, before anything is sent."""

    def record_intent(self, record: BatchRecord, take_id: str = "") -> bool:
        super().record_intent(record, take_id)
        raise Crash("after intent")


def crashing(h: BatchHandles, kind: type[BatchRegistry], **changes: Any) -> BatchHandles:
    """``h`` with a registry that dies at ``kind``'s point (and any other handle changed)."""
    registry = kind(h.store.redis, namespace=h.store.keys.ns, url=h.store.url)
    return dataclasses.replace(h, registry=registry, **changes)


def reconcile_until(route: BatchRoute, what: str, timeout_s: float = 10) -> None:
    """Poll once per grace until the report counts ``what`` (a batch must end to be read)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        route.clock.advance(SETTINGS.intent_grace_s + 1)
        if engine.poll(route.h)[what]:
            return
        time.sleep(0.05)
    raise AssertionError(f"no {what} within {timeout_s} s")


@pytest.mark.parametrize("protocol", ["openai", "anthropic"])
def test_intent_left_after_create_adopts_the_batch(route: BatchRoute, protocol: str) -> None:
    route.sandbox.configure(**knobs(batch_turnaround_s=60.0))
    ids = route.submit(5, protocol, lane="bulk")
    gid = route.staged(ids, protocol)
    with pytest.raises(Crash):
        engine.submit(crashing(route.h, CrashAfterCreate), gid)
    assert route.sandbox.stats()["batches"]["created"][protocol] == 1
    assert engine.poll(route.h)["adopted"] == 0, "within the grace an intent may still finish"

    route.clock.advance(SETTINGS.intent_grace_s + 1)
    report = engine.poll(route.h)
    if protocol == "anthropic":
        assert (report["adopted"], report["undecided_intents"]) == (0, 1), (
            "a message batch shows its custom_ids only once it ended: wait, requeue nothing"
        )
        assert route.states(ids) == {State.SUBMITTED}
        reconcile_until(route, "adopted")
    else:
        assert report["adopted"] == 1, "its input file shows our custom_ids at once"
    route.poll_until(lambda report: report["collected"] == 1)
    assert route.states(ids) == {State.DELIVERED}
    stats = route.sandbox.stats()["batches"]
    assert stats["created"][protocol] == 1 and stats["custom_ids_resent"] == 0, "never sent twice"


@pytest.mark.parametrize("protocol", ["openai", "anthropic"])
def test_a_decoy_of_the_same_size_is_not_adopted(
    route: BatchRoute, protocol: str, tmp_path: Path
) -> None:
    """The intent's batch was never created; a batch of the same size (OpenAI: even with our
    tag) exists. Its custom_ids are not ours: the requests go back to their lanes."""
    ids = route.submit(4, protocol, lane="bulk")
    gid = route.staged(ids, protocol)
    with pytest.raises(Crash):
        engine.submit(crashing(route.h, CrashBeforeCreate), gid)
    (key,) = route.h.registry.stale_intents(math.inf)
    adapter = route.h.adapter(protocol)
    tag = {engine.METADATA_KEY: key} if protocol == "openai" else None
    decoy = create_batch(adapter, decoy_file(tmp_path, protocol, 4), metadata=tag)
    wait_terminal(adapter, decoy.batch_id)

    route.clock.advance(SETTINGS.intent_grace_s + 1)
    report = engine.poll(route.h)
    assert (report["adopted"], report["requeued_intents"]) == (0, 1)
    assert route.states(ids) == {State.QUEUED}
    assert route.h.registry.get(key).state == "failed"
    assert route.sandbox.stats()["batches"]["created"][protocol] == 1, "the decoy alone"


def test_intent_never_created_goes_back_to_the_lanes(route: BatchRoute) -> None:
    ids = route.submit(4, lane="bulk")
    gid = route.staged(ids)
    with pytest.raises(Crash):
        engine.submit(crashing(route.h, CrashBeforeCreate), gid)
    route.clock.advance(SETTINGS.intent_grace_s + 1)
    assert engine.poll(route.h)["requeued_intents"] == 1
    assert route.states(ids) == {State.QUEUED}
    assert route.sandbox.stats()["batches"]["created"]["openai"] == 0
    assert route.h.registry.counts() == {"inflight": 0, "intents": 0, "takes": 0, "reaping": 0}


def test_a_worker_taken_for_dead_cannot_record_over_its_reconciler(route: BatchRoute) -> None:
    """Once the poller reaped an intent, only it decides the batch's fate: a late worker's
    record is refused (it then cancels what it made), the reconciler's is kept."""
    registry = route.h.registry
    ids = route.submit(2, lane="bulk")
    gid = route.staged(ids)
    with pytest.raises(Crash):
        engine.submit(crashing(route.h, CrashBeforeCreate), gid)
    (key,) = registry.stale_intents(math.inf)
    record = registry.get(key)
    now = route.clock.advance(SETTINGS.intent_grace_s + 1)
    stale = now - SETTINGS.intent_grace_s
    assert registry.reap("intent", key, stale, now)
    assert not registry.reap("intent", key, stale, now), "one reconciler at a time"
    assert not registry.record_submitted(record, "batch_late", now, now, by="worker")
    assert registry.record_submitted(record, "batch_adopted", now, now, by="reaper")
    assert registry.get(key).batch_id == "batch_adopted"
    assert not registry.abandon(record, now, "never created"), "already settled"


# -- one collector, fenced writes ----------------------------------------------------------------


def test_one_collector_at_a_time(route: BatchRoute) -> None:
    ids = route.submit(2, lane="bulk")
    assert engine.submit(route.h, route.staged(ids)) == 1
    key = route.record().key
    registry = route.h.registry
    due = route.clock() + SETTINGS.poll_interval_s
    assert registry.claim_collect(key, 300, due)
    assert not registry.claim_collect(key, 300, due + 1), "the first collector holds it"
    assert not registry.claim_collect(key, 300, due), "even at the same instant"
    assert registry.claim_collect(key, 300, due + 301), "its lease ran out"


def test_a_poll_never_overwrites_a_record_written_since_it_read_it(
    route: BatchRoute, monkeypatch: pytest.MonkeyPatch
) -> None:
    route.sandbox.configure(**knobs(batch_stuck_finalizing=True))
    ids = route.submit(3, lane="bulk")
    assert engine.submit(route.h, route.staged(ids)) == 1
    key = route.record().key
    adapter = route.h.adapter("openai")
    retrieve = adapter.retrieve

    def closed_meanwhile(batch_id: str) -> BatchJob:
        job = retrieve(batch_id)  # another worker closes the batch while this poll looks
        registry = route.h.registry
        registry.finish(registry.get(key), "cancelled", route.clock(), note="closed elsewhere")
        return job

    monkeypatch.setattr(adapter, "retrieve", closed_meanwhile)
    route.clock.advance(SETTINGS.poll_interval_s)
    assert engine.poll(route.h)["polled"] == 1
    after = route.h.registry.get(key)
    assert (after.state, after.note, after.polls) == ("cancelled", "closed elsewhere", 0)
    assert route.h.registry.inflight() == []


# -- hedging -------------------------------------------------------------------------------------


def test_late_batch_is_hedged_at_the_hedge_point_and_cancelled(route: BatchRoute) -> None:
    route.sandbox.configure(**knobs(batch_stuck_finalizing=True))
    deadline = route.clock() + 1000
    ids = route.submit(4, lane="bulk", deadline=deadline)
    gid = route.staged(ids)
    assert engine.submit(route.h, gid) == 1

    route.clock.advance(SETTINGS.poll_interval_s)
    report = engine.poll(route.h)
    assert (report["polled"], report["hedged"]) == (1, 0)
    assert route.states(ids) == {State.SUBMITTED}

    route.clock.now = deadline - HEDGE_POINT_S + 1
    assert engine.poll(route.h)["hedged"] == 4
    for rid in ids:
        status = route.store.status(rid)
        assert status.state is State.QUEUED and status.error is not None
        assert status.error.code == "hedged"
    assert route.h.registry.inflight() == [], "nobody waits on it any more: dropped"
    calls = route.sandbox.stats()["calls_by_endpoint"]
    assert sum(n for path, n in calls.items() if path.endswith("/cancel")) == 1


# -- byid does not grow with every batch ever made ------------------------------------------------


def recorded(
    registry: BatchRegistry, key: str, batch_id: str | None, created: float
) -> BatchRecord:
    """A batch recorded as the worker records it: an intent, then (``batch_id``) its provider id."""
    record = BatchRecord(
        key=key,
        provider="openai",
        protocol="openai",
        endpoint=ENDPOINT["openai"],
        model=CHAT_MODEL,
        created_at=created,
        lines=1,
        members={f"{key}-0": [Member(id=f"bulk.{key}", token="t", deadline=created + 3600)]},
        order=[f"{key}-0"],
    )
    assert registry.record_intent(record)
    if batch_id is not None:
        assert registry.record_submitted(record, batch_id, created, created + 5)
    return record


def test_byid_forgets_batches_closed_long_ago(route: BatchRoute) -> None:
    """A closed batch's provider id is kept while an orphan search could meet it, then
    forgotten when a later batch closes: byid holds recent batches, not all of them."""
    registry, t0 = route.h.registry, route.clock()
    for n in range(3):
        registry.finish(recorded(registry, f"old{n}", f"batch_old{n}", t0), "done", t0 + 60)
    running = recorded(registry, "running", "batch_running", t0)
    assert set(registry.known_batch_ids()) == {
        "batch_old0",
        "batch_old1",
        "batch_old2",
        "batch_running",
    }
    later = t0 + BYID_KEEP_S - 1
    registry.finish(recorded(registry, "recent", "batch_recent", later), "done", later)
    assert "batch_old0" in registry.known_batch_ids(), "not old enough yet"
    later = t0 + BYID_KEEP_S + 60
    registry.finish(recorded(registry, "new", "batch_new", later), "done", later)
    assert set(registry.known_batch_ids()) == {"batch_running", "batch_recent", "batch_new"}
    registry.finish(running, "done", later)  # a batch that ran long is forgotten once closed
    assert set(registry.known_batch_ids()) == {"batch_recent", "batch_new"}
    assert route.store.redis.zcard(registry.keys.batches("byid_closed")) == 2


def test_byid_keeps_what_a_live_intent_could_still_find(route: BatchRoute) -> None:
    """An intent still live (its worker or reconciler beating) searches for orphans from its
    own creation on: the ids of batches closed since stay known, so none is adopted twice."""
    registry, t0 = route.h.registry, route.clock()
    early = t0 - 2 * BYID_KEEP_S
    registry.finish(recorded(registry, "early", "batch_early", early), "done", early)
    recorded(registry, "stuck", None, t0 + 10)  # an intent, live for a long time
    registry.finish(recorded(registry, "after", "batch_after", t0 + 20), "done", t0 + 20)
    later = t0 + 3 * BYID_KEEP_S
    registry.finish(recorded(registry, "new", "batch_new", later), "done", later)
    assert set(registry.known_batch_ids()) == {"batch_after", "batch_new"}
    (stuck,) = registry.stale_intents(math.inf)
    registry.finish(registry.get(stuck), "failed", later)  # settled: nothing looks back now
    assert set(registry.known_batch_ids()) == {"batch_new"}
    assert registry.trim_byid(later) == 0, "nothing left to forget"
