"""Requests stranded by the batch route with no fault at all (the 50k benchmark's lost 182).

A claimed request is staged in its group and then marked SUBMITTED. A flusher that takes the
group in between used to find the request still CLAIMED, drop it from the batch, and leave it
SUBMITTED with no lease and no batch record: no sweep ever saw it again. These tests run that
interleaving for real, with the engine's own steps: the sandbox over HTTP, one real Redis.
"""

from __future__ import annotations

from typing import Any

import pytest

from routing.engine import batch as engine
from routing.models import ErrorInfo, Route
from routing.states import State
from routing.store.batches import Member, group_id
from tests.test_batch_engine import BatchRoute, route, sandbox

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
