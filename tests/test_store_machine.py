"""The lane store against a model of it: hypothesis drives any sequence of transitions.

Rules: submit (one request, or a batch with custom_ids repeated inside it and across calls),
claim, start (RUNNING or SUBMITTED), finish, requeue (now or after a delay), cancel, deliver,
sweep with a clock that moves forward (every call passes ``now``), and corrupt: a queued request
rewritten as an older version stored an infinite deadline, which its claim must fail alone. Each rule says what the
model expects (which requests a claim takes, which calls are refused), and after every step the
invariants hold on the real Redis:

- each request is in exactly one state, the model's, with the model's attempt count;
- it is in exactly the structures that state implies (queue or delayed set, leases, outbox,
  finished index) and in no other;
- each lane's ``counts`` hash equals the real number of requests per state, and no request
  hash exists that the model does not know.

Deterministic (``derandomize``) and small (50 examples of 30 steps), so the suite stays quick.
The machine uses its own Redis database and a fresh namespace per example.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import ClassVar
from urllib.parse import urlsplit, urlunsplit

import redis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from routing.engine.sweep import REDELIVER_GRACE_S, sweep
from routing.models import (
    Claimed,
    ErrorInfo,
    LaneSpec,
    Request,
    Route,
    ServiceConfig,
    StoredResult,
    prepare,
)
from routing.states import FINISHED, LEASED, State
from routing.store.lanes import LaneStore

CONFIG = ServiceConfig(
    lanes=(
        LaneSpec(name="fast", deadline_s=60, priority=10, on_deadline="expire"),
        LaneSpec(name="slow", deadline_s=600),
    )
)
LANES = tuple(spec.name for spec in CONFIG.lanes)
LEASE_S = 30.0
DELIVERY_LEASE_S = 5.0
BOOM = ErrorInfo(code="server_error", message="upstream 503", retryable=True, status_code=503)
#: A database of the test Redis that only this machine uses, so its SCANs stay small.
DB = 13
T0 = 1_900_000_000.0


@dataclass
class Model:
    """What the store should hold for one request."""

    lane: str
    deadline: float
    max_attempts: int
    state: State = State.QUEUED
    attempts: int = 0
    token: str = ""
    lease_until: float = 0.0
    delayed_until: float | None = None  # QUEUED in the delayed set, until then
    outbox_due: float | None = None  # finished and not yet delivered: due then
    unreadable: bool = False  # stored the way an older version stored an infinite deadline


class LaneStoreMachine(RuleBasedStateMachine):
    url: ClassVar[str]

    def __init__(self) -> None:
        super().__init__()
        client = redis.Redis.from_url(urlunsplit(urlsplit(self.url)._replace(path=f"/{DB}")))
        self.store = LaneStore(client, namespace=f"m{uuid.uuid4().hex[:10]}", url=self.url)
        self.now = T0
        self.model: dict[str, Model] = {}
        self.ids: list[str] = []  # in submit order, for rules to pick from
        self.custom: dict[str, str] = {}  # custom_id -> the first request's id

    def teardown(self) -> None:
        keys = list(self.store.redis.scan_iter(match=f"{self.store.keys.ns}:*", count=1000))
        if keys:
            self.store.redis.delete(*keys)
        self.store.close()

    # -- helpers -------------------------------------------------------------------------------

    def pick(self, index: int) -> tuple[str, Model]:
        rid = self.ids[index % len(self.ids)]
        return rid, self.model[rid]

    def token_for(self, m: Model, stale: bool) -> str:
        return "not-the-token" if stale or not m.token else m.token

    def claimable(self, lane: str) -> list[str]:
        """What a claim of ``lane`` may take now, in the order it takes them."""
        ready = [
            rid
            for rid, m in self.model.items()
            if m.lane == lane
            and m.state is State.QUEUED
            and (m.delayed_until is None or m.delayed_until <= self.now)
        ]
        return sorted(ready, key=lambda rid: (self.model[rid].deadline, rid))

    def finish_model(self, m: Model, outcome: State) -> None:
        m.state, m.token, m.lease_until, m.delayed_until = outcome, "", 0.0, None
        m.outbox_due = self.now

    def requeue_model(self, m: Model, ready_at: float, *, sweeper: bool) -> State:
        if sweeper and m.state is State.CLAIMED:
            m.attempts -= 1  # never started: the attempt is given back
        elif m.attempts >= m.max_attempts:
            self.finish_model(m, State.FAILED)
            return State.FAILED
        m.state, m.token, m.lease_until = State.QUEUED, "", 0.0
        m.delayed_until = ready_at if ready_at > self.now else None
        return State.QUEUED

    # -- rules ---------------------------------------------------------------------------------

    @rule(
        lane=st.sampled_from(LANES),
        custom_ids=st.lists(st.sampled_from(["a", "b", "c", None]), min_size=1, max_size=3),
        wait=st.integers(min_value=1, max_value=120),
        max_attempts=st.integers(min_value=1, max_value=3),
    )
    def submit(self, lane: str, custom_ids: list[str | None], wait: int, max_attempts: int) -> None:
        # Deadlines never tie, so what a claim takes does not hang on the random part of an id.
        items = [
            prepare(
                Request(
                    lane=lane,
                    custom_id=cid,
                    deadline=self.now + wait + (len(self.ids) + i) / 1024,
                    max_attempts=max_attempts,
                    body={"model": "m", "messages": []},
                ),
                CONFIG,
                self.now,
            )
            for i, cid in enumerate(custom_ids)
        ]
        if len(items) == 1 and custom_ids[0] != "c":
            tickets = [self.store.submit_one(items[0], CONFIG, now=self.now)]
        else:
            tickets = self.store.submit_many(items, CONFIG, now=self.now)
        assert len(tickets) == len(items)
        for cid, ticket in zip(custom_ids, tickets, strict=True):
            if cid is not None and cid in self.custom:
                assert (ticket.id, ticket.duplicate) == (self.custom[cid], True)
                continue
            assert not ticket.duplicate and ticket.id not in self.model
            self.model[ticket.id] = Model(lane, ticket.deadline, max_attempts)
            self.ids.append(ticket.id)
            if cid is not None:
                self.custom[cid] = ticket.id

    @precondition(lambda self: any(m.state is State.QUEUED for m in self.model.values()))
    @rule(index=st.integers(min_value=0))
    def corrupt(self, index: int) -> None:
        """Rewrite a queued request as the old store wrote ``deadline=inf``: "inf" in its hash
        and its queue, null in its data. Its claim must fail it alone, never stop the lane."""
        queued = [rid for rid, m in self.model.items() if m.state is State.QUEUED]
        rid = queued[index % len(queued)]
        m, k = self.model[rid], self.store.keys
        data = json.loads(self.store.redis.hget(k.request(rid), "data") or b"{}")
        self.store.redis.hset(
            k.request(rid),
            mapping={"deadline": "inf", "data": json.dumps({**data, "deadline": None})},
        )
        if m.delayed_until is None:
            self.store.redis.zadd(k.queue(m.lane), {rid: float("inf")})
            m.deadline = float("inf")
        else:
            m.deadline = 0.0  # promoted from the delayed set first in line, to be failed
        m.unreadable = True

    @rule(lane=st.sampled_from(LANES), n=st.integers(min_value=1, max_value=4))
    def claim(self, lane: str, n: int) -> None:
        expected = self.claimable(lane)[:n]
        got = self.store.claim(lane, n, lease_s=LEASE_S, now=self.now)
        for m in self.model.values():  # every due retry was promoted to the queue
            if m.lane == lane and m.delayed_until is not None and m.delayed_until <= self.now:
                m.delayed_until = None
        assert got.failed == [rid for rid in expected if self.model[rid].unreadable]
        assert [c.id for c in got] == [rid for rid in expected if not self.model[rid].unreadable]
        for rid in got.failed:
            self.model[rid].attempts += 1
            self.finish_model(self.model[rid], State.FAILED)
        for c in got:
            m = self.model[c.id]
            m.attempts += 1
            m.state, m.token, m.lease_until, m.delayed_until = (
                State.CLAIMED,
                c.token,
                self.now + LEASE_S,
                None,
            )
            assert c.attempts == m.attempts

    @precondition(lambda self: self.ids)
    @rule(index=st.integers(min_value=0), submitted=st.booleans(), stale=st.booleans())
    def start(self, index: int, submitted: bool, stale: bool) -> None:
        rid, m = self.pick(index)
        to = State.SUBMITTED if submitted else State.RUNNING
        token = self.token_for(m, stale)
        ok = self.store.start_many(
            [_claimed(rid, token, m)],
            state=to,
            route=Route.BATCH if submitted else Route.REALTIME,
            lease_s=None if submitted else LEASE_S,
            now=self.now,
        )[0]
        expected = m.state in LEASED and token == m.token
        assert ok == expected, (m, token)
        if ok:
            m.state = to
            m.lease_until = 0.0 if submitted else self.now + LEASE_S

    @precondition(lambda self: self.ids)
    @rule(index=st.integers(min_value=0), failed=st.booleans(), stale=st.booleans())
    def finish(self, index: int, failed: bool, stale: bool) -> None:
        rid, m = self.pick(index)
        token = self.token_for(m, stale)
        outcome = State.FAILED if failed else State.DONE
        result = StoredResult.model_validate({"body": {"ok": not failed}})
        ok = self.store.finish(rid, token, outcome, result, now=self.now)
        expected = m.state in (*LEASED, State.SUBMITTED) and token == m.token
        assert ok == expected, (m, token)
        if ok:
            self.finish_model(m, outcome)

    @precondition(lambda self: self.ids)
    @rule(
        index=st.integers(min_value=0),
        delay=st.sampled_from([0, 0, 15]),
        stale=st.booleans(),
    )
    def requeue(self, index: int, delay: int, stale: bool) -> None:
        rid, m = self.pick(index)
        token = self.token_for(m, stale)
        got = self.store.requeue(rid, token, BOOM, ready_at=self.now + delay, now=self.now)
        if m.state in (*LEASED, State.SUBMITTED) and token == m.token:
            assert got is self.requeue_model(m, self.now + delay, sweeper=False)
        else:
            assert got is None

    @precondition(lambda self: self.ids)
    @rule(index=st.integers(min_value=0))
    def cancel(self, index: int) -> None:
        rid, m = self.pick(index)
        got = self.store.cancel(rid, now=self.now)
        if m.state in (State.QUEUED, *LEASED, State.SUBMITTED):
            self.finish_model(m, State.CANCELLED)
        assert got is m.state

    @precondition(lambda self: self.ids)
    @rule(index=st.integers(min_value=0))
    def deliver(self, index: int) -> None:
        rid, m = self.pick(index)
        attempt = self.store.claim_delivery(rid, lease_s=DELIVERY_LEASE_S, now=self.now)
        due = m.outbox_due is not None and m.outbox_due <= self.now
        assert (attempt is not None) == due, m
        if due:
            assert self.store.delivered(rid, now=self.now)
            m.state, m.outbox_due = State.DELIVERED, None

    @rule(dt=st.sampled_from([0.0, 5.0, 20.0, 31.0, 90.0]))
    def sweep(self, dt: float) -> None:
        self.now += dt
        expired = sorted(
            (rid for rid, m in self.model.items() if m.state in LEASED),
            key=lambda rid: self.model[rid].lease_until,
        )
        report = {"requeued": 0, "failed": 0, "expired": 0, "redelivered": 0}
        for rid in expired:
            m = self.model[rid]
            if m.lease_until <= self.now:
                outcome = self.requeue_model(m, self.now, sweeper=True)
                report["requeued" if outcome is State.QUEUED else "failed"] += 1
        for m in self.model.values():
            overdue = m.state is State.QUEUED and m.delayed_until is None
            if overdue and m.lane == "fast" and m.deadline <= self.now:
                self.finish_model(m, State.EXPIRED)
                report["expired"] += 1
        overdue_deliveries = {
            rid
            for rid, m in self.model.items()
            if m.outbox_due is not None and m.outbox_due <= self.now - REDELIVER_GRACE_S
        }
        report["redelivered"] = len(overdue_deliveries)
        sent: list[str] = []
        assert sweep(self.store, CONFIG.lanes, self.now, sent.extend) == report
        assert set(sent) == overdue_deliveries

    # -- invariants ----------------------------------------------------------------------------

    @invariant()
    def every_request_is_in_its_state_and_only_its_structures(self) -> None:
        st_, k = self.store, self.store.keys
        ids = list(self.model)
        pipe = st_.redis.pipeline(transaction=False)
        for rid in ids:
            lane = self.model[rid].lane
            pipe.hmget(k.request(rid), "state", "attempts")
            for key in (k.queue, k.queue_age, k.delayed, k.leases, k.outbox, k.finished):
                pipe.zscore(key(lane), rid)
        rows = pipe.execute()
        for n, rid in enumerate(ids):
            m = self.model[rid]
            (state, attempts), q, qage, delayed, leases, outbox, finished = rows[n * 7 : n * 7 + 7]
            assert state is not None and State(state.decode()) is m.state, (rid, state, m)
            assert int(attempts) == m.attempts, (rid, attempts, m)
            queued = m.state is State.QUEUED
            assert (q is not None) == (qage is not None) == (queued and m.delayed_until is None)
            assert (delayed is not None) == (queued and m.delayed_until is not None), m
            if q is not None:
                assert q == m.deadline, "queued by its deadline"
            assert (leases is not None) == (m.state in LEASED), m
            if leases is not None:
                assert leases == m.lease_until
            assert (outbox is not None) == (m.outbox_due is not None), m
            assert (finished is not None) == (m.state in FINISHED or m.state is State.DELIVERED)

    @invariant()
    def counts_equal_the_requests_per_state(self) -> None:
        st_ = self.store
        stored: Counter[tuple[str, str]] = Counter()
        for lane in LANES:
            for key in st_.redis.scan_iter(match=st_.keys.request_prefix(lane) + "*", count=1000):
                rid = key.decode().removeprefix(st_.keys.request_prefix(lane))
                assert rid in self.model, f"a request the model does not know: {rid}"
                state = st_.redis.hget(key, "state")
                assert state is not None
                stored[lane, state.decode()] += 1
        modelled = Counter((m.lane, m.state.value) for m in self.model.values())
        assert stored == modelled
        for lane in LANES:
            counts = st_.lane_stats(lane, now=self.now).counts
            per_state = {s.value: counts.get(s.value, 0) for s in State}
            assert per_state == {s.value: modelled[lane, s.value] for s in State}, (lane, counts)


def _claimed(rid: str, token: str, m: Model) -> Claimed:
    """A ``Claimed`` handle for ``start``: only its id and token matter to the store."""
    request = prepare(
        Request(lane=m.lane, deadline=T0 + 1, body={"model": "m", "messages": []}), CONFIG, T0
    )
    return Claimed(id=rid, token=token, attempts=m.attempts, request=request)


def test_the_lane_store_behaves_like_its_model(redis_url: str) -> None:
    class Machine(LaneStoreMachine):
        url = redis_url

    run_state_machine_as_test(
        Machine,
        settings=settings(
            max_examples=50,
            stateful_step_count=30,
            derandomize=True,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
