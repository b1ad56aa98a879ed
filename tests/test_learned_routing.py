"""The learned route choice end to end: real workers, beat and the sandbox provider.

The priors of ``config/providers.toml`` say an OpenAI batch takes 2 h, so a standard request
(1 h) goes realtime. Once the sandbox has been *seen* finishing batches in seconds, the same
request goes to a provider batch at half the price; once batches are seen taking hours, back to
realtime. Every request keeps the decision that routed it, for ``mixbatch explain``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from routing.models import Route
from routing.sandbox import Knobs
from routing.states import State
from routing.store.observations import DecisionStore, ObservationStore
from tasks.cli.stack import LocalStack
from tests.test_batch_route import assert_delivered_once, results_of, submit
from tests.test_e2e import CALLBACK, db_url, make_stack, start_callbacks, wait_for

__all__ = ["db_url"]

CHAT = "/v1/chat/completions"
KEY = f"openai|{CHAT}|gpt-4o-mini"
LEARN_ENV = {
    "MIXBATCH_BATCH_MARGIN_S": "60",
    "MIXBATCH_BATCH_MAX_WAIT_S": "1",
    "MIXBATCH_BATCH_FLUSH_INTERVAL_S": "0.5",
    "MIXBATCH_BATCH_POLL_INTERVAL_S": "0.5",
    "MIXBATCH_BATCH_POLL_MAX_INTERVAL_S": "1",
    "MIXBATCH_BATCH_MAX_LINES": "2",  # many small batches: observations pile up quickly
}


def chats(n: int, lane: str, tag: str) -> list[dict[str, Any]]:
    return [
        {
            "custom_id": f"{tag}-{i}",
            "lane": lane,
            "endpoint": CHAT,
            "body": {
                "model": "gpt-4o-mini",
                "messages": [{"role": "user", "content": f"{tag} {i}"}],
            },
            "callback": CALLBACK,
        }
        for i in range(n)
    ]


def routes(url: str, ids: list[str]) -> set[Route]:
    found = results_of(url, ids, timeout_s=40)
    assert all(r.status is State.DONE for r in found.values()), found
    return {r.route for r in found.values() if r.route is not None}


def observations(url: str) -> ObservationStore:
    return ObservationStore(redis.Redis.from_url(url), namespace="e2e", url=url)


def explained(url: str, rid: str) -> Any:
    client = redis.Redis.from_url(url)
    try:
        from routing.keys import Keys

        return DecisionStore(client, Keys("e2e"), url=url).explain(rid)
    finally:
        client.close()


def start(tmp_path: Path, url: str, **env: str) -> LocalStack:
    s = make_stack(tmp_path, url, Knobs(batch_turnaround_s=1.0), **{**LEARN_ENV, **env})
    s.start_worker("worker", concurrency=3)
    start_callbacks(s)
    s.start_beat()
    s.wait_workers(["worker", "callbacks"])
    return s


@pytest.fixture
def priors_stack(tmp_path: Path, db_url: str) -> Iterator[LocalStack]:
    """The table's priors (OpenAI 2 h): no MIXBATCH_BATCH_TURNAROUND_S override."""
    s = start(tmp_path, db_url, MIXBATCH_BATCH_TURNAROUND_S="{}")
    try:
        yield s
    finally:
        s.stop()


@pytest.mark.timeout(120)
def test_seen_fast_batches_send_standard_requests_to_batches(
    priors_stack: LocalStack, db_url: str
) -> None:
    # 1. nothing observed: the 2 h prior does not fit a 1 h deadline
    before = submit(db_url, chats(3, "standard", "before"))
    assert routes(db_url, before) == {Route.REALTIME}
    first = explained(db_url, before[0])
    assert first.decision is not None and first.decision.route is Route.REALTIME
    assert any("prior" in c.estimate for c in first.decision.candidates)

    # 2. bulk work takes the batch route; the sandbox finishes each batch in about a second
    bulk = submit(db_url, chats(12, "bulk", "bulk"))
    assert routes(db_url, bulk) == {Route.BATCH}
    store = observations(db_url)
    wait_for(lambda: len(store.snapshot().batch.get(KEY, [])) >= 5, 30, "5 batches observed")
    seen = store.snapshot().batch[KEY]
    assert all(o.seconds < 30 and not o.censored for o in seen)

    # 3. now a standard request is expected back in seconds: the batch fits, at half the price
    time.sleep(5.5)  # MIXBATCH_ROUTE_REFRESH_S: the aggregator re-reads observations
    after = submit(db_url, chats(4, "standard", "after"))
    assert routes(db_url, after) == {Route.BATCH}
    why = explained(db_url, after[0]).decision
    assert why is not None and why.route is Route.BATCH
    batch = next(c for c in why.candidates if c.route is Route.BATCH)
    assert batch.fits and batch.estimate.startswith("observed")
    assert "cheapest that fits" in why.reason
    assert_delivered_once(db_url, before + bulk + after)


@pytest.mark.timeout(120)
def test_seen_slow_batches_send_standard_requests_realtime(tmp_path: Path, db_url: str) -> None:
    # the prior says 5 s (the sandbox's knob), so standard requests start on the batch route
    s = start(tmp_path, db_url, MIXBATCH_BATCH_TURNAROUND_S='{"openai": 5, "anthropic": 5}')
    try:
        before = submit(db_url, chats(3, "standard", "before"))
        assert routes(db_url, before) == {Route.BATCH}
        # the provider is then seen taking hours (synthetic observations, through the store's API)
        store = observations(db_url)
        now = time.time()
        for i in range(8):
            store.record_batch(
                "openai", CHAT, "gpt-4o-mini", turnaround_s=3 * 3600.0, size=2, at=now,
                batch_key=f"slow-{i}",
            )  # fmt: skip
        time.sleep(5.5)  # MIXBATCH_ROUTE_REFRESH_S
        after = submit(db_url, chats(3, "standard", "after"))
        assert routes(db_url, after) == {Route.REALTIME}
        why = explained(db_url, after[0]).decision
        assert why is not None
        batch = next(c for c in why.candidates if c.route is Route.BATCH)
        assert not batch.fits and batch.expected_finish_s >= 3 * 3600.0
        # bulk (24 h) still fits in a batch taking 3 hours
        bulk = submit(db_url, chats(2, "bulk", "bulk"))
        assert routes(db_url, bulk) == {Route.BATCH}
        assert_delivered_once(db_url, before + after + bulk)
    finally:
        s.stop()
