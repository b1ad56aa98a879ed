"""LaneStore against a real redis-server: every transition, its refusals, and the bookkeeping.

Each test runs in its own key namespace (conftest's ``namespace``). Time is passed in as ``now``
wherever the store takes it, so leases, delays and deadlines need no sleeping; only ``wait`` is
tested against the real clock, with other threads doing the finishing.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis
from redis.crc import key_slot

from routing.engine.sweep import sweep as sweep_lanes
from routing.errors import InvalidRequest, LaneFull, NotFound, ResultTimeout, StoreUnavailable
from routing.keys import new_request_id
from routing.models import (
    Claimed,
    ErrorInfo,
    LaneSpec,
    Prepared,
    Request,
    Route,
    ServiceConfig,
    StoredResult,
    Ticket,
    prepare,
)
from routing.states import State, can_transition
from routing.store import claims as store_claims
from routing.store import dlq as store_dlq
from routing.store import lanes as store_lanes
from routing.store import reads as store_reads
from routing.store import submit as store_submit
from routing.store.lanes import LaneStore

LANES = ("urgent", "standard", "bulk")
STATE_VALUES = frozenset(s.value for s in State)
BODY: dict[str, Any] = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
BOOM = ErrorInfo(code="server_error", message="upstream 503", retryable=True, status_code=503)


# -- helpers ----------------------------------------------------------------------------------


def make(config: ServiceConfig, now: float, **fields: Any) -> Prepared:
    fields.setdefault("body", dict(BODY))
    return prepare(Request(**fields), config, now)


def submit(store: LaneStore, config: ServiceConfig, now: float, **fields: Any) -> Ticket:
    [ticket] = store.submit_many([make(config, now, **fields)], config, now=now)
    return ticket


def claim_one(store: LaneStore, lane: str, now: float, lease_s: float = 60.0) -> Claimed:
    [claimed] = store.claim(lane, 1, lease_s=lease_s, now=now)
    return claimed


def walk_deliveries(store: LaneStore, done: str, cancelled: str, now: float) -> None:
    """Every delivery and dead-letter script, on a finished and a cancelled request."""
    store.claim_delivery(done, lease_s=5, now=now)
    store.retry_delivery(done, BOOM, due_at=now)
    store.delivered(done, now=now)
    store.dlq.add(cancelled, BOOM, now=now)
    store.dlq.replay(cancelled, now=now)
    store.dlq.add(cancelled, BOOM, now=now)
    store.dlq.drop(cancelled)


def state_of(store: LaneStore, request_id: str) -> State:
    return store.status(request_id).state


def check_counts(store: LaneStore, lanes: Sequence[str] = LANES) -> None:
    """The per-state counters of every lane agree with the request hashes actually stored."""
    for lane in lanes:
        actual: Counter[str] = Counter()
        for key in store.redis.scan_iter(match=store.keys.request_prefix(lane) + "*", count=1000):
            state = store.redis.hget(key, "state")
            assert state is not None, f"{key!r} has no state"
            actual[state.decode()] += 1
        counts = store.lane_stats(lane).counts
        per_state = {k: v for k, v in counts.items() if k in STATE_VALUES and v}
        assert all(v >= 0 for k, v in counts.items() if k in STATE_VALUES), counts
        assert per_state == dict(actual), f"lane {lane}: counts {counts} vs stored {dict(actual)}"
        assert sum(per_state.values()) == sum(actual.values())


@pytest.fixture(autouse=True)
def _counts_stay_consistent(store: LaneStore) -> Iterator[None]:
    """Whatever a test did, the counters still match the stored requests at its end."""
    yield
    check_counts(store, (*LANES, "tiny"))


@pytest.fixture
def now() -> float:
    return time.time()


@pytest.fixture
def tiny_config(service_config: ServiceConfig) -> ServiceConfig:
    """The default lanes plus ``tiny``, which refuses a fourth queued request."""
    tiny = LaneSpec(name="tiny", deadline_s=600, priority=1, max_queued=3)
    return ServiceConfig(lanes=(*service_config.lanes, tiny))


# -- submit -----------------------------------------------------------------------------------


def test_submit_then_status(store: LaneStore, service_config: ServiceConfig, now: float) -> None:
    prepared = make(service_config, now, custom_id="doc-1", tenant="acme", max_attempts=5)
    [ticket] = store.submit_many([prepared], service_config, now=now)
    assert ticket.id.startswith("standard.")
    assert (ticket.lane, ticket.custom_id, ticket.duplicate) == ("standard", "doc-1", False)
    assert ticket.deadline == pytest.approx(now + 3600)

    status = store.status(ticket.id)
    assert status.state is State.QUEUED
    assert status.outcome is None
    assert (status.lane, status.tenant, status.custom_id) == ("standard", "acme", "doc-1")
    assert (status.attempts, status.max_attempts) == (0, 5)
    assert status.deadline == pytest.approx(prepared.deadline)
    assert status.created_at == pytest.approx(now)
    assert status.route is None and status.error is None
    assert store.prepared(ticket.id) == prepared
    assert store.result(ticket.id) is None
    assert store.lane_stats("standard", now=now).depth == 1
    check_counts(store)


def test_submit_many_keeps_the_order_of_its_items(
    store: LaneStore, service_config: ServiceConfig, now: float
) -> None:
    items = [
        make(service_config, now, lane=lane) for lane in ("bulk", "urgent", "standard", "bulk")
    ]
    tickets = store.submit_many(items, service_config, now=now)
    assert [t.lane for t in tickets] == ["bulk", "urgent", "standard", "bulk"]
    assert len({t.id for t in tickets}) == 4
    assert [store.lane_stats(lane).depth for lane in LANES] == [1, 1, 2]
    assert store.submit_many([], service_config, now=now) == []


def test_status_of_an_unknown_id(store: LaneStore) -> None:
    with pytest.raises(NotFound, match=r"standard\.NOPE"):
        store.status("standard.NOPE")
    with pytest.raises(NotFound):
        store.result("standard.NOPE")


# -- idempotency ------------------------------------------------------------------------------


def test_resubmitting_a_custom_id_returns_the_first_ticket(
    store: LaneStore, service_config: ServiceConfig, now: float
) -> None:
    first = submit(store, service_config, now, custom_id="doc-1")
    again = submit(
        store, service_config, now, custom_id="doc-1", body={"model": "other", "input": "x"}
    )
    assert again == first.model_copy(update={"duplicate": True})
    assert store.prepared(first.id).body == BODY, "the first request's body is kept"
    assert store.lane_stats("standard").depth == 1
    assert store.lane_stats("standard").counts["submitted_total"] == 1


def test_a_duplicate_in_another_lane_is_still_the_first_request(
    store: LaneStore, service_config: ServiceConfig, now: float
) -> None:
    first = submit(store, service_config, now, custom_id="doc-1", lane="bulk")
    again = submit(store, service_config, now, custom_id="doc-1", lane="urgent")
    assert again.id == first.id
    assert again.lane == "bulk"
    assert again.duplicate is True
    # The ticket describes the request that exists, not the one that was refused.
    assert again.deadline == first.deadline
    assert store.lane_stats("urgent").depth == 0
    assert store.lane_stats("bulk").depth == 1


def test_another_tenant_is_another_request(
    store: LaneStore, service_config: ServiceConfig, now: float
) -> None:
    a = submit(store, service_config, now, custom_id="doc-1", tenant="a")
    b = submit(store, service_config, now, custom_id="doc-1", tenant="b")
    assert a.id != b.id and not a.duplicate and not b.duplicate
    assert store.status(b.id).tenant == "b"
    assert store.lane_stats("standard").depth == 2


def test_requests_without_custom_id_are_never_duplicates(
    store: LaneStore, service_config: ServiceConfig, now: float
) -> None:
    tickets = store.submit_many([make(service_config, now) for _ in range(3)], service_config)
    assert len({t.id for t in tickets}) == 3
    assert not any(t.duplicate for t in tickets)


def test_duplicates_inside_one_call(
    store: LaneStore, service_config: ServiceConfig, now: float
) -> None:
    items = [
        make(service_config, now, custom_id="x"),
        make(service_config, now, custom_id="y"),
        make(service_config, now, custom_id="x", lane="bulk"),
        make(service_config, now, custom_id="x", tenant="other"),
    ]
    tickets = store.submit_many(items, service_config, now=now)
    assert len(tickets) == 4
    assert tickets[2].id == tickets[0].id
    assert [t.duplicate for t in tickets] == [False, False, True, False]
    assert tickets[3].id not in {tickets[0].id, tickets[1].id}
    assert store.lane_stats("standard").depth == 3
    assert store.lane_stats("bulk").depth == 0


def test_a_duplicate_of_a_finished_request_returns_it(
    store: LaneStore, service_config: ServiceConfig, now: float
) -> None:
    first = submit(store, service_config, now, custom_id="doc-1")
    claimed = claim_one(store, "standard", now)
    assert store.finish(
        first.id,
        claimed.token,
        State.DONE,
        StoredResult.model_validate({"body": {"ok": 1}}),
        now=now,
    )
    again = submit(store, service_config, now + 5, custom_id="doc-1")
    assert (again.id, again.duplicate) == (first.id, True)
    assert store.status(first.id).state is State.DONE
    assert store.lane_stats("standard").depth == 0


def _racer(
    store: LaneStore, config: ServiceConfig, now: float, racers: int
) -> Callable[[Prepared], Ticket]:
    """A submit that waits until all ``racers`` threads are ready, so they really collide."""
    barrier = threading.Barrier(racers)

    def race(item: Prepared) -> Ticket:
        barrier.wait()
        [ticket] = store.submit_many([item], config, now=now)
        return ticket

    return race


def test_concurrent_submits_of_one_custom_id_make_one_request(
    store: LaneStore, service_config: ServiceConfig, now: float
) -> None:
    """Eight producers race with the same custom_id: one request, and exactly one of them is
    told it created it (``duplicate=False``); the rest get its ticket as a duplicate."""
    rounds, racers = 20, 8
    created: list[int] = []
    for r in range(rounds):
        items = [
            make(service_config, now, custom_id=f"race-{r}", metadata={"n": str(i)})
            for i in range(racers)
        ]
        with ThreadPoolExecutor(racers) as pool:
            tickets = list(pool.map(_racer(store, service_config, now, racers), items))
        assert len({t.id for t in tickets}) == 1, f"round {r}: {tickets}"
        created.append(sum(not t.duplicate for t in tickets))
    assert store.lane_stats("standard").depth == rounds
    assert created == [1] * rounds, "rounds where no racer (or several) were told they created it"


def test_a_long_custom_id_is_deduplicated_too(
    store: LaneStore, service_config: ServiceConfig, now: float
) -> None:
    cid = "x" * 500
    first = submit(store, service_config, now, custom_id=cid)
    again = submit(store, service_config, now, custom_id=cid)
    other = submit(store, service_config, now, custom_id=cid[:-1] + "y")
    assert again.id == first.id and again.duplicate
    assert other.id != first.id
    assert store.status(first.id).custom_id == cid


# -- backpressure -----------------------------------------------------------------------------


def test_a_full_lane_refuses_and_keeps_what_it_has(
    store: LaneStore, tiny_config: ServiceConfig, now: float
) -> None:
    kept = [submit(store, tiny_config, now, lane="tiny", custom_id=f"c{i}") for i in range(3)]
    with pytest.raises(LaneFull, match="'tiny'") as info:
        submit(store, tiny_config, now, lane="tiny", custom_id="c3")
    assert (info.value.lane, info.value.max_queued) == ("tiny", 3)
    assert info.value.retryable is True
    assert store.lane_stats("tiny").depth == 3
    assert all(state_of(store, t.id) is State.QUEUED for t in kept)

    # Still full: the refused custom_id was not remembered as taken.
    with pytest.raises(LaneFull):
        submit(store, tiny_config, now, lane="tiny", custom_id="c3")

    claim_one(store, "tiny", now)
    fresh = submit(store, tiny_config, now, lane="tiny", custom_id="c3")
    assert fresh.duplicate is False
    assert fresh.id not in {t.id for t in kept}
    assert store.lane_stats("tiny").depth == 3
    check_counts(store, ["tiny"])


def test_a_batch_into_a_full_lane_reports_what_was_accepted(
    store: LaneStore, tiny_config: ServiceConfig, now: float
) -> None:
    items = [make(tiny_config, now, lane="tiny", custom_id=f"c{i}") for i in range(5)]
    with pytest.raises(LaneFull) as info:
        store.submit_many(items, tiny_config, now=now)
    accepted: list[Ticket] = info.value.accepted
    assert [t.custom_id for t in accepted] == ["c0", "c1", "c2"]
    assert info.value.rejected == [3, 4]
    assert store.lane_stats("tiny").depth == 3

    store.claim("tiny", 2, lease_s=60, now=now)
    tickets = store.submit_many(items, tiny_config, now=now)
    assert [t.duplicate for t in tickets] == [True, True, True, False, False]
    assert [t.id for t in tickets[:3]] == [t.id for t in accepted]
    assert store.lane_stats("tiny").depth == 3


def test_a_full_lane_does_not_refuse_duplicates_or_other_lanes(
    store: LaneStore, tiny_config: ServiceConfig, now: float
) -> None:
    first = submit(store, tiny_config, now, lane="tiny", custom_id="c0")
    for i in range(1, 3):
        submit(store, tiny_config, now, lane="tiny", custom_id=f"c{i}")
    assert submit(store, tiny_config, now, lane="tiny", custom_id="c0") == first.model_copy(
        update={"duplicate": True}
    )
    assert submit(store, tiny_config, now, lane="standard").lane == "standard"


def test_max_queued_zero_means_no_cap(store: LaneStore, now: float) -> None:
    config = ServiceConfig(lanes=(LaneSpec(name="standard", deadline_s=60, max_queued=0),))
    store.submit_many([make(config, now) for _ in range(20)], config, now=now)
    assert store.lane_stats("standard").depth == 20


# -- claim ------------------------------------------------------------------------------------


def test_claim_is_earliest_deadline_first(
    store: LaneStore, service_config: ServiceConfig, now: float
) -> None:
    late = submit(store, service_config, now, deadline=now + 300)
    soon = submit(store, service_config, now, deadline=now + 100)
    mid = submit(store, service_config, now, deadline=now + 200)

    got = store.claim("standard", 2, lease_s=60, now=now)
    assert [c.id for c in got] == [soon.id, mid.id]
    assert got[0].token == got[1].token
    assert all(c.attempts == 1 for c in got)
    assert got[0].request == store.prepared(soon.id)
    assert [c.id for c in store.claim("standard", 5, lease_s=60, now=now)] == [late.id]
    assert store.claim("standard", 5, lease_s=60, now=now) == []
    assert all(state_of(store, t.id) is State.CLAIMED for t in (late, soon, mid))
    check_counts(store)


def test_claim_of_zero_claims_nothing(
    store: LaneStore, service_config: ServiceConfig, now: float
) -> None:
    for _ in range(3):
        submit(store, service_config, now)
    assert store.claim("standard", 0, lease_s=60, now=now) == []
    assert store.lane_stats("standard").depth == 3


def test_claim_lanes_takes_urgent_before_standard_before_bulk(
    store: LaneStore, service_config: ServiceConfig, now: float
) -> None:
    bulk = submit(store, service_config, now, lane="bulk", deadline=now + 5)
    standard = submit(store, service_config, now, lane="standard", deadline=now + 30)
    urgent = submit(store, service_config, now, lane="urgent", deadline=now + 50)
    lanes = list(reversed(service_config.lanes))

    first = store.claim_lanes(lanes, 2, lease_s=60, now=now)
    assert [c.id for c in first] == [urgent.id, standard.id]
    assert [c.id for c in store.claim_lanes(lanes, 2, lease_s=60, now=now)] == [bulk.id]
    assert store.claim_lanes(lanes, 2, lease_s=60, now=now) == []


def test_claim_lanes_fills_n_across_lanes(
    store: LaneStore, service_config: ServiceConfig, now: float
) -> None:
    for lane, k in (("urgent", 2), ("standard", 2), ("bulk", 2)):
        for _ in range(k):
            submit(store, service_config, now, lane=lane)
    got = store.claim_lanes(service_config.lanes, 5, lease_s=60, now=now)
    assert [c.request.lane for c in got] == ["urgent", "urgent", "standard", "standard", "bulk"]
    assert store.lane_stats("bulk").depth == 1


# -- leases -----------------------------------------------------------------------------------


def test_start_and_finish_need_the_lease_token(
    store: LaneStore, service_config: ServiceConfig, now: float
) -> None:
    ticket = submit(store, service_config, now)
    claimed = claim_one(store, "standard", now)
    forged = claimed.model_copy(update={"token": "not-the-token"})

    assert not store.start(forged, state=State.RUNNING, route=Route.GPU, lease_s=30, now=now)
    assert state_of(store, ticket.id) is State.CLAIMED
    assert store.start(claimed, state=State.RUNNING, route=Route.GPU, lease_s=30, now=now)
    assert state_of(store, ticket.id) is State.RUNNING
    assert store.status(ticket.id).route is Route.GPU

    assert not store.finish(
        ticket.id, "not-the-token", State.DONE, StoredResult.model_validate({"body": {}}), now=now
    )
    assert store.result(ticket.id) is None
    assert store.finish(
        ticket.id,
        claimed.token,
        State.DONE,
        StoredResult.model_validate({"body": {"a": 1}}),
        now=now,
    )
    assert not store.finish(
        ticket.id, claimed.token, State.FAILED, StoredResult.model_validate({}), now=now
    ), "only once"
    result = store.result(ticket.id)
    assert result is not None and result.status is State.DONE and result.body == {"a": 1}
    check_counts(store)


def test_finish_refuses_a_non_outcome(store: LaneStore) -> None:
    with pytest.raises(ValueError, match="not an outcome"):
        store.finish("standard.X", "t", State.RUNNING, StoredResult.model_validate({}))


def test_submitted_drops_the_lease(
    store: LaneStore, service_config: ServiceConfig, now: float
) -> None:
    ticket = submit(store, service_config, now)
    claimed = claim_one(store, "standard", now, lease_s=10)
    assert store.start(claimed, state=State.SUBMITTED, route=Route.BATCH, lease_s=None, now=now)
    assert state_of(store, ticket.id) is State.SUBMITTED
    assert store.expired_leases("standard", now + 1000) == []
    assert store.lane_stats("standard").leased == 0
    assert store.finish(
        ticket.id,
        claimed.token,
        State.DONE,
        StoredResult.model_validate({"body": {}}),
        now=now + 50,
    )


def test_a_late_answer_after_the_sweeper_requeued_does_not_count(
    store: LaneStore, service_config: ServiceConfig, now: float
) -> None:
    ticket = submit(store, service_config, now)
    old = claim_one(store, "standard", now, lease_s=10)

    # The lease is still live: the sweeper may not take it.
    assert store.expired_leases("standard", now + 5) == []
    assert store.requeue(ticket.id, "*", BOOM, now=now + 5) is None
    assert state_of(store, ticket.id) is State.CLAIMED

    assert store.expired_leases("standard", now + 11) == [ticket.id]
    assert store.requeue(ticket.id, "*", BOOM, now=now + 11) is State.QUEUED
    status = store.status(ticket.id)
    # It never started (still CLAIMED): the attempt is given back, not counted.
    assert (status.state, status.attempts, status.error) == (State.QUEUED, 0, BOOM)

    # The old worker wakes up and answers: refused at every step.
    assert not store.finish(
        ticket.id,
        old.token,
        State.DONE,
        StoredResult.model_validate({"body": {"late": 1}}),
        now=now + 12,
    )
    assert not store.start(old, state=State.RUNNING, route=Route.GPU, lease_s=10, now=now + 12)
    assert store.requeue(ticket.id, old.token, BOOM, now=now + 12) is None
    assert store.result(ticket.id) is None
    assert state_of(store, ticket.id) is State.QUEUED

    new = claim_one(store, "standard", now + 13)
    assert (new.id, new.attempts) == (ticket.id, 1)
    assert new.token != old.token
    assert not store.finish(
        ticket.id,
        old.token,
        State.DONE,
        StoredResult.model_validate({"body": {"late": 1}}),
        now=now + 14,
    )
    assert store.finish(
        ticket.id,
        new.token,
        State.DONE,
        StoredResult.model_validate({"body": {"new": 1}}),
        now=now + 14,
    )
    result = store.result(ticket.id)
    assert result is not None and result.body == {"new": 1} and result.attempts == 1
    check_counts(store)


def test_expired_leases_lists_only_expired_ones(
    store: LaneStore, service_config: ServiceConfig, now: float
) -> None:
    a = submit(store, service_config, now, deadline=now + 10)
    b = submit(store, service_config, now, deadline=now + 20)
    c = submit(store, service_config, now, deadline=now + 30)
    ca = claim_one(store, "standard", now, lease_s=10)
    cb = claim_one(store, "standard", now, lease_s=100)
    cc = claim_one(store, "standard", now, lease_s=5)
    assert [x.id for x in (ca, cb, cc)] == [a.id, b.id, c.id]

    assert store.expired_leases("standard", now + 1) == []
    assert store.expired_leases("standard", now + 50) == [c.id, a.id]
    assert store.expired_leases("standard", now + 50, limit=1) == [c.id]
    # A renewed lease is no longer expired; a finished request has none.
    assert store.start(cc, state=State.RUNNING, route=Route.GPU, lease_s=100, now=now + 4)
    assert store.finish(a.id, ca.token, State.DONE, StoredResult.model_validate({}), now=now + 5)
    assert store.expired_leases("standard", now + 50) == []
    assert store.expired_leases("standard", now + 1000) == [b.id, c.id]
    assert store.expired_leases("bulk", now + 1000) == []
    assert store.lane_stats("standard").leased == 2


# -- requeue ----------------------------------------------------------------------------------


def test_requeue_counts_attempts_then_fails(
    store: LaneStore, service_config: ServiceConfig, now: float
) -> None:
    ticket = submit(store, service_config, now)  # max_attempts defaults to 3
    for attempt in (1, 2):
        claimed = claim_one(store, "standard", now)
        assert claimed.attempts == attempt
        assert store.requeue(ticket.id, claimed.token, BOOM, now=now) is State.QUEUED
        status = store.status(ticket.id)
        assert (status.state, status.attempts, status.error) == (State.QUEUED, attempt, BOOM)
        check_counts(store)

    claimed = claim_one(store, "standard", now)
    assert claimed.attempts == 3
    assert store.requeue(ticket.id, claimed.token, BOOM, now=now) is State.FAILED
    status = store.status(ticket.id)
    assert (status.state, status.outcome, status.attempts) == (State.FAILED, State.FAILED, 3)
    assert status.error is not None
    assert status.error.code == "server_error"
    assert "upstream 503" in status.error.message
    assert "gave up after 3 attempts" in status.error.message
    result = store.result(ticket.id)
    assert result is not None and result.status is State.FAILED and not result.ok
    assert result.error == status.error
    assert result.status_code == 503
    assert store.lane_stats("standard").depth == 0
    assert store.claim("standard", 1, lease_s=60, now=now) == []
    assert store.lane_stats("standard").counts["retries_total"] == 2
    check_counts(store)


def test_requeue_with_one_attempt_fails_at_once(
    store: LaneStore, service_config: ServiceConfig, now: float
) -> None:
    ticket = submit(store, service_config, now, max_attempts=1)
    claimed = claim_one(store, "standard", now)
    assert store.requeue(ticket.id, claimed.token, BOOM, now=now) is State.FAILED
    assert store.status(ticket.id).state is State.FAILED


def test_requeue_by_the_sweeper_after_the_last_attempt_fails_it(
    store: LaneStore, service_config: ServiceConfig, now: float
) -> None:
    ticket = submit(store, service_config, now, max_attempts=1)
    claimed = claim_one(store, "standard", now, lease_s=5)
    lost = ErrorInfo(code="lease_expired", message="worker lost", retryable=True)
    # Expired while still CLAIMED (never started): back in the lane, the attempt given back.
    assert store.requeue(ticket.id, "*", lost, now=now + 6) is State.QUEUED
    claimed = claim_one(store, "standard", now + 7, lease_s=5)
    assert claimed.attempts == 1
    # Expired while RUNNING (the worker died mid-work): the attempt counts, and was the last.
    assert store.start(claimed, state=State.RUNNING, route=Route.REALTIME, lease_s=5, now=now + 7)
    assert store.requeue(ticket.id, "*", lost, now=now + 13) is State.FAILED
    status = store.status(ticket.id)
    assert status.state is State.FAILED
    assert status.error is not None and "gave up after 1 attempts" in status.error.message
    assert store.lane_stats("standard").leased == 0


@pytest.mark.parametrize("state", [State.RUNNING, State.SUBMITTED])
def test_requeue_from_running_or_submitted(
    store: LaneStore, service_config: ServiceConfig, now: float, state: State
) -> None:
    ticket = submit(store, service_config, now)
    claimed = claim_one(store, "standard", now)
    lease = 30.0 if state is State.RUNNING else None
    assert store.start(claimed, state=state, route=Route.BATCH, lease_s=lease, now=now)
    assert store.requeue(ticket.id, claimed.token, BOOM, now=now) is State.QUEUED
    assert store.lane_stats("standard").leased == 0
    assert claim_one(store, "standard", now).attempts == 2


def test_requeue_with_the_wrong_token_or_unknown_id(
    store: LaneStore, service_config: ServiceConfig, now: float
) -> None:
    ticket = submit(store, service_config, now)
    claim_one(store, "standard", now)
    assert store.requeue(ticket.id, "wrong", BOOM, now=now) is None
    assert state_of(store, ticket.id) is State.CLAIMED
    assert store.requeue("standard.NOPE", "wrong", BOOM, now=now) is None


def test_a_delayed_retry_waits_for_ready_at(
    store: LaneStore, service_config: ServiceConfig, now: float
) -> None:
    ticket = submit(store, service_config, now)
    claimed = claim_one(store, "standard", now)
    assert store.requeue(ticket.id, claimed.token, BOOM, ready_at=now + 60, now=now) is (
        State.QUEUED
    )
    stats = store.lane_stats("standard", now=now)
    assert (stats.depth, stats.delayed, stats.leased) == (0, 1, 0)
    assert stats.counts["queued"] == 1

    assert store.claim("standard", 5, lease_s=60, now=now + 30) == []
    assert store.lane_stats("standard").delayed == 1
    again = store.claim("standard", 5, lease_s=60, now=now + 60)
    assert [(c.id, c.attempts) for c in again] == [(ticket.id, 2)]
    assert store.lane_stats("standard").delayed == 0
    check_counts(store)


def test_a_promoted_retry_keeps_its_deadline_order(
    store: LaneStore, service_config: ServiceConfig, now: float
) -> None:
    retried = submit(store, service_config, now, deadline=now + 100)
    claimed = claim_one(store, "standard", now)
    store.requeue(retried.id, claimed.token, BOOM, ready_at=now + 10, now=now)
    later = submit(store, service_config, now, deadline=now + 500)
    got = store.claim("standard", 2, lease_s=60, now=now + 10)
    assert [c.id for c in got] == [retried.id, later.id]


# -- cancel -----------------------------------------------------------------------------------


def test_cancel_a_queued_request(
    store: LaneStore, service_config: ServiceConfig, now: float
) -> None:
    ticket = submit(store, service_config, now)
    assert store.cancel(ticket.id, now=now) is State.CANCELLED
    status = store.status(ticket.id)
    assert (status.state, status.outcome) == (State.CANCELLED, State.CANCELLED)
    result = store.result(ticket.id)
    assert result is not None and result.status is State.CANCELLED
    assert result.error is not None and result.error.code == "cancelled"
    assert store.lane_stats("standard").depth == 0
    assert store.claim("standard", 1, lease_s=60, now=now) == []
    check_counts(store)


def test_cancel_a_delayed_request(
    store: LaneStore, service_config: ServiceConfig, now: float
) -> None:
    ticket = submit(store, service_config, now)
    claimed = claim_one(store, "standard", now)
    store.requeue(ticket.id, claimed.token, BOOM, ready_at=now + 60, now=now)
    assert store.cancel(ticket.id, now=now) is State.CANCELLED
    assert store.lane_stats("standard").delayed == 0
    assert store.claim("standard", 1, lease_s=60, now=now + 100) == []


@pytest.mark.parametrize("moved_to", [State.CLAIMED, State.RUNNING, State.SUBMITTED])
def test_cancel_a_leased_request_refuses_the_worker(
    store: LaneStore, service_config: ServiceConfig, now: float, moved_to: State
) -> None:
    ticket = submit(store, service_config, now)
    claimed = claim_one(store, "standard", now)
    if moved_to is not State.CLAIMED:
        lease = 30.0 if moved_to is State.RUNNING else None
        assert store.start(claimed, state=moved_to, route=Route.GPU, lease_s=lease, now=now)
    assert store.cancel(ticket.id, now=now) is State.CANCELLED
    assert store.lane_stats("standard").leased == 0
    assert store.expired_leases("standard", now + 1000) == []

    assert not store.finish(
        ticket.id,
        claimed.token,
        State.DONE,
        StoredResult.model_validate({"body": {"x": 1}}),
        now=now,
    )
    assert not store.start(claimed, state=State.RUNNING, route=Route.GPU, lease_s=5, now=now)
    assert store.requeue(ticket.id, claimed.token, BOOM, now=now) is None
    result = store.result(ticket.id)
    assert result is not None and result.status is State.CANCELLED and result.body is None
    check_counts(store)


def test_cancel_a_finished_request_is_a_no_op(
    store: LaneStore, service_config: ServiceConfig, now: float
) -> None:
    ticket = submit(store, service_config, now)
    claimed = claim_one(store, "standard", now)
    store.finish(
        ticket.id,
        claimed.token,
        State.DONE,
        StoredResult.model_validate({"body": {"a": 1}}),
        now=now,
    )
    assert store.cancel(ticket.id, now=now) is State.DONE
    result = store.result(ticket.id)
    assert result is not None and result.status is State.DONE and result.body == {"a": 1}
    assert store.cancel(ticket.id, now=now) is State.DONE

    assert store.delivered(ticket.id, now=now)
    store.cancel(ticket.id, now=now)
    result = store.result(ticket.id)
    assert result is not None and result.status is State.DONE and result.delivered


def test_cancel_an_unknown_request(store: LaneStore) -> None:
    with pytest.raises(NotFound) as info:
        store.cancel(new_request_id("standard"))
    assert "no request with id" in str(info.value)
    with pytest.raises(NotFound):
        store.cancel("nolane.01J0")


# -- results ----------------------------------------------------------------------------------


def test_the_result_is_stored_with_the_outcome(
    store: LaneStore, service_config: ServiceConfig, now: float
) -> None:
    ticket = submit(store, service_config, now, custom_id="doc-1", tenant="acme")
    claimed = claim_one(store, "standard", now)
    store.start(claimed, state=State.RUNNING, route=Route.REALTIME, lease_s=30, now=now)
    assert store.result(ticket.id) is None
    assert store.status(ticket.id).outcome is None

    answer = {
        "status_code": 200,
        "body": {"choices": [{"message": {"content": "hello"}}]},
        "usage": {"total_tokens": 7},
        "provider": "openai",
    }
    assert store.finish(
        ticket.id, claimed.token, State.DONE, StoredResult.model_validate(answer), now=now + 2
    )
    result = store.result(ticket.id)
    assert result is not None
    assert result.ok and result.status is State.DONE
    assert (result.id, result.custom_id, result.tenant, result.lane) == (
        ticket.id,
        "doc-1",
        "acme",
        "standard",
    )
    assert result.status_code == 200
    assert result.body == answer["body"]
    assert result.usage == {"total_tokens": 7}
    assert (result.provider, result.route) == ("openai", Route.REALTIME)
    assert (result.model, result.endpoint) == ("gpt-4o-mini", "/v1/chat/completions")
    assert result.attempts == 1
    assert result.finished_at == pytest.approx(now + 2)
    assert result.latency_s == pytest.approx(2)
    assert not result.missed_deadline and not result.delivered
    assert store.status(ticket.id).outcome is State.DONE


def test_no_reader_ever_sees_an_outcome_without_its_result(
    store: LaneStore, service_config: ServiceConfig, now: float
) -> None:
    items = [make(service_config, now) for _ in range(40)]
    ids = [t.id for t in store.submit_many(items, service_config, now=now)]
    claimed = store.claim("standard", 40, lease_s=60, now=now)
    keys = [store.keys.request(rid) for rid in ids]
    stop = threading.Event()
    seen: list[tuple[bool, bool]] = []

    def reader() -> None:
        while not stop.is_set():
            pipe = store.redis.pipeline(transaction=False)
            for key in keys:
                pipe.hmget(key, "outcome", "result")
            for outcome, result in pipe.execute():
                seen.append((bool(outcome), bool(result)))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for c in claimed:
            store.finish(
                c.id,
                c.token,
                State.DONE,
                StoredResult.model_validate({"body": {"id": c.id}}),
                now=now,
            )
    finally:
        stop.set()
        thread.join()
    assert seen
    assert all(has_result for has_outcome, has_result in seen if has_outcome)


def test_results_lists_finished_requests_oldest_first(
    store: LaneStore, service_config: ServiceConfig, now: float
) -> None:
    done, failed, cancelled, waiting = (
        submit(store, service_config, now, deadline=now + 10 * (i + 1)) for i in range(4)
    )
    other_lane = submit(store, service_config, now, lane="bulk")
    claims = {c.id: c for c in store.claim("standard", 2, lease_s=60, now=now)}
    assert set(claims) == {done.id, failed.id}
    store.finish(
        failed.id,
        claims[failed.id].token,
        State.FAILED,
        StoredResult.model_validate({"error": BOOM.model_dump()}),
        now=now + 1,
    )
    store.finish(
        done.id,
        claims[done.id].token,
        State.DONE,
        StoredResult.model_validate({"body": {"ok": 1}}),
        now=now + 2,
    )
    store.cancel(cancelled.id, now=now + 3)
    store.cancel(other_lane.id, now=now + 4)

    listed = store.results("standard")
    assert [r.id for r in listed] == [failed.id, done.id, cancelled.id]
    assert [r.status for r in listed] == [State.FAILED, State.DONE, State.CANCELLED]
    assert listed[0].error == BOOM
    assert [r.id for r in store.results("standard", since=now + 2)] == [done.id, cancelled.id]
    assert [r.id for r in store.results("standard", limit=1)] == [failed.id]
    assert waiting.id not in {r.id for r in listed}
    assert [r.id for r in store.results("bulk")] == [other_lane.id]
    assert store.results("urgent") == []


def test_results_prunes_entries_whose_request_expired(
    store: LaneStore, service_config: ServiceConfig, now: float
) -> None:
    a, b = submit(store, service_config, now), submit(store, service_config, now)
    store.cancel(a.id, now=now)
    store.cancel(b.id, now=now + 1)
    store.redis.delete(store.keys.request(a.id))  # as if its TTL ran out
    assert [r.id for r in store.results("standard")] == [b.id]
    assert store.redis.zcard(store.keys.finished("standard")) == 1
    # The counters still remember it: rebuild them for the consistency check.
    store.redis.hincrby(store.keys.counts("standard"), State.CANCELLED.value, -1)


# -- wait -------------------------------------------------------------------------------------


def _finish_later(store: LaneStore, claimed: Claimed, delay_s: float) -> None:
    time.sleep(delay_s)
    store.finish(
        claimed.id, claimed.token, State.DONE, StoredResult.model_validate({"body": {"ok": True}})
    )


def test_wait_returns_when_another_thread_finishes(
    store: LaneStore, service_config: ServiceConfig
) -> None:
    ticket = submit(store, service_config, time.time())
    claimed = claim_one(store, "standard", time.time())
    with ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        pool.submit(_finish_later, store, claimed, 0.2)
        result = store.wait(ticket.id, timeout_s=10)
        elapsed = time.monotonic() - started
    assert result.status is State.DONE and result.body == {"ok": True}
    assert 0.15 < elapsed < 3


def test_wait_times_out_without_busy_polling(
    store: LaneStore, service_config: ServiceConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    ticket = submit(store, service_config, time.time())
    reads = 0
    real_result = store.result

    def counting(request_id: str) -> Any:
        nonlocal reads
        reads += 1
        return real_result(request_id)

    monkeypatch.setattr(store, "result", counting)
    started = time.monotonic()
    with pytest.raises(ResultTimeout) as info:
        store.wait(ticket.id, timeout_s=0.5)
    elapsed = time.monotonic() - started
    assert 0.45 <= elapsed < 2.5
    assert reads <= 3, f"{reads} reads in {elapsed:.2f}s: that is polling"
    assert (info.value.request_id, info.value.state) == (ticket.id, "queued")
    assert ticket.id in str(info.value) and "0.5s" in str(info.value)
    assert isinstance(info.value, TimeoutError)


def test_wait_wakes_every_waiter(store: LaneStore, service_config: ServiceConfig) -> None:
    ticket = submit(store, service_config, time.time())
    claimed = claim_one(store, "standard", time.time())
    with ThreadPoolExecutor(4) as pool:
        waiters = [pool.submit(store.wait, ticket.id, 10.0) for _ in range(3)]
        time.sleep(0.2)
        assert not any(w.done() for w in waiters)
        started = time.monotonic()
        store.finish(
            ticket.id,
            claimed.token,
            State.DONE,
            StoredResult.model_validate({"body": {"ok": True}}),
        )
        results = [w.result(timeout=5) for w in waiters]
        elapsed = time.monotonic() - started
    assert all(r.status is State.DONE for r in results)
    assert elapsed < 3


def test_wait_sees_a_cancel_and_a_finished_request_at_once(
    store: LaneStore, service_config: ServiceConfig
) -> None:
    ticket = submit(store, service_config, time.time())
    with ThreadPoolExecutor(1) as pool:
        waiter = pool.submit(store.wait, ticket.id, 10.0)
        time.sleep(0.1)
        store.cancel(ticket.id)
        assert waiter.result(timeout=5).status is State.CANCELLED
    started = time.monotonic()
    assert store.wait(ticket.id, timeout_s=0).status is State.CANCELLED
    assert time.monotonic() - started < 0.5


def test_wait_for_an_unknown_request(store: LaneStore) -> None:
    with pytest.raises(NotFound):
        store.wait("standard.NOPE", timeout_s=0.1)


# -- lane_stats -------------------------------------------------------------------------------


def test_lane_stats(store: LaneStore, service_config: ServiceConfig, now: float) -> None:
    empty = store.lane_stats("standard", now=now)
    assert (empty.depth, empty.delayed, empty.leased) == (0, 0, 0)
    assert empty.oldest_age_s is None and empty.nearest_deadline_s is None
    assert empty.counts == {}

    a = submit(store, service_config, now, deadline=now + 100)
    submit(store, service_config, now + 5, deadline=now + 50)
    c = submit(store, service_config, now + 8, deadline=now + 200)
    stats = store.lane_stats("standard", now=now + 10)
    assert (stats.lane, stats.depth, stats.delayed, stats.leased) == ("standard", 3, 0, 0)
    assert stats.oldest_age_s == pytest.approx(10)
    assert stats.nearest_deadline_s == pytest.approx(40)
    assert stats.counts["queued"] == 3 and stats.counts["submitted_total"] == 3

    claim_one(store, "standard", now + 10)  # the one due at +50
    first = claim_one(store, "standard", now + 10)
    assert first.id == a.id
    store.requeue(a.id, first.token, BOOM, ready_at=now + 100, now=now + 10)
    stats = store.lane_stats("standard", now=now + 10)
    assert (stats.depth, stats.delayed, stats.leased) == (1, 1, 1)
    assert stats.oldest_age_s == pytest.approx(2), "only what is queued counts"
    assert stats.nearest_deadline_s == pytest.approx(190)
    assert (stats.counts["queued"], stats.counts["claimed"]) == (2, 1)
    store.cancel(c.id)
    assert store.lane_stats("standard").depth == 0


def test_a_late_finish_counts_a_deadline_miss(
    store: LaneStore, service_config: ServiceConfig, now: float
) -> None:
    ticket = submit(store, service_config, now, deadline=now + 10)
    claimed = claim_one(store, "standard", now)
    store.finish(
        ticket.id,
        claimed.token,
        State.DONE,
        StoredResult.model_validate({"body": {}}),
        now=now + 11,
    )
    assert store.lane_stats("standard").counts["deadline_misses"] == 1
    result = store.result(ticket.id)
    assert result is not None and result.missed_deadline


# -- deliveries -------------------------------------------------------------------------------


def _finished(store: LaneStore, config: ServiceConfig, now: float) -> str:
    ticket = submit(store, config, now)
    claimed = claim_one(store, "standard", now)
    assert store.finish(
        ticket.id,
        claimed.token,
        State.DONE,
        StoredResult.model_validate({"body": {"ok": 1}}),
        now=now,
    )
    return ticket.id


def test_an_unfinished_request_has_nothing_to_deliver(
    store: LaneStore, service_config: ServiceConfig, now: float
) -> None:
    ticket = submit(store, service_config, now)
    assert store.due_deliveries("standard", now + 1000) == []
    assert store.claim_delivery(ticket.id, lease_s=30, now=now) is None
    assert not store.delivered(ticket.id, now=now)


def test_claim_delivery_only_once_while_leased(
    store: LaneStore, service_config: ServiceConfig, now: float
) -> None:
    rid = _finished(store, service_config, now)
    assert store.due_deliveries("standard", now) == [rid]
    assert store.claim_delivery(rid, lease_s=30, now=now) == 1
    assert store.claim_delivery(rid, lease_s=30, now=now + 1) is None
    assert store.due_deliveries("standard", now + 1) == []
    # The delivering worker died: once its lease runs out, the delivery is due again.
    assert store.due_deliveries("standard", now + 31) == [rid]
    assert store.claim_delivery(rid, lease_s=30, now=now + 31) == 2


def test_delivered_leaves_the_outbox(
    store: LaneStore, service_config: ServiceConfig, now: float
) -> None:
    rid = _finished(store, service_config, now)
    assert store.claim_delivery(rid, lease_s=30, now=now) == 1
    assert store.delivered(rid, now=now + 1)
    status = store.status(rid)
    assert (status.state, status.outcome) == (State.DELIVERED, State.DONE)
    assert can_transition(State.DONE, State.DELIVERED)
    result = store.result(rid)
    assert result is not None and result.status is State.DONE and result.delivered
    assert store.due_deliveries("standard", now + 10_000) == []
    assert store.claim_delivery(rid, lease_s=30, now=now + 10_000) is None
    assert not store.delivered(rid, now=now + 2), "a second delivery report changes nothing"
    assert store.lane_stats("standard").counts["delivered"] == 1
    check_counts(store)


def test_retry_delivery_reschedules(
    store: LaneStore, service_config: ServiceConfig, now: float
) -> None:
    rid = _finished(store, service_config, now)
    assert store.claim_delivery(rid, lease_s=30, now=now) == 1
    webhook_down = ErrorInfo(code="http_502", message="sink answered 502", retryable=True)
    store.retry_delivery(rid, webhook_down, due_at=now + 100)
    assert store.claim_delivery(rid, lease_s=30, now=now + 50) is None
    assert store.due_deliveries("standard", now + 99) == []
    assert store.due_deliveries("standard", now + 100) == [rid]
    assert store.claim_delivery(rid, lease_s=30, now=now + 100) == 2
    stored = store.redis.hget(store.keys.request(rid), "delivery_error")
    assert stored is not None and ErrorInfo.model_validate_json(stored) == webhook_down


def test_retry_delivery_after_delivery_does_not_reschedule(
    store: LaneStore, service_config: ServiceConfig, now: float
) -> None:
    rid = _finished(store, service_config, now)
    store.delivered(rid, now=now)
    store.retry_delivery(rid, BOOM, due_at=now + 10)
    assert store.due_deliveries("standard", now + 1000) == []
    assert store.status(rid).state is State.DELIVERED


def test_dead_letter_records_the_error(
    store: LaneStore, service_config: ServiceConfig, now: float
) -> None:
    rid = _finished(store, service_config, now)
    store.claim_delivery(rid, lease_s=30, now=now)
    gone = ErrorInfo(code="http_410", message="sink is gone", status_code=410)
    assert store.dlq.add(rid, gone, now=now + 5)
    assert store.dlq.entries() == [
        {"id": rid, "lane": "standard", "at": now + 5, "error": gone.model_dump()}
    ]
    assert store.due_deliveries("standard", now + 10_000) == []
    status = store.status(rid)
    assert (status.state, status.outcome) == (State.DONE, State.DONE), "the outcome is kept"
    assert store.lane_stats("standard").counts["dead_letters"] == 1


def test_dead_letter_after_delivery_records_nothing(
    store: LaneStore, service_config: ServiceConfig, now: float
) -> None:
    """Two deliverers raced (at-least-once): the one that gave up must not file a dead letter
    for a request the other one delivered."""
    rid = _finished(store, service_config, now)
    assert store.delivered(rid, now=now + 1)
    assert not store.dlq.add(rid, BOOM, now=now + 2)
    assert store.dlq.entries() == []
    assert store.status(rid).state is State.DELIVERED


def test_dead_letters_are_listed_oldest_first(
    store: LaneStore, service_config: ServiceConfig, now: float
) -> None:
    first, second = _finished(store, service_config, now), _finished(store, service_config, now)
    store.dlq.add(second, BOOM, now=now + 2)
    store.dlq.add(first, BOOM, now=now + 1)
    assert [e["id"] for e in store.dlq.entries()] == [first, second]


# -- counts and transitions --------------------------------------------------------------------


def test_every_transition_keeps_counts_and_follows_the_table(
    store: LaneStore, service_config: ServiceConfig, now: float
) -> None:
    """Walk requests through every path, checking the counters and the transition table."""
    tickets = store.submit_many(
        [make(service_config, now, deadline=now + 10 + i) for i in range(7)],
        service_config,
        now=now,
    )
    ids = [t.id for t in tickets]
    last = {rid: State.QUEUED for rid in ids}

    def step(action: Callable[[], object]) -> None:
        action()
        for rid in ids:
            state = state_of(store, rid)
            if state is not last[rid]:
                assert can_transition(last[rid], state), f"{last[rid]} -> {state}"
                last[rid] = state
        check_counts(store)

    check_counts(store)
    claims = {c.id: c for c in store.claim("standard", 5, lease_s=10, now=now)}
    step(lambda: None)
    c0, c1, c2 = (claims[rid] for rid in ids[:3])
    assert set(claims) == set(ids[:5])
    step(lambda: store.start(c0, state=State.RUNNING, route=Route.GPU, lease_s=10, now=now))
    step(
        lambda: store.finish(
            ids[0], c0.token, State.DONE, StoredResult.model_validate({"body": {}}), now=now
        )
    )
    step(lambda: store.start(c1, state=State.SUBMITTED, route=Route.BATCH, lease_s=None, now=now))
    step(lambda: store.requeue(ids[1], c1.token, BOOM, now=now))
    step(lambda: store.requeue(ids[2], c2.token, BOOM, ready_at=now + 5, now=now))
    step(lambda: store.cancel(ids[3], now=now))
    step(lambda: store.requeue(ids[4], "*", BOOM, now=now + 11))
    step(lambda: store.drop(ids[5], State.EXPIRED, None, from_states=[State.QUEUED], now=now))
    step(lambda: store.cancel(ids[6], now=now))
    again = {c.id: c for c in store.claim("standard", 10, lease_s=10, now=now + 20)}
    assert set(again) == {ids[1], ids[2], ids[4]}
    step(lambda: None)
    step(
        lambda: store.finish(
            ids[1], again[ids[1]].token, State.FAILED, StoredResult.model_validate({}), now=now + 21
        )
    )
    step(lambda: store.requeue(ids[2], again[ids[2]].token, BOOM, now=now + 21))
    step(lambda: store.delivered(ids[0], now=now + 22))
    step(lambda: store.dlq.add(ids[3], BOOM, now=now + 22))
    assert [last[rid] for rid in ids] == [
        State.DELIVERED,
        State.FAILED,
        State.QUEUED,
        State.CANCELLED,
        State.CLAIMED,
        State.EXPIRED,
        State.CANCELLED,
    ]


# -- Redis Cluster: one slot per lane ----------------------------------------------------------


class _Recording:
    """Wraps a registered script and records the keys of each call."""

    def __init__(self, name: str, script: Any, calls: list[tuple[str, list[str]]]) -> None:
        self.name, self.script, self.calls = name, script, calls

    def __call__(
        self, keys: Sequence[str] = (), args: Sequence[Any] = (), client: Any = None
    ) -> Any:
        self.calls.append((self.name, list(keys)))
        return self.script(keys=keys, args=args, client=client)


def _slot(key: str) -> int:
    return int(key_slot(key.encode()))


#: Every script the lane store runs (the others belong to other stores or to the sinks).
LANE_SCRIPTS = {
    "claim",
    "claim_ids",
    "dead_letter_add",
    "dead_letter_adopt",
    "dead_letter_drop",
    "dead_letter_replay",
    "deliver_claim",
    "deliver_done",
    "release_idempotency",
    "renew",
    "retry_delivery",
    "settle",
    "start",
    "submit_many",
    "submit_one",
    "trim",
}
#: Scripts whose keys are a tenant's (custom_id reservations), not a lane's.
TENANT_SCRIPTS = {"claim_ids", "release_idempotency"}


def test_every_script_touches_one_slot_per_lane(
    store: LaneStore, tiny_config: ServiceConfig, now: float
) -> None:
    calls: list[tuple[str, list[str]]] = []
    for name in LANE_SCRIPTS:
        store.scripts[name] = _Recording(name, store.scripts[name], calls)  # type: ignore[assignment]
    store.cluster = True

    for lane in (*LANES, "tiny"):
        t1, t2, t3 = (
            submit(store, tiny_config, now, lane=lane, custom_id=f"{lane}-{i}") for i in range(3)
        )
        c1, c2, c3 = store.claim(lane, 3, lease_s=10, now=now)
        store.start(c1, state=State.RUNNING, route=Route.GPU, lease_s=10, now=now)
        store.finish(
            c1.id, c1.token, State.DONE, StoredResult.model_validate({"body": {}}), now=now
        )
        store.requeue(c2.id, c2.token, BOOM, now=now)
        store.cancel(c3.id, now=now)
        walk_deliveries(store, c1.id, c3.id, now)
        store.trim(lane, now + store.result_ttl_s + 1)  # past the cutoff: trim.lua has work
        store.renew_many([(c2.id, c2.token)], lease_s=10, now=now)
        entry = {"id": c3.id, "lane": lane, "at": now, "error": BOOM.model_dump()}
        store.redis.hset(store.keys.legacy_dead_letters(), c3.id, json.dumps(entry))
        assert store.dlq.adopt_legacy() == 1
        assert store.dlq.drop(c3.id)
        assert {t1.id, t2.id, t3.id} == {c1.id, c2.id, c3.id}
    with pytest.raises(LaneFull):
        store.submit_many(
            [make(tiny_config, now, lane="tiny", custom_id=f"more-{i}") for i in range(3)],
            tiny_config,
            now=now,
        )

    single_node_only = {"submit_one"}
    assert {name for name, _ in calls} == LANE_SCRIPTS - single_node_only
    for name, keys in calls:
        assert keys, name
        slots = {_slot(k) for k in keys}
        assert len(slots) == 1, f"{name} spans slots: {keys}"
    tags = {lane: _slot(store.keys.lane_tag(lane)) for lane in (*LANES, "tiny")}
    for name, keys in calls:
        if name in TENANT_SCRIPTS:
            assert "{tenant:" in keys[0], "custom_ids are reserved in the tenant's slot"
            continue
        lane = keys[0].split("{lane:", 1)[1].split("}", 1)[0]
        assert _slot(keys[0]) == tags[lane], name


def test_the_lane_store_runs_only_its_own_scripts(store: LaneStore) -> None:
    """Every script the lane store's code names is in LANE_SCRIPTS (so the test above sees it)."""
    named: set[str] = set()
    for module in (store_lanes, store_submit, store_reads, store_dlq, store_claims):
        named |= set(re.findall(r'scripts\["(\w+)"\]', inspect.getsource(module)))
    assert named == LANE_SCRIPTS
    assert set(store.scripts) >= LANE_SCRIPTS


def test_keys_a_script_builds_itself_share_the_lane_slot(store: LaneStore, now: float) -> None:
    # Every key of a request and of its lane shard shares the shard's slot (test_sharding.py
    # checks the shards; tests/test_lua_keys.py checks that scripts touch only their KEYS).
    for lane in (*LANES, "tiny"):
        rid = new_request_id(lane, now)
        k = store.keys
        built = [
            k.queue(lane),
            k.queue_age(lane),
            k.delayed(lane),
            k.leases(lane),
            k.outbox(lane),
            k.finished(lane),
            k.counts(lane),
            k.request_prefix(lane) + rid,
            k.request(rid),
            k.notify(rid),
        ]
        assert {_slot(key) for key in built} == {_slot(k.lane_tag(lane))}


# -- stored requests an older version (or a hand edit) left behind ----------------------------


def _corrupt(store: LaneStore, request_id: str, score: float | None = None, **fields: str) -> None:
    """Overwrite fields of a stored request the way an older version or a hand edit would."""
    store.redis.hset(store.keys.request(request_id), mapping=dict(fields.items()))
    if score is not None:
        store.redis.zadd(store.keys.queue(request_id.split(".")[0]), {request_id: score})


def _data_with(store: LaneStore, request_id: str, **changes: Any) -> str:
    raw = store.redis.hget(store.keys.request(request_id), "data")
    assert raw is not None
    return json.dumps({**json.loads(raw), **changes})


def test_a_bad_stored_request_fails_alone_and_every_lane_is_still_claimed(
    store: LaneStore, service_config: ServiceConfig, now: float
) -> None:
    """Issue 12, "Lanes stop" 1: an infinite deadline that reached the store (stored by an older
    version as ``deadline=inf``, ``data.deadline=null``) made ``claim`` raise after claim.lua had
    moved the whole set to CLAIMED, aborting ``claim_lanes`` for every lane, forever. Now each
    bad one is FAILED with its reason, returned in ``failed``, and delivered like any failure."""
    good: dict[str, list[str]] = {lane: [] for lane in LANES}
    bad: dict[str, str] = {}
    for lane in LANES:
        for i in range(3):
            good[lane].append(
                submit(store, service_config, now, lane=lane, deadline=now + 50 + i).id
            )
    # What the old submit_many stored for deadline=inf: "inf" in the hash and the queue, null
    # in the data; it sorts last in its lane, behind the good ones.
    rid = submit(store, service_config, now, lane="urgent").id
    _corrupt(store, rid, float("inf"), deadline="inf", data=_data_with(store, rid, deadline=None))
    bad[rid] = "deadline"
    # A hand edit: a deadline that is no number at all, first in its lane's queue.
    rid = submit(store, service_config, now, lane="standard").id
    _corrupt(store, rid, 0.0, deadline="null")
    bad[rid] = "deadline 'null' is not a finite number"
    # Data that is not JSON, and a count that is not a count.
    rid = submit(store, service_config, now, lane="bulk", deadline=now + 10).id
    _corrupt(store, rid, data="{not json")
    bad[rid] = "invalid"
    rid = submit(store, service_config, now, lane="bulk", deadline=now + 11).id
    _corrupt(store, rid, attempts="many")
    bad[rid] = "attempts 'many' is not a count"
    # A delayed retry whose deadline went bad: promoted, then failed like the others.
    rid = submit(store, service_config, now, lane="standard").id
    store.redis.zrem(store.keys.queue("standard"), rid)
    store.redis.zrem(store.keys.queue_age("standard"), rid)
    store.redis.zadd(store.keys.delayed("standard"), {rid: now - 1})
    _corrupt(store, rid, deadline="nan")
    bad[rid] = "deadline 'nan' is not a finite number"
    check_counts(store)

    claimed = store.claim_lanes(service_config.lanes, 100, lease_s=60, now=now)

    assert sorted(c.id for c in claimed) == sorted(r for ids in good.values() for r in ids)
    assert sorted(claimed.failed) == sorted(bad)
    for rid, why in bad.items():
        status = store.status(rid)
        assert (status.state, status.outcome) == (State.FAILED, State.FAILED)
        assert status.error is not None and status.error.code == store_lanes.INVALID_STORED
        assert why in status.error.message, status.error.message
    assert {rid for lane in LANES for rid in store.due_deliveries(lane, now)} == set(bad)
    for lane in LANES:
        assert store.lane_stats(lane).depth == 0
    check_counts(store)

    # Delivered like any failure, by the delivery step every route uses.
    from routing.engine.deliver import run_deliveries

    def no_sink(spec: Any) -> Any:
        raise AssertionError(f"these requests have no callback, yet a sink was built: {spec}")

    outcomes = run_deliveries(
        store, claimed.failed, sinks=no_sink, max_attempts=3, lease_s=30, now=now + 1
    )
    assert {rid: o.status for rid, o in outcomes.items()} == dict.fromkeys(bad, "delivered")
    for rid in bad:
        result = store.result(rid)
        assert result is not None and result.delivered and result.status is State.FAILED
    check_counts(store)


def test_a_bad_stored_request_keeps_its_callback_for_delivery(
    store: LaneStore, service_config: ServiceConfig, now: float
) -> None:
    """Failed at its claim, an old version's request still reaches the sink it named."""
    callback = {"kind": "celery", "task": "app.save_answer", "queue": "answers"}
    rid = submit(store, service_config, now, callback=callback).id
    _corrupt(store, rid, float("inf"), deadline="inf", data=_data_with(store, rid, deadline=None))
    claimed = store.claim("standard", 5, lease_s=60, now=now)
    assert (list(claimed), claimed.failed) == ([], [rid])
    request, result = store.finished_many([rid])[rid]
    assert request.callback is not None and request.callback.model_dump() == callback
    assert result.status is State.FAILED and result.error is not None
    assert result.deadline == 0.0, "a stored number that is no number reads as 0, never raises"


def test_transitions_of_a_request_with_a_bad_deadline_never_stop_halfway(
    store: LaneStore, service_config: ServiceConfig, now: float
) -> None:
    """A leased request whose stored deadline is not a number (an older version's): finish and
    requeue compared or queued it and stopped halfway (Lua errors do not roll back), leaving a
    state the counts did not know. Now each completes, and a requeued one fails at its claim."""
    done, retried = submit(store, service_config, now).id, submit(store, service_config, now).id
    first, second = store.claim("standard", 2, lease_s=60, now=now)
    for rid in (done, retried):
        _corrupt(store, rid, deadline="null")
    by_id = {first.id: first, second.id: second}
    body = StoredResult.model_validate({"body": {"ok": 1}})
    assert store.finish(done, by_id[done].token, State.DONE, body, now=now + 1)
    assert store.requeue(retried, by_id[retried].token, BOOM, now=now + 1) is State.QUEUED
    check_counts(store)
    again = store.claim("standard", 5, lease_s=60, now=now + 2)
    assert (list(again), again.failed) == ([], [retried])
    assert store.status(done).state is State.DONE
    check_counts(store)


def test_submit_refuses_numbers_redis_cannot_order_before_writing_anything(
    store: LaneStore, service_config: ServiceConfig, now: float
) -> None:
    """``Prepared`` refuses inf and NaN; a request built without validation must not reach
    Redis either (the old store wrote inf as null, and NaN left a hash in no queue)."""
    good = make(service_config, now, custom_id="c-1")
    for field, value in (
        ("deadline", float("inf")),
        ("deadline", float("nan")),
        ("created_at", float("-inf")),
        ("max_attempts", 0),
    ):
        item = good.model_copy(update={field: value})
        with pytest.raises(InvalidRequest) as many:
            store.submit_many([item], service_config, now=now)
        with pytest.raises(InvalidRequest) as one:
            store.submit_one(item, service_config, now=now)
        assert many.value.field == one.value.field == field
    assert list(store.redis.scan_iter(match=f"{store.keys.ns}:*")) == [store.keys.config().encode()]


@pytest.mark.parametrize("deadline", ["inf", "-inf", "nan", "null", "1e999"])
def test_the_submit_scripts_write_nothing_for_a_deadline_that_is_no_number(
    store: LaneStore, service_config: ServiceConfig, now: float, deadline: str
) -> None:
    """The scripts check too (any client may call them): no hash, no queue entry, no count."""
    item = make(service_config, now)
    k = store.keys
    rid = new_request_id("standard", now)
    row = [rid, deadline, "default", "", 3, item.model_dump_json()]
    codes = store.scripts["submit_many"](
        keys=[k.queue("standard"), k.queue_age("standard"), k.counts("standard"), k.request(rid)],
        args=[0, repr(now), State.QUEUED.value, json.dumps([row])],
    )
    assert codes == [-2]
    keys, args = store.submit_one_call(item, rid, service_config, now)
    args[1] = deadline
    assert store.scripts["submit_one"](keys=keys, args=args) == [-2]
    assert list(store.redis.scan_iter(match=f"{store.keys.ns}:*")) == [store.keys.config().encode()]


def test_a_custom_id_is_not_kept_for_a_year(
    store: LaneStore, service_config: ServiceConfig, now: float
) -> None:
    """The idempotency key lived until the deadline plus the result TTL: a year-away deadline
    kept it a year. Now its wait is capped (``IDEMPOTENCY_WAIT_MAX_S``)."""
    far = make(service_config, now, custom_id="far", deadline=now + 300 * 86400)
    near = make(service_config, now, custom_id="near", deadline=now + 600)
    store.submit_many([far], service_config, now=now)
    store.submit_one(near, service_config, now=now)
    far_ttl = store.redis.ttl(store.keys.idempotency("default", "far"))
    near_ttl = store.redis.ttl(store.keys.idempotency("default", "near"))
    assert far_ttl < 60 * 86400, f"kept {far_ttl / 86400:.0f} days"
    ceiling = store_submit.IDEMPOTENCY_WAIT_MAX_S + store.result_ttl_s + 3600
    assert ceiling - 5 <= far_ttl <= ceiling
    assert near_ttl == pytest.approx(600 + store.result_ttl_s + 3600, abs=5)


# -- one script per transition: a worker that dies midway leaves nothing half done -----------

#: Commands that change nothing; every other one is a write a crash may fall after.
READS = {"EXISTS", "GET", "HEXISTS", "HGET", "HGETALL", "HLEN", "HMGET", "HVALS", "SCRIPT LOAD"}
READS |= {"SMEMBERS", "TTL", "TYPE", "ZCARD", "ZRANGE", "ZRANGEBYSCORE", "ZSCORE"}


@contextlib.contextmanager
def crash_after(store: LaneStore, writes: int) -> Iterator[None]:
    """The worker dies once ``writes`` commands that change Redis have run: every later command
    raises, as a process killed between two round trips of one transition would never send it."""
    real = store.redis.execute_command
    done = [0]

    def execute(*args: Any, **options: Any) -> Any:
        if done[0] >= writes:
            raise redis.ConnectionError("the worker died")
        out = real(*args, **options)
        if str(args[0]).upper() not in READS:
            done[0] += 1
        return out

    store.redis.execute_command = execute  # type: ignore[method-assign]
    try:
        with contextlib.suppress(StoreUnavailable):
            yield
    finally:
        store.redis.execute_command = real  # type: ignore[method-assign]


def _filed(store: LaneStore, rid: str) -> tuple[bool, bool, int, bool]:
    """(listed, flagged on the request, the lane's count, in the outbox) of a dead letter."""
    listed = rid in [e["id"] for e in store.dlq.entries()]
    flagged = store.redis.hget(store.keys.request(rid), "dead_letter") is not None
    count = store.lane_stats("standard").counts.get("dead_letters", 0)
    outbox = store.redis.zscore(store.keys.outbox("standard"), rid) is not None
    return listed, flagged, count, outbox


FILED = (True, True, 1, False)
NOT_FILED = (False, False, 0, True)
FORGOTTEN = (False, False, 0, False)


def _running_last_attempt(store: LaneStore, config: ServiceConfig, now: float) -> Claimed:
    submit(store, config, now, max_attempts=1)
    claimed = claim_one(store, "standard", now)
    assert store.start(claimed, state=State.RUNNING, route=Route.REALTIME, lease_s=60, now=now)
    return claimed


def _given_up(store: LaneStore, rid: str) -> tuple[State, bool, bool, str | None]:
    """(state, holds a lease, in the outbox, the stored error's message) of a retried request."""
    result = store.result(rid)
    return (
        store.status(rid).state,
        store.redis.zscore(store.keys.leases("standard"), rid) is not None,
        store.redis.zscore(store.keys.outbox("standard"), rid) is not None,
        result.error.message if result is not None and result.error is not None else None,
    )


@pytest.mark.parametrize("writes", [0, 1, 2, 3])
def test_requeue_past_the_last_attempt_is_one_step(
    store: LaneStore, service_config: ServiceConfig, now: float, writes: int
) -> None:
    """Issue 12, "Lanes stop" 5: requeue.lua said "attempts used up", then Python read the
    attempts, then finish.lua failed it: a worker that died between left the request RUNNING
    with no result. Now one script stores the FAILED result ("gave up after N attempts", the
    shape ``StoredResult(status_code, error=...)``) and queues its delivery; whatever the crash
    point, the request is either still running or failed in full."""
    claimed = _running_last_attempt(store, service_config, now)
    with crash_after(store, writes):
        store.requeue(claimed.id, claimed.token, BOOM, now=now + 1)
    gave_up = "upstream 503 (gave up after 1 attempts)"
    assert _given_up(store, claimed.id) in (
        (State.RUNNING, True, False, None),
        (State.FAILED, False, True, gave_up),
    )
    if writes:
        result = store.result(claimed.id)
        assert result is not None and result.status_code == 503
        assert result.error == BOOM.model_copy(update={"message": gave_up})
    check_counts(store)


@pytest.mark.parametrize("writes", [0, 1, 2, 3])
def test_filing_a_dead_letter_is_one_step(
    store: LaneStore, service_config: ServiceConfig, now: float, writes: int
) -> None:
    """``dead_letter`` ran deliver_done.lua, then a separate HSET into the list: a worker that
    died between left the request out of the outbox and out of the list, never retried and
    never listed. Now one script leaves the outbox and files the entry."""
    rid = _finished(store, service_config, now)
    store.claim_delivery(rid, lease_s=30, now=now)
    with crash_after(store, writes):
        store.dlq.add(rid, BOOM, now=now + 1)
    assert _filed(store, rid) in (NOT_FILED, FILED)
    if writes >= 2:
        assert _filed(store, rid) == FILED


@pytest.mark.parametrize("writes", [0, 1, 2, 3])
@pytest.mark.parametrize("action", ["replay", "drop"])
def test_replaying_or_dropping_a_dead_letter_is_one_step(
    store: LaneStore, service_config: ServiceConfig, now: float, action: str, writes: int
) -> None:
    """Replay ran its script, then removed the list's entry; drop removed the entry, then ran
    its script. A crash between listed a replayed request as dead, or left a dropped one
    flagged and counted. Now each is one script: before or after, never between."""
    rid = _finished(store, service_config, now)
    store.claim_delivery(rid, lease_s=30, now=now)
    assert store.dlq.add(rid, BOOM, now=now + 1)
    with crash_after(store, writes):
        if action == "replay":
            store.dlq.replay(rid, now=now + 2)
        else:
            store.dlq.drop(rid)
    after = (False, False, 0, True) if action == "replay" else FORGOTTEN
    assert _filed(store, rid) in (FILED, after)
    if writes:
        assert _filed(store, rid) == after


def _dead_letter_counts_match(store: LaneStore, lane: str = "standard") -> None:
    listed = [e["id"] for e in store.dlq.entries() if e["lane"] == lane]
    flagged = [rid for rid in listed if store.redis.hget(store.keys.request(rid), "dead_letter")]
    assert store.lane_stats(lane).counts.get("dead_letters", 0) == len(listed) == len(flagged)


def test_dead_letters_keep_the_count_whatever_the_order_of_calls(
    store: LaneStore, service_config: ServiceConfig, now: float
) -> None:
    """Filed twice, replayed twice, dropped twice: the lane's count is always the number listed."""
    a, b = _finished(store, service_config, now), _finished(store, service_config, now)
    for rid in (a, b):
        store.claim_delivery(rid, lease_s=30, now=now)
        assert store.dlq.add(rid, BOOM, now=now + 1)
        assert not store.dlq.add(rid, BOOM, now=now + 1), "out of the outbox already"
    _dead_letter_counts_match(store)
    assert store.dlq.replay(a, now=now + 2) is True
    assert store.dlq.replay(a, now=now + 2) is None
    _dead_letter_counts_match(store)
    assert store.dlq.count() == 1
    assert store.dlq.drop(b) and not store.dlq.drop(b)
    assert store.dlq.count() == 0
    assert store.lane_stats("standard").counts["dead_letters"] == 0


def test_the_sweeper_forgets_dead_letters_whose_result_expired(
    store: LaneStore, service_config: ServiceConfig, now: float
) -> None:
    """The dead-letter list had no TTL and no cap. A dead letter is now kept while its result
    (what a replay would send) is: ``trim`` forgets those filed ``result_ttl_s`` ago."""
    old, recent = _finished(store, service_config, now), _finished(store, service_config, now)
    for rid, at in ((old, now), (recent, now + 100)):
        store.claim_delivery(rid, lease_s=30, now=at)
        assert store.dlq.add(rid, BOOM, now=at)
    assert store.trim("standard", now + store.result_ttl_s - 1) == (0, 0)
    assert store.trim("standard", now + store.result_ttl_s + 1) == (0, 1)
    assert [e["id"] for e in store.dlq.entries()] == [recent]
    assert store.redis.hget(store.keys.request(old), "dead_letter") is None
    _dead_letter_counts_match(store)
    assert store.trim("standard", now + store.result_ttl_s + 101) == (0, 1)
    assert store.dlq.entries() == []
    _dead_letter_counts_match(store)


def test_dead_letters_an_older_version_kept_in_one_list_are_moved_into_their_lanes(
    store: LaneStore, service_config: ServiceConfig, now: float
) -> None:
    """Key names are data: the single list (``ns:dlq``) an older version filed into is read by
    the sweeper and each entry filed in its lane, counted once, and replayable as before."""
    rid = _finished(store, service_config, now)
    store.claim_delivery(rid, lease_s=30, now=now)
    # What the older version's dead_letter left: out of the outbox, flagged and counted on the
    # request's lane, its entry in the one list.
    store.redis.zrem(store.keys.outbox("standard"), rid)
    store.redis.hset(store.keys.request(rid), mapping={"dead_letter": "1"})
    store.redis.hincrby(store.keys.counts("standard"), "dead_letters", 1)
    entry = {"id": rid, "lane": "standard", "at": now + 1, "error": BOOM.model_dump()}
    store.redis.hset(store.keys.legacy_dead_letters(), rid, json.dumps(entry))

    sweep_lanes(store, service_config.lanes, now + 2, lambda ids: None)
    assert store.dlq.entries() == [entry]
    assert store.redis.exists(store.keys.legacy_dead_letters()) == 0
    _dead_letter_counts_match(store)
    assert store.dlq.adopt_legacy() == 0, "once"
    assert store.dlq.replay(rid, now=now + 3) is True
    assert store.due_deliveries("standard", now + 3) == [rid]
    _dead_letter_counts_match(store)
