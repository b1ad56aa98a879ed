"""The provider batch route end to end: real workers and beat, the sandbox's batch protocols.

Each test drives the sandbox into one situation (lines failing, a batch expiring, a batch
stuck in finalizing, a line refused at validation, a crash between create and record) and
checks that every request ends with its own answer or a clear error, delivered once.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from routing.client import Client
from routing.engine import batch as engine
from routing.keys import lane_of
from routing.models import Route
from routing.sandbox import Knobs
from routing.states import State
from routing.store.batches import BatchRegistry, group_id
from tasks.cli.demo import answer_ok, demo_workload
from tasks.cli.stack import LocalStack
from tests.test_batch_engine import Crash, CrashAfterCreate, crashing
from tests.test_e2e import CALLBACK, db_url, delivered, make_stack, start_callbacks, wait_for

__all__ = ["db_url"]


def created(stats: dict[str, Any], protocol: str) -> int:
    return int(stats["batches"]["created"][protocol])


def cancels(stats: dict[str, Any]) -> int:
    """Cancel calls the sandbox received (either protocol)."""
    return sum(n for path, n in stats["calls_by_endpoint"].items() if path.endswith("/cancel"))


def batch_items(n: int, **extra: Any) -> list[dict[str, Any]]:
    """Standard and bulk requests of the demo mix: they all take the batch route."""
    items = [i for i in demo_workload(n * 2) if i["lane"] != "urgent"][:n]
    return [{**i, "callback": CALLBACK, **extra} for i in items]


@pytest.fixture
def stack(tmp_path: Path, db_url: str, request: pytest.FixtureRequest) -> Iterator[LocalStack]:
    marker = request.node.get_closest_marker("knobs")
    knobs = Knobs(**(marker.kwargs if marker else {}))
    env_marker = request.node.get_closest_marker("env")
    env = env_marker.kwargs if env_marker else {}
    s = make_stack(tmp_path, db_url, knobs, **env)
    try:
        s.start_worker("worker", concurrency=3)
        start_callbacks(s)
        s.start_beat()
        s.wait_workers(["worker", "callbacks"])
        yield s
    finally:
        s.stop()


def results_of(url: str, ids: list[str], timeout_s: float = 120) -> dict[str, Any]:
    with Client(url, namespace="e2e") as client:
        return {rid: client.result(rid, timeout=timeout_s) for rid in ids}


def submit(url: str, items: list[dict[str, Any]]) -> list[str]:
    with Client(url, namespace="e2e") as client:
        return [t.id for t in client.submit_many(items)]


def assert_delivered_once(url: str, ids: list[str]) -> None:
    wait_for(lambda: set(ids) <= set(delivered(url)), 60, "every request delivered")
    time.sleep(2)
    counts = delivered(url)
    assert all(counts[i] == 1 for i in ids), {i: counts[i] for i in ids if counts[i] != 1}


@pytest.mark.timeout(180)
@pytest.mark.knobs(batch_turnaround_s=1.0)
def test_both_protocols_full_cycle(stack: LocalStack, db_url: str) -> None:
    items = batch_items(60)
    ids = submit(db_url, items)
    results = results_of(db_url, ids)
    for rid, item in zip(ids, items, strict=True):
        assert results[rid].route is Route.BATCH
        assert answer_ok(item["endpoint"], item["body"], results[rid]), rid
    stats = stack.sandbox.stats()
    assert created(stats, "openai") >= 1 and created(stats, "anthropic") >= 1
    assert_delivered_once(db_url, ids)


@pytest.mark.timeout(180)
@pytest.mark.knobs(batch_turnaround_s=1.0, batch_line_fail_rate=0.3, seed=11)
def test_partial_failure_retries_transient_lines_and_fails_permanent_ones(
    stack: LocalStack, db_url: str
) -> None:
    items = batch_items(40)
    ids = submit(db_url, items)
    results = results_of(db_url, ids)
    done = [r for r in results.values() if r.status is State.DONE]
    failed = [r for r in results.values() if r.status is State.FAILED]
    assert done and failed, "a 30 % line failure rate should give both outcomes"
    for r in failed:
        assert r.error is not None and r.error.message
        assert not r.error.retryable or "gave up after" in r.error.message
    assert any(r.error is not None and not r.error.retryable for r in failed), "400s fail at once"
    retried = [r for r in done if r.attempts > 1]
    assert retried, "transient line failures are retried"
    for rid, item in zip(ids, items, strict=True):
        if results[rid].status is State.DONE:
            assert answer_ok(item["endpoint"], item["body"], results[rid])
    assert_delivered_once(db_url, ids)


@pytest.mark.timeout(180)
@pytest.mark.knobs(batch_turnaround_s=1.0, batch_expire=True, time_scale=86400.0)
def test_expired_batch_keeps_finished_lines_and_reroutes_the_rest(
    stack: LocalStack, db_url: str
) -> None:
    items = batch_items(20)
    ids = submit(db_url, items)
    with Client(db_url, namespace="e2e") as client:
        wait_for(
            lambda: any(client.status(i).attempts >= 2 for i in ids), 60, "an expired line requeued"
        )
    stack.sandbox.configure(batch_expire=False, time_scale=1.0)
    results = results_of(db_url, ids)
    assert all(r.status is State.DONE for r in results.values())
    first_try = [r for r in results.values() if r.attempts == 1]
    second_try = [r for r in results.values() if r.attempts >= 2]
    assert first_try and second_try, "lines done before expiry are kept, the rest ran again"
    assert_delivered_once(db_url, ids)


@pytest.mark.timeout(180)
@pytest.mark.knobs(batch_turnaround_s=1.0)
def test_invalid_line_fails_alone_and_the_valid_ones_are_resubmitted(
    stack: LocalStack, db_url: str
) -> None:
    good = [
        {**i, "lane": "bulk"} for i in batch_items(6) if i["endpoint"] == "/v1/chat/completions"
    ]
    bad = {
        "custom_id": "no-messages",
        "lane": "bulk",
        "endpoint": "/v1/chat/completions",
        "body": {"model": "gpt-4o-mini"},
        "callback": CALLBACK,
    }
    ids = submit(db_url, [*good, bad])
    results = results_of(db_url, ids)
    bad_result = results[ids[-1]]
    assert bad_result.status is State.FAILED
    assert bad_result.error is not None and "messages" in bad_result.error.message
    for rid, item in zip(ids[:-1], good, strict=True):
        assert results[rid].status is State.DONE
        assert answer_ok(item["endpoint"], item["body"], results[rid])
    assert_delivered_once(db_url, ids)


@pytest.mark.timeout(180)
@pytest.mark.knobs(batch_turnaround_s=1.0, batch_stuck_finalizing=True)
@pytest.mark.env(MIXBATCH_REALTIME_ESTIMATE_S="5", MIXBATCH_HEDGE_MARGIN_S="80")
def test_batch_stuck_in_finalizing_is_hedged_to_realtime_and_cancelled(
    stack: LocalStack, db_url: str
) -> None:
    items = batch_items(8, deadline="100s")
    ids = submit(db_url, items)
    results = results_of(db_url, ids)
    for rid, item in zip(ids, items, strict=True):
        r = results[rid]
        assert r.status is State.DONE and r.route is Route.REALTIME, (rid, r.status, r.route)
        assert not r.missed_deadline
        assert answer_ok(item["endpoint"], item["body"], r)
    assert_delivered_once(db_url, ids)
    st = stack.store()
    try:
        reg = BatchRegistry(st.redis, namespace="e2e")
        wait_for(lambda: not reg.inflight(), 30, "the late batches closed")
    finally:
        st.close()
    assert cancels(stack.sandbox.stats()) >= 1


@pytest.mark.timeout(180)
@pytest.mark.knobs(batch_turnaround_s=1.0)
def test_cancel_every_request_of_a_batch_cancels_the_provider_batch(
    tmp_path: Path, db_url: str
) -> None:
    from routing.sandbox import Knobs as K

    stack = make_stack(tmp_path, db_url, K(batch_turnaround_s=3600.0))
    try:
        stack.start_worker("worker", concurrency=2)
        stack.start_beat()
        stack.wait_workers(["worker"])
        items = [{**i, "lane": "bulk"} for i in batch_items(5) if i["endpoint"] != "/v1/messages"]
        ids = submit(db_url, items)
        with Client(db_url, namespace="e2e") as client:
            wait_for(
                lambda: created(stack.sandbox.stats(), "openai") >= 1,
                30,
                "a batch created",
            )
            for rid in ids:
                assert client.cancel(rid) is State.CANCELLED
            for rid in ids:
                assert client.result(rid, timeout=5).status is State.CANCELLED
        wait_for(lambda: cancels(stack.sandbox.stats()) >= 1, 30, "provider batch cancelled")
    finally:
        stack.stop()


@pytest.mark.timeout(180)
def test_crash_between_create_and_record_adopts_the_orphan(tmp_path: Path, db_url: str) -> None:
    """A batch created at the provider but never recorded is found by its tag, not resent."""
    stack = make_stack(tmp_path, db_url, Knobs(batch_turnaround_s=1.0))
    try:
        items = [
            {**i, "lane": "bulk"} for i in batch_items(9) if i["endpoint"] == "/v1/chat/completions"
        ]
        ids = submit(db_url, items)
        env = stack.env()
        saved = dict(os.environ)
        os.environ.update(env)
        try:
            _create_then_crash(ids)
        finally:
            os.environ.clear()
            os.environ.update(saved)
            _reset_process_handles()
        assert created(stack.sandbox.stats(), "openai") == 1
        stack.start_worker("worker", concurrency=2)
        stack.start_beat()
        stack.wait_workers(["worker"])
        results = results_of(db_url, ids)
        assert all(r.status is State.DONE and r.route is Route.BATCH for r in results.values())
        assert created(stack.sandbox.stats(), "openai") == 1, "never submitted twice"
    finally:
        stack.stop()


def _reset_process_handles() -> None:
    from config.settings import reset_settings
    from tasks import runtime as common

    reset_settings()
    common.reset()


def _create_then_crash(ids: list[str]) -> None:
    """``batch_submit``'s own steps, dying once the provider's create returned, before the
    batch id is recorded. Its clock runs two minutes early, so the intent it leaves is past its
    grace by the time the workers start."""
    from tasks import batch

    _reset_process_handles()
    h = batch.handles()
    claimed = [
        c for lane in {lane_of(i) for i in ids} for c in h.store.claim(lane, 100, lease_s=600)
    ]
    assert {c.id for c in claimed} == set(ids)
    batch.stage(claimed, "openai", time.time())
    first = claimed[0].request
    gid = group_id("openai", first.endpoint.value, first.model)
    early = crashing(h, CrashAfterCreate, clock=lambda: time.time() - 120)
    with pytest.raises(Crash):
        engine.submit(early, gid)
