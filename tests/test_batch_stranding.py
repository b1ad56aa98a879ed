"""Requests stranded by the batch route with no fault at all (the 50k benchmark's lost 182).

A claimed request is staged in its group and then marked SUBMITTED. A flusher that takes the
group in between used to find the request still CLAIMED, drop it from the batch, and leave it
SUBMITTED with no lease and no batch record: no sweep ever saw it again. These tests run that
interleaving for real: the same process functions, the sandbox over HTTP, one real Redis.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from routing.client import Client
from routing.keys import lane_of
from routing.sandbox import Knobs
from routing.states import State
from routing.store.batches import group_id
from routing.store.lanes import LaneStore
from tasks.cli.stack import LocalStack
from tests.test_batch_route import BATCH_ENV, batch_items
from tests.test_e2e import db_url, make_stack, wait_for

__all__ = ["db_url"]


@pytest.fixture
def in_process(tmp_path: Path, db_url: str) -> Iterator[LocalStack]:
    """The sandbox and settings of a stack, with the task functions called in this process."""
    from config.settings import reset_settings
    from tasks import runtime as common

    stack = make_stack(tmp_path, db_url, Knobs(batch_turnaround_s=0.2), **BATCH_ENV)
    saved = dict(os.environ)
    os.environ.update(stack.env())
    reset_settings()
    common.reset()
    try:
        yield stack
    finally:
        os.environ.clear()
        os.environ.update(saved)
        reset_settings()
        common.reset()
        stack.stop()


def _submit(url: str, n: int) -> list[str]:
    items = [
        {**i, "lane": "bulk", "custom_id": f"c{k}"}
        for k, i in enumerate(batch_items(3 * n))
        if i["endpoint"] == "/v1/chat/completions"
    ][:n]
    with Client(url, namespace="e2e") as client:
        return [t.id for t in client.submit_many(items)]


def _drain(ids: list[str], timeout_s: float = 30) -> dict[str, State]:
    from tasks import batch
    from tasks import runtime as common

    st = common.store()

    def settled() -> bool:
        batch.batch_poll()
        return all(st.status(i).state in (State.DONE, State.DELIVERED) for i in ids)

    wait_for(settled, timeout_s, "every staged request answered", interval_s=0.3)
    return {i: st.status(i).state for i in ids}


@pytest.mark.timeout(120)
def test_flush_between_stage_and_submitted_strands_nothing(
    in_process: LocalStack, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flusher that takes the group inside ``stage`` gets every request into a batch."""
    from tasks import batch
    from tasks import runtime as common

    ids = _submit(db_url, 12)
    st = common.store()
    claimed = st.claim(lane_of(ids[0]), 100, lease_s=600)
    assert {c.id for c in claimed} == set(ids)
    gid = group_id("openai", claimed[0].request.endpoint.value, claimed[0].request.model)

    original = LaneStore.start_many
    flushed: list[dict[str, Any]] = []

    def flush_first(self: LaneStore, *args: Any, **kwargs: Any) -> list[bool]:
        if not flushed:
            flushed.append(batch.batch_submit(gid))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LaneStore, "start_many", flush_first)
    batch.stage(claimed, "openai", time.time())
    monkeypatch.setattr(LaneStore, "start_many", original)

    assert flushed == [{"batches": 1}], "the flusher took the staged group mid-stage"
    states = _drain(ids)
    assert set(states.values()) <= {State.DONE, State.DELIVERED}, states


@pytest.mark.timeout(120)
def test_request_whose_stage_never_finished_is_not_put_in_a_batch_it_cannot_answer(
    in_process: LocalStack, db_url: str
) -> None:
    """Staged but its lease lost before SUBMITTED: the flusher leaves it to the sweeper."""
    from routing.store.batches import Member
    from tasks import batch
    from tasks import runtime as common

    ids = _submit(db_url, 4)
    st, reg = common.store(), common.registry()
    claimed = st.claim(lane_of(ids[0]), 100, lease_s=600)
    first = claimed[0].request
    gid = group_id("openai", first.endpoint.value, first.model)
    reg.stage(
        gid,
        [Member(id=c.id, token=c.token, deadline=c.request.deadline) for c in claimed],
        [100] * len(claimed),
        time.time(),
    )
    lost = claimed[0]
    assert st.requeue(lost.id, lost.token, _info()) is State.QUEUED
    batch.batch_submit(gid)
    assert st.status(lost.id).state is State.QUEUED, "requeued elsewhere, not taken twice"
    st.start_many(claimed[1:], state=State.SUBMITTED, route=_batch_route(), lease_s=None)
    states = _drain([c.id for c in claimed[1:]])
    assert set(states.values()) <= {State.DONE, State.DELIVERED}, states


def _info() -> Any:
    from routing.models import ErrorInfo

    return ErrorInfo(code="lease_lost", message="test", retryable=True)


def _batch_route() -> Any:
    from routing.models import Route

    return Route.BATCH
