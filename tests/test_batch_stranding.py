"""Requests stranded by the batch route: SUBMITTED, with no lease and no batch record.

With no fault at all (the 50k benchmark's lost 182): a claimed request is staged in its group
and then marked SUBMITTED. A flusher that takes the group in between used to find the request
still CLAIMED, drop it from the batch, and leave it stranded.

With a flusher that dies: ``take`` removed the members from their group before anything
durable referred to them, so a worker dying before it recorded their intent (or while an
earlier batch of the same group uploaded) stranded them. They now sit in a durable take,
beaten by their worker, which the poller reaps once the beat stops; a slow upload keeps
beating and is never taken for a dead worker.

These tests run the interleavings for real, with the engine's own steps: the sandbox over
HTTP, one real Redis.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import pytest

from routing.engine import batch as engine
from routing.engine.batch_handles import BatchHandles
from routing.models import ErrorInfo, Route
from routing.states import State
from routing.store.batches import BatchRecord, BatchRegistry, Member, group_id
from tests.test_batch_engine import SETTINGS, BatchRoute, Crash, crashing, route, sandbox

__all__ = ["route", "sandbox"]


def settle(route: BatchRoute, ids: list[str]) -> None:
    """Poll until every request is answered; each must be, by the batch it rode in."""
    route.poll_until(lambda _report: route.states(ids) == {State.DELIVERED})


def test_flush_between_stage_and_submitted_strands_nothing(
    route: BatchRoute, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flusher that takes the group inside ``stage`` gets every request into a batch."""
    ids = route.submit(12, lane="bulk")
    claimed = route.claim(ids)
    gid = group_id("openai", claimed[0].request.endpoint.value, claimed[0].request.model)
    start_many = route.store.start_many
    made: list[int] = []

    def flush_first(*args: Any, **kwargs: Any) -> list[bool]:
        if not made:
            made.append(engine.submit(route.h, gid))
        return start_many(*args, **kwargs)

    monkeypatch.setattr(route.store, "start_many", flush_first)
    engine.stage(route.h, claimed, "openai", route.clock())
    monkeypatch.setattr(route.store, "start_many", start_many)

    assert made == [1], "the flusher took the staged group mid-stage"
    assert route.record().lines == 12, "the requests still CLAIMED were kept in the batch"
    settle(route, ids)


def test_request_whose_stage_never_finished_is_not_put_in_a_batch_it_cannot_answer(
    route: BatchRoute,
) -> None:
    """Staged but its lease lost before SUBMITTED: the flusher leaves it to the sweeper."""
    ids = route.submit(4, lane="bulk")
    claimed = route.claim(ids)
    first = claimed[0].request
    gid = group_id("openai", first.endpoint.value, first.model)
    members = [Member(id=c.id, token=c.token, deadline=c.request.deadline) for c in claimed]
    route.h.registry.stage(gid, members, [100] * len(claimed), route.clock())
    lost = claimed[0]
    info = ErrorInfo(code="lease_lost", message="test", retryable=True)
    assert route.store.requeue(lost.id, lost.token, info) is State.QUEUED
    assert engine.submit(route.h, gid) == 1
    assert route.store.status(lost.id).state is State.QUEUED, "requeued elsewhere, not taken"
    assert route.record().lines == 3
    rest = claimed[1:]
    assert all(route.store.start_many(rest, state=State.SUBMITTED, route=Route.BATCH, lease_s=None))
    settle(route, [c.id for c in rest])


class CrashAfterTake(BatchRegistry):
    """Dies the moment the group's members are taken."""

    def take(self, *args: Any, **kwargs: Any) -> list[tuple[str, str]]:
        super().take(*args, **kwargs)
        raise Crash("after take")


class CrashAtSecondIntent(BatchRegistry):
    """Dies right after the second batch's intent: the first batch is made, a third waits."""

    intents = 0

    def record_intent(self, record: BatchRecord, take_id: str = "") -> bool:
        ok = super().record_intent(record, take_id)
        self.intents += 1
        if self.intents == 2:
            raise Crash("after the second intent")
        return ok


#: Bytes of a batch that hold three of these tests' lines (about 175 bytes each) and not four.
THREE_LINES = 600


def three_a_batch(route: BatchRoute, **settings: Any) -> BatchHandles:
    """The route's handles with batches of three lines, so one take makes several batches."""
    changed = dataclasses.replace(SETTINGS, target_bytes=THREE_LINES, **settings)
    return dataclasses.replace(route.h, settings=changed)


def resubmit(route: BatchRoute, h: BatchHandles, ids: list[str]) -> None:
    """Claim, stage and submit requests that went back to their lanes."""
    gid = route.staged(ids)
    while engine.submit(h, gid):
        pass


def assert_answered_once(route: BatchRoute, ids: list[str], batches: int) -> None:
    settle(route, ids)
    stats = route.sandbox.stats()["batches"]
    assert stats["created"]["openai"] == batches
    assert stats["custom_ids_resent"] == 0, "no request was sent in two batches"
    assert route.h.registry.counts() == {"inflight": 0, "intents": 0, "takes": 0, "reaping": 0}


def test_flusher_dying_right_after_the_take_strands_nothing(route: BatchRoute) -> None:
    ids = route.submit(5, lane="bulk")
    gid = route.staged(ids)
    with pytest.raises(Crash):
        engine.submit(crashing(route.h, CrashAfterTake), gid)
    assert engine.submit(route.h, gid) == 0, "the group was taken"
    assert engine.poll(route.h)["requeued_taken"] == 0, "within the grace its worker may go on"

    route.clock.advance(SETTINGS.intent_grace_s + 1)
    assert engine.poll(route.h)["requeued_taken"] == 5
    assert route.states(ids) == {State.QUEUED}
    resubmit(route, route.h, ids)
    assert_answered_once(route, ids, batches=1)


def test_flusher_dying_between_two_batches_of_one_group_strands_nothing(
    route: BatchRoute,
) -> None:
    """Seven requests, three a batch at most: the first batch is made, the second's intent
    recorded, the third's members still in the take when the worker dies."""
    h = three_a_batch(route)
    ids = route.submit(7, lane="bulk")
    gid = route.staged(ids)
    with pytest.raises(Crash):
        engine.submit(crashing(h, CrashAtSecondIntent), gid)
    assert route.sandbox.stats()["batches"]["created"]["openai"] == 1
    made = route.record().lines

    route.clock.advance(SETTINGS.intent_grace_s + 1)
    report = engine.poll(h)
    assert report["requeued_intents"] == 1 and report["requeued_taken"] >= 1
    back = [rid for rid in ids if route.store.status(rid).state is State.QUEUED]
    assert len(back) == len(ids) - made, "all but the batch that was made"
    resubmit(route, h, back)
    assert_answered_once(route, ids, batches=3)


def test_a_slow_upload_is_not_taken_for_a_dead_worker(
    route: BatchRoute, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the first of three batches uploads for longer than the grace, the poller finds
    the take and the intent beaten by their worker: nothing is requeued, nothing cancelled."""
    h = three_a_batch(route, intent_grace_s=0.4)
    adapter = h.adapter("openai")
    create = adapter.create
    reports: list[dict[str, int]] = []

    def slow_create(*args: Any, **kwargs: Any) -> Any:
        if not reports:
            route.clock.advance(120)  # the upload outlasts the grace many times over
            time.sleep(0.4)  # four of the worker's beats, at the new time
            reports.append(engine.poll(h))
        return create(*args, **kwargs)

    monkeypatch.setattr(adapter, "create", slow_create)
    ids = route.submit(7, lane="bulk")
    assert engine.submit(h, route.staged(ids)) == 3
    assert reports == [dict.fromkeys(engine.REPORT, 0)]
    assert route.states(ids) == {State.SUBMITTED}
    assert_answered_once(route, ids, batches=3)


class BeatsLost(BatchRegistry):
    """A worker whose beats never reach Redis (a long pause, a partition): it looks dead."""

    def beat(self, *args: Any, **kwargs: Any) -> None:
        return None


def test_a_worker_taken_for_dead_cancels_the_batch_it_made_too_late(
    route: BatchRoute, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The poller reaps the take and intent of a worker that stopped beating and requeues its
    requests; when that worker's create returns after all, its record is refused and the batch
    it made, which answers no one, is cancelled."""
    h = crashing(route.h, BeatsLost)
    adapter = h.adapter("openai")
    create = adapter.create
    reports: list[dict[str, int]] = []

    def paused_create(*args: Any, **kwargs: Any) -> Any:
        route.clock.advance(SETTINGS.intent_grace_s + 1)
        reports.append(engine.poll(route.h))
        return create(*args, **kwargs)

    monkeypatch.setattr(adapter, "create", paused_create)
    ids = route.submit(3, lane="bulk")
    assert engine.submit(h, route.staged(ids)) == 0
    (report,) = reports
    assert report["requeued_intents"] == 1
    assert route.states(ids) == {State.QUEUED}
    calls = route.sandbox.stats()["calls_by_endpoint"]
    assert sum(n for path, n in calls.items() if path.endswith("/cancel")) == 1
    assert route.h.registry.inflight() == []

    monkeypatch.setattr(adapter, "create", create)
    resubmit(route, route.h, ids)
    settle(route, ids)
