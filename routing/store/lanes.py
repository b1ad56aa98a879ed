"""The lane store: requests, leases, results and deliveries in Redis, every transition one Lua script.

The public methods do the bookkeeping (ids, JSON, idempotency, error mapping); the scripts in
``routing/lua/`` do the atomic part and list their keys in their headers. Durability lives here,
not in Celery messages: a task that lost its message, or got it twice, re-reads this store.
Submitting (``routing.store.submit``), reading (``routing.store.reads``) and the dead letters
(``routing.store.dlq``, as ``LaneStore.dlq``) live in their own modules.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import redis
from pydantic import ValidationError

from routing.decide.tables import first_error
from routing.errors import NotFound
from routing.keys import Keys, lane_of
from routing.models import (
    Claimed,
    ErrorInfo,
    LaneSpec,
    Prepared,
    Route,
    ServiceConfig,
    StoredResult,
)
from routing.states import FINISHED, LEASED, State
from routing.store.base import CANCELLABLE, CANCELLED, decode, dumps, store_errors
from routing.store.claims import ClaimOps
from routing.store.connect import Replication, connect, is_cluster
from routing.store.dlq import DeadLetters
from routing.store.reads import ReadOps
from routing.store.scripts import Scripts
from routing.store.submit import SubmitOps

__all__ = ["DEFAULT_RESULT_TTL_S", "INVALID_STORED", "Claims", "LaneStore"]

log = logging.getLogger(__name__)

DEFAULT_RESULT_TTL_S = 7 * 86400
#: The error code of a stored request that cannot be read back (an older version wrote it, or a
#: hand edit): it fails alone at its claim, with what is wrong, and is delivered like any failure.
INVALID_STORED = "invalid_stored_request"
#: Entries per ``trim.lua`` call (each passes its request hashes in KEYS).
_TRIM_CHUNK = 1000


class Claims(list[Claimed]):
    """What a claim took: the requests to route, and in ``failed`` the ids of stored requests
    that could not be read back and were FAILED instead (their delivery is the caller's to send)."""

    def __init__(self, claimed: Iterable[Claimed] = ()) -> None:
        super().__init__(claimed)
        self.failed: list[str] = []


def _read_claimed(data: bytes, problem: str) -> Prepared | str:
    """The stored request, or why it cannot be run (its claim.lua problem, or a validation error)."""
    if problem:
        return problem
    try:
        return Prepared.model_validate_json(data)
    except ValidationError as exc:
        field, message = first_error(exc)
        return f"its stored {field or 'data'} is invalid: {message}"


class LaneStore(SubmitOps, ReadOps, ClaimOps):
    """All state transitions of requests. Safe to share across threads; any number of processes."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        namespace: str = "mb",
        result_ttl_s: int = DEFAULT_RESULT_TTL_S,
        url: str = "redis",
        cluster: bool = False,
    ) -> None:
        self.redis = client
        self.cluster = cluster
        self.keys = Keys(namespace)
        self.result_ttl_s = result_ttl_s
        self.url = url
        self.scripts = Scripts(client)
        self.dlq = DeadLetters(self)
        self.lane_shards = {}
        self._published_read = False

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> LaneStore:
        """Any form of MIXBATCH_REDIS_URL (``routing.store.connect``); submits wait for replicas."""
        kwargs.setdefault("cluster", is_cluster(url))
        store = cls(connect(url), url=url, **kwargs)
        store.replication = Replication.from_env()
        return store

    def close(self) -> None:
        self.redis.close()

    # -- service config -------------------------------------------------------------------

    def publish_config(self, config: ServiceConfig) -> None:
        self.learn_lanes(config.lanes)
        with store_errors(self.url):
            self.redis.set(self.keys.config(), config.model_dump_json())

    def load_config(self) -> ServiceConfig | None:
        with store_errors(self.url):
            raw = self.redis.get(self.keys.config())
        if raw is None:
            return None
        config = ServiceConfig.model_validate_json(raw)
        self.learn_lanes(config.lanes)
        return config

    # -- claim and lease transitions --------------------------------------------------------

    def claim(self, lane: str, n: int, *, lease_s: float, now: float | None = None) -> Claims:
        """Up to ``n`` queued requests of ``lane``, earliest deadline first (across its shards:
        ``routing.store.claims`` says how exactly), each under a lease.

        A stored request that cannot be read back (an older version's, a hand edit's) is FAILED
        alone, with the reason, and its id is in ``failed`` for the caller to deliver: one bad
        request never stops a lane.
        """
        return self._claim([(lane, len(self.shards(lane)))], n, lease_s=lease_s, now=now)

    def claim_lanes(
        self, lanes: Sequence[LaneSpec], n: int, *, lease_s: float, now: float | None = None
    ) -> Claims:
        """Claim across lanes by priority: an urgent request never waits behind bulk work.
        Every lane's heads are read in one round trip and claimed in one more."""
        self.learn_lanes(lanes)
        order = [(s.name, s.shards) for s in sorted(lanes, key=lambda s: -s.priority)]
        return self._claim(order, n, lease_s=lease_s, now=now)

    def _claim(
        self, lanes: Sequence[tuple[str, int]], n: int, *, lease_s: float, now: float | None
    ) -> Claims:
        if n <= 0:
            return Claims()
        now = time.time() if now is None else now
        token = uuid.uuid4().hex
        flat = self.claim_flat(lanes, n, token=token, lease_until=now + lease_s, now=now)
        out = Claims()
        unreadable: list[tuple[str, str, State, StoredResult]] = []
        for i in range(0, len(flat), 4):
            rid = decode(flat[i])
            request = _read_claimed(flat[i + 2], decode(flat[i + 3]))
            if isinstance(request, Prepared):
                out.append(Claimed(id=rid, token=token, attempts=int(flat[i + 1]), request=request))
                continue
            log.warning("stored request cannot be run", extra={"request_id": rid, "why": request})
            error = ErrorInfo(
                code=INVALID_STORED, message=f"the stored request cannot be run: {request}"
            )
            unreadable.append((rid, token, State.FAILED, StoredResult(error=error)))
        won = self.finish_many(unreadable, now=now)
        out.failed.extend(rid for (rid, *_), ok in zip(unreadable, won, strict=True) if ok)
        rank = {lane: n for n, (lane, _) in enumerate(lanes)}
        out.sort(key=lambda c: (rank.get(lane_of(c.id), 0), c.request.deadline))
        return out

    def start(
        self,
        claimed: Claimed,
        *,
        state: State,
        route: Route,
        lease_s: float | None,
        now: float | None = None,
    ) -> bool:
        """CLAIMED -> RUNNING (renewing the lease) or -> SUBMITTED (``lease_s=None``)."""
        return self.start_many([claimed], state=state, route=route, lease_s=lease_s, now=now)[0]

    def start_many(
        self,
        claimed: Sequence[Claimed],
        *,
        state: State,
        route: Route,
        lease_s: float | None,
        now: float | None = None,
    ) -> list[bool]:
        """``start`` for many requests in one pipelined round trip."""
        now = time.time() if now is None else now
        lease = repr(now + lease_s) if lease_s else "0"
        with store_errors(self.url):
            pipe = self.redis.pipeline(transaction=False)
            for c in claimed:
                k = self.request_keys(c.id)
                self.scripts["start"](
                    keys=[k["req"], k["leases"], k["counts"]],
                    args=[c.id, c.token, state.value, lease, repr(now), route.value]
                    + [s.value for s in LEASED],
                    client=pipe,
                )
            return [bool(x) for x in pipe.execute()] if claimed else []

    def renew_many(
        self, held: Sequence[tuple[str, str]], *, lease_s: float, now: float | None = None
    ) -> list[bool]:
        """A running worker's heartbeat: push each (id, token)'s lease to ``now + lease_s``.

        False where the request is no longer ours (requeued, cancelled, finished): one round trip.
        """
        now = time.time() if now is None else now
        with store_errors(self.url):
            pipe = self.redis.pipeline(transaction=False)
            for request_id, token in held:
                k = self.request_keys(request_id)
                self.scripts["renew"](
                    keys=[k["req"], k["leases"]],
                    args=[request_id, token, repr(now + lease_s), *[s.value for s in LEASED]],
                    client=pipe,
                )
            return [bool(x) for x in pipe.execute()] if held else []

    def finish(
        self,
        request_id: str,
        token: str,
        outcome: State,
        result: StoredResult,
        *,
        now: float | None = None,
    ) -> bool:
        """Store the result and the outcome together. False if the lease was lost meanwhile."""
        return self.finish_many([(request_id, token, outcome, result)], now=now)[0]

    def finish_many(
        self,
        items: Sequence[tuple[str, str, State, StoredResult]],
        *,
        now: float | None = None,
        delivered: Sequence[bool] = (),
    ) -> list[bool]:
        """``finish`` for many (id, token, outcome, result) in one pipelined round trip.

        ``delivered[i]`` true: item i has no sink to call, so it is DELIVERED in the same script
        (the built-in store is its delivery), saving a second script per request."""
        now = time.time() if now is None else now
        froms = (*LEASED, State.SUBMITTED)
        for _, _, outcome, _ in items:
            if outcome not in FINISHED:
                raise ValueError(f"{outcome} is not an outcome")
        with store_errors(self.url):
            pipe = self.redis.pipeline(transaction=False)
            for n, (request_id, token, outcome, result) in enumerate(items):
                call = self.settle_call(
                    request_id,
                    token,
                    outcome,
                    dumps(result.stored()),
                    now,
                    froms,
                    delivered=n < len(delivered) and delivered[n],
                )
                self.scripts["settle"](*call, client=pipe)
            return [bool(int(x[0])) if x else False for x in pipe.execute()] if items else []

    def requeue(
        self,
        request_id: str,
        token: str,
        error: ErrorInfo,
        *,
        ready_at: float | None = None,
        now: float | None = None,
    ) -> State | None:
        """Back to the lane after a retryable failure; FAILED once attempts are used up.

        One script either way: the FAILED result (``error`` with "gave up after N attempts")
        is stored in the same step that finds the attempts used up. ``token`` ``"*"`` is the
        sweeper, allowed once the lease has run out. Returns the new state, or None when the
        request was no longer ours.
        """
        now = time.time() if now is None else now
        marker = uuid.uuid4().hex
        final = error.model_copy(
            update={"message": f"{error.message} (gave up after {marker} attempts)"}
        )
        stored = dumps(StoredResult(status_code=error.status_code, error=final).stored())
        head, _, tail = stored.partition(marker)
        with store_errors(self.url):
            out = self.scripts["settle"](
                *self.settle_call(
                    request_id,
                    token,
                    State.QUEUED,
                    error.model_dump_json(),
                    now,
                    (*LEASED, State.SUBMITTED),
                    ready_at=ready_at,
                    gave_up=(head, tail),
                )
            )
        return State(decode(out[2])) if out and int(out[0]) else None

    def drop(
        self,
        request_id: str,
        outcome: State,
        error: ErrorInfo | None,
        *,
        from_states: Iterable[State],
        now: float | None = None,
    ) -> tuple[bool, State | None]:
        """Finish a request wherever it waits (cancel, expiry); a late worker answer is refused."""
        now = time.time() if now is None else now
        result = dumps(StoredResult(error=error).stored())
        with store_errors(self.url):
            call = self.settle_call(request_id, "", outcome, result, now, tuple(from_states))
            out = self.scripts["settle"](*call)
        if not out:
            return False, None
        return bool(int(out[0])), State(decode(out[1]))

    def cancel(self, request_id: str, *, now: float | None = None) -> State:
        """Cancel unless already finished; returns the state the request is in afterwards."""
        dropped, state = self.drop(
            request_id, State.CANCELLED, CANCELLED, from_states=CANCELLABLE, now=now
        )
        if state is None:
            raise NotFound(request_id)
        return State.CANCELLED if dropped else state

    def beat(self, now: float, role: str = "sweep") -> None:
        """Record that a periodic task ran, for ``mixbatch health``."""
        with store_errors(self.url):
            self.redis.set(self.keys.heartbeat(role), repr(now), ex=3600)

    def last_beat(self, role: str = "sweep") -> float | None:
        with store_errors(self.url):
            raw = self.redis.get(self.keys.heartbeat(role))
        return float(raw) if raw is not None else None

    # -- sweeping -------------------------------------------------------------------------

    def _due(
        self, which: Callable[[str, int], str], lane: str, now: float, limit: int
    ) -> list[str]:
        """Ids scored at or before ``now`` in one sorted set of each of ``lane``'s shards."""
        with store_errors(self.url):
            pipe = self.redis.pipeline(transaction=False)
            for shard in self.shards(lane):
                pipe.zrangebyscore(which(lane, shard), "-inf", now, start=0, num=limit)
            return [decode(r) for raw in pipe.execute() for r in raw][:limit]

    def expired_leases(self, lane: str, now: float, limit: int = 1000) -> list[str]:
        return self._due(self.keys.leases, lane, now, limit)

    def overdue_queued(self, lane: str, now: float, limit: int = 1000) -> list[str]:
        return self._due(self.keys.queue, lane, now, limit)

    def due_deliveries(self, lane: str, now: float, limit: int = 1000) -> list[str]:
        return self._due(self.keys.outbox, lane, now, limit)

    def trim(self, lane: str, now: float, limit: int = 10_000) -> tuple[int, int]:
        """Forget what ``lane`` served whose results expired: (finished entries, dead letters).

        Request hashes expire by themselves (``result_ttl_s`` after they finish); what indexes
        them does not, so the sweeper calls this and a lane's keys stay bounded by the traffic
        of the last ``result_ttl_s``, not by all it ever served. Two steps per shard: read the
        entries past the cutoff, then ``trim.lua`` with their hashes re-checks and forgets them.
        """
        k, cutoff = self.keys, now - self.result_ttl_s
        with store_errors(self.url):
            pipe = self.redis.pipeline(transaction=False)
            for shard in self.shards(lane):
                pipe.zrangebyscore(k.finished(lane, shard), "-inf", f"({cutoff!r}", 0, limit)
                pipe.zrangebyscore(
                    k.dead_letters(lane, shard=shard), "-inf", f"({cutoff!r}", 0, limit
                )
            found = pipe.execute()
            pipe = self.redis.pipeline(transaction=False)
            for shard in self.shards(lane):
                done, dead = found[2 * shard], found[2 * shard + 1]
                for start in range(0, max(len(done), len(dead)), _TRIM_CHUNK):
                    ids = [
                        decode(i)
                        for i in (
                            *done[start : start + _TRIM_CHUNK],
                            *dead[start : start + _TRIM_CHUNK],
                        )
                    ]
                    f = len(done[start : start + _TRIM_CHUNK])
                    self.scripts["trim"](
                        keys=[
                            k.finished(lane, shard),
                            k.dead_letters(lane, shard=shard),
                            k.dead_letters(lane, "entries", shard),
                            k.counts(lane, shard),
                            *(k.request_prefix(lane, shard) + rid for rid in ids),
                        ],
                        args=[repr(cutoff), f, *ids],
                        client=pipe,
                    )
            replies = pipe.execute()
        return sum(int(r[0]) for r in replies), sum(int(r[1]) for r in replies)

    # -- delivery -------------------------------------------------------------------------

    def claim_delivery(
        self, request_id: str, *, lease_s: float, now: float | None = None
    ) -> int | None:
        """The delivery attempt number if this worker may deliver now, else None."""
        return self.claim_deliveries([request_id], lease_s=lease_s, now=now).get(request_id)

    def claim_deliveries(
        self, request_ids: Sequence[str], *, lease_s: float, now: float | None = None
    ) -> dict[str, int]:
        """``claim_delivery`` for many, pipelined: the ids this worker may deliver now."""
        now = time.time() if now is None else now
        with store_errors(self.url):
            pipe = self.redis.pipeline(transaction=False)
            for rid in request_ids:
                k = self.request_keys(rid)
                self.scripts["deliver_claim"](
                    keys=[k["req"], k["outbox"]],
                    args=[rid, repr(now), repr(now + lease_s)],
                    client=pipe,
                )
            out = pipe.execute() if request_ids else []
        return {rid: int(r[0]) for rid, r in zip(request_ids, out, strict=True) if r}

    def delivered(self, request_id: str, *, now: float | None = None) -> bool:
        return self.delivered_many([request_id], now=now)[0]

    def delivered_many(self, request_ids: Sequence[str], *, now: float | None = None) -> list[bool]:
        now = time.time() if now is None else now
        with store_errors(self.url):
            pipe = self.redis.pipeline(transaction=False)
            for rid in request_ids:
                k = self.request_keys(rid)
                self.scripts["deliver_done"](
                    keys=[k["req"], k["outbox"], k["counts"]],
                    args=[rid, repr(now), self.result_ttl_s, State.DELIVERED.value],
                    client=pipe,
                )
            return [bool(x) for x in pipe.execute()] if request_ids else []

    def retry_delivery(self, request_id: str, error: ErrorInfo, *, due_at: float) -> None:
        """A failed delivery that may succeed later: note its error and when to try again."""
        k = self.request_keys(request_id)
        with store_errors(self.url):
            self.scripts["retry_delivery"](
                keys=[k["req"], k["outbox"]],
                args=[request_id, error.model_dump_json(), repr(due_at)],
            )
