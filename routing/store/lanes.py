"""The lane store: requests, leases, results and deliveries in Redis, every transition one Lua script.

The public methods do the bookkeeping (ids, JSON, idempotency, error mapping); the scripts in
``routing/lua/`` do the atomic part and list their keys in their headers. Durability lives here,
not in Celery messages: a task that lost its message, or got it twice, re-reads this store.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from importlib import resources
from typing import Any

import redis
from redis.commands.core import Script

from routing.errors import (
    LaneFull,
    NotFound,
    ResultTimeout,
    StoreUnavailable,
)
from routing.keys import Keys, lane_of, new_request_id
from routing.models import (
    Claimed,
    ErrorInfo,
    LaneSpec,
    LaneStats,
    Prepared,
    Result,
    Route,
    ServiceConfig,
    StatusInfo,
    StoredResult,
    Ticket,
)
from routing.states import FINISHED, LEASED, State
from routing.store.embedded import redact_url

log = logging.getLogger(__name__)

DEFAULT_RESULT_TTL_S = 7 * 86400
#: A custom_id claimed this long ago whose request never appeared: its submitter died.
TAKEOVER_S = 30.0
#: Requests per Lua call in bulk submit: long enough to amortise, short enough not to stall Redis.
_SCRIPT_CHUNK = 1000
#: Below redis-py's default socket timeout (5 s), so a BLPOP never trips it.
_WAIT_SLICE_S = 2.0


@contextlib.contextmanager
def store_errors(url: str) -> Iterator[None]:
    """Translate redis-py's connection errors once, naming the URL without its password."""
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise StoreUnavailable(
            f"cannot reach Redis at {redact_url(url)} ({exc}); is it running? "
            "Set MIXBATCH_REDIS_URL, or leave it unset to use the embedded Redis"
        ) from exc


def _load_script(client: redis.Redis, name: str) -> Script:
    text = resources.files("routing").joinpath(f"lua/{name}.lua").read_text()
    return client.register_script(text)


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), default=str)


class LaneStore:
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
        self._scripts = {
            name: _load_script(client, name)
            for name in (
                "submit_many",
                "submit_one",
                "claim_ids",
                "claim",
                "start",
                "finish",
                "requeue",
                "drop",
                "deliver_claim",
                "deliver_done",
            )
        }

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> LaneStore:
        client = redis.Redis.from_url(url, health_check_interval=30)
        return cls(client, url=url, **kwargs)

    def close(self) -> None:
        self.redis.close()

    # -- service config -------------------------------------------------------------------

    def publish_config(self, config: ServiceConfig) -> None:
        with store_errors(self.url):
            self.redis.set(self.keys.config(), config.model_dump_json())

    def load_config(self) -> ServiceConfig | None:
        with store_errors(self.url):
            raw = self.redis.get(self.keys.config())
        return None if raw is None else ServiceConfig.model_validate_json(raw)

    # -- submit ---------------------------------------------------------------------------

    def _request_keys(self, request_id: str) -> dict[str, str]:
        lane = lane_of(request_id)
        k = self.keys
        return {
            "req": k.request(request_id),
            "q": k.queue(lane),
            "qage": k.queue_age(lane),
            "delayed": k.delayed(lane),
            "leases": k.leases(lane),
            "outbox": k.outbox(lane),
            "finished": k.finished(lane),
            "counts": k.counts(lane),
            "notify": k.notify(request_id),
        }

    def submit_many(
        self, items: Sequence[Prepared], lanes: ServiceConfig, *, now: float | None = None
    ) -> list[Ticket]:
        """Enqueue in a few pipelined round trips, however many items.

        Idempotency first: ``SET NX`` per (tenant, custom_id) decides who is first, and only the
        first creates; everyone else gets the first request's ticket (``duplicate=True``) with
        its stored lane and deadline. A custom_id whose first submitter died before creating
        (older than ``TAKEOVER_S``) is taken over under the same id, so it is never lost. If a
        lane is full, the requests that fit stay enqueued and ``LaneFull`` carries their tickets
        (``accepted``) and the refused indices (``rejected``); resubmitting is safe.
        """
        now = time.time() if now is None else now
        ids = [new_request_id(p.lane, now) for p in items]
        first_of: dict[str, int] = {}
        alias: dict[int, int] = {}
        idem: list[tuple[int, str]] = []
        for i, p in enumerate(items):
            if p.custom_id is None:
                continue
            key = self.keys.idempotency(p.tenant, p.custom_id)
            if key in first_of:
                alias[i] = first_of[key]
                continue
            first_of[key] = i
            idem.append((i, key))
        tickets: list[Ticket | None] = [None] * len(items)
        create: list[int] = [i for i in range(len(items)) if items[i].custom_id is None]
        with store_errors(self.url):
            if idem:
                won = self._claim_ids(items, ids, idem, now)
                create.extend(i for (i, _), ok in zip(idem, won, strict=True) if ok)
                losers = [(i, key) for (i, key), ok in zip(idem, won, strict=True) if not ok]
                if losers:
                    self._resolve_duplicates(items, ids, losers, tickets, create, now)
            outcomes = self._create(items, ids, sorted(create), lanes, now)
        full: dict[str, list[int]] = {}
        for i, code in outcomes:
            if code == -1:
                full.setdefault(lane_of(ids[i]), []).append(i)
                continue
            tickets[i] = Ticket(
                id=ids[i],
                custom_id=items[i].custom_id,
                lane=lane_of(ids[i]),
                deadline=items[i].deadline,
                duplicate=False,
            )
        for i, j in alias.items():
            first = tickets[j]
            if first is not None:
                tickets[i] = first.model_copy(update={"duplicate": True})
        if full:
            self._release_idempotency([(items[i], ids[i]) for ix in full.values() for i in ix])
            lane = next(iter(full))
            refused = set(full[lane]) | {i for i, j in alias.items() if j in full[lane]}
            err = LaneFull(lane, lanes.lane(lane).max_queued)
            err.accepted = [t for t in tickets if t is not None]  # type: ignore[attr-defined]
            err.rejected = sorted(refused | {i for ix in full.values() for i in ix})  # type: ignore[attr-defined]
            raise err
        log.debug("submitted", extra={"count": len(items)})
        return [t for t in tickets if t is not None]

    def _resolve_duplicates(
        self,
        items: Sequence[Prepared],
        ids: list[str],
        losers: list[tuple[int, str]],
        tickets: list[Ticket | None],
        create: list[int],
        now: float,
    ) -> None:
        """Tickets of the first submitters, read back; take over ids whose creator died."""
        pipe = self.redis.pipeline(transaction=False)
        for _, key in losers:
            pipe.get(key)
        existing = pipe.execute()
        pipe = self.redis.pipeline(transaction=False)
        owners: list[tuple[int, str, float]] = []
        for (i, _), raw in zip(losers, existing, strict=True):
            if raw is None:
                create.append(i)
                continue
            rid, _, when = _s(raw).partition("|")
            owners.append((i, rid, float(when or 0)))
            pipe.hget(self.keys.request(rid), "deadline")
        for (i, rid, stamp), deadline in zip(owners, pipe.execute(), strict=True):
            ids[i] = rid
            if deadline is None and now - stamp > TAKEOVER_S:
                create.append(i)
                continue
            tickets[i] = Ticket(
                id=rid,
                custom_id=items[i].custom_id,
                lane=lane_of(rid),
                deadline=float(deadline) if deadline is not None else items[i].deadline,
                duplicate=True,
            )

    def _claim_ids(
        self, items: Sequence[Prepared], ids: list[str], idem: list[tuple[int, str]], now: float
    ) -> list[bool]:
        """Reserve custom_ids, one script per tenant slot and chunk; True where this call won."""
        by_tenant: dict[str, list[int]] = {}
        for n, (i, _) in enumerate(idem):
            by_tenant.setdefault(items[i].tenant, []).append(n)
        pipe = self.redis.pipeline(transaction=False)
        calls: list[list[int]] = []
        for positions in by_tenant.values():
            for start in range(0, len(positions), _SCRIPT_CHUNK):
                chunk = positions[start : start + _SCRIPT_CHUNK]
                rows = [
                    [f"{ids[idem[n][0]]}|{now!r}", self._idem_ttl(items[idem[n][0]], now)]
                    for n in chunk
                ]
                self._scripts["claim_ids"](
                    keys=[idem[n][1] for n in chunk], args=[_dumps(rows)], client=pipe
                )
                calls.append(chunk)
        won = [False] * len(idem)
        for chunk, out in zip(calls, pipe.execute(), strict=True):
            for n, code in zip(chunk, out, strict=True):
                won[n] = code == 1
        return won

    def _idem_ttl(self, item: Prepared, now: float) -> int:
        return int(max(item.deadline - now, 0) + self.result_ttl_s + 3600)

    def _create(
        self,
        items: Sequence[Prepared],
        ids: list[str],
        order: list[int],
        lanes: ServiceConfig,
        now: float,
    ) -> list[tuple[int, int]]:
        """Create requests, one script per lane and chunk: one fsync and one reply per chunk."""
        by_lane: dict[str, list[int]] = {}
        for i in order:
            by_lane.setdefault(lane_of(ids[i]), []).append(i)
        pipe = self.redis.pipeline(transaction=False)
        calls: list[list[int]] = []
        k = self.keys
        for lane, members in by_lane.items():
            cap = lanes.lane(lane).max_queued
            prefix = k.request_prefix(lane)
            for start in range(0, len(members), _SCRIPT_CHUNK):
                chunk = members[start : start + _SCRIPT_CHUNK]
                rows = []
                for i in chunk:
                    p = items[i]
                    if p.lane != lane:
                        p = p.model_copy(update={"lane": lane})
                    rows.append(
                        [
                            ids[i],
                            repr(p.deadline),
                            p.tenant,
                            p.custom_id or "",
                            p.max_attempts,
                            p.model_dump_json(),
                        ]
                    )
                keys = [k.queue(lane), k.queue_age(lane), k.counts(lane)]
                args = [cap, repr(now), State.QUEUED.value, prefix, _dumps(rows)]
                self._scripts["submit_many"](keys=keys, args=args, client=pipe)
                calls.append(chunk)
        out: list[tuple[int, int]] = []
        for chunk, codes in zip(calls, pipe.execute(), strict=True):
            out.extend((i, int(code)) for i, code in zip(chunk, codes, strict=True))
        return out

    def submit_one(
        self, item: Prepared, lanes: ServiceConfig, *, now: float | None = None
    ) -> Ticket:
        """One request in one round trip (single Redis node): reserve the custom_id and create.

        Falls back to ``submit_many`` for the rare cases that need more: a duplicate whose first
        submitter died, or a Redis Cluster (the two keys live in different slots there).
        """
        if self.cluster:
            return self.submit_many([item], lanes, now=now)[0]
        now = time.time() if now is None else now
        rid = new_request_id(item.lane, now)
        k = self.keys
        req = k.request(rid)
        idem = k.idempotency(item.tenant, item.custom_id) if item.custom_id else req
        with store_errors(self.url):
            out = self._scripts["submit_one"](
                keys=[idem, req, k.queue(item.lane), k.queue_age(item.lane), k.counts(item.lane)],
                args=[
                    rid,
                    repr(item.deadline),
                    item.model_dump_json(),
                    lanes.lane(item.lane).max_queued,
                    repr(now),
                    item.tenant,
                    item.custom_id or "",
                    item.max_attempts,
                    State.QUEUED.value,
                    f"{rid}|{now!r}",
                    self._idem_ttl(item, now),
                ],
            )
        code = int(out[0])
        if code == 1:
            return Ticket(id=rid, custom_id=item.custom_id, lane=item.lane, deadline=item.deadline)
        if code == -1:
            err = LaneFull(item.lane, lanes.lane(item.lane).max_queued)
            err.accepted = []  # type: ignore[attr-defined]
            err.rejected = [0]  # type: ignore[attr-defined]
            raise err
        return self.submit_many([item], lanes, now=now)[0]

    def _release_idempotency(self, pairs: Iterable[tuple[Prepared, str]]) -> None:
        """Free the custom_id of a request that was refused, but only if it still points at it."""
        script = (
            "local v = redis.call('GET', KEYS[1]) "
            "if v and string.sub(v, 1, string.len(ARGV[1]) + 1) == ARGV[1] .. '|' then "
            "return redis.call('DEL', KEYS[1]) end return 0"
        )
        with store_errors(self.url):
            for p, rid in pairs:
                if p.custom_id is not None:
                    self.redis.eval(script, 1, self.keys.idempotency(p.tenant, p.custom_id), rid)

    # -- claim and lease transitions --------------------------------------------------------

    def claim(
        self, lane: str, n: int, *, lease_s: float, now: float | None = None
    ) -> list[Claimed]:
        """Up to ``n`` queued requests of ``lane``, earliest deadline first, each under a lease."""
        if n <= 0:
            return []
        now = time.time() if now is None else now
        token = uuid.uuid4().hex
        k = self.keys
        with store_errors(self.url):
            flat = self._scripts["claim"](
                keys=[
                    k.queue(lane),
                    k.queue_age(lane),
                    k.delayed(lane),
                    k.leases(lane),
                    k.counts(lane),
                ],
                args=[
                    repr(now),
                    n,
                    repr(now + lease_s),
                    token,
                    k.request_prefix(lane),
                    State.QUEUED.value,
                    State.CLAIMED.value,
                ],
            )
        return [
            Claimed(
                id=_s(flat[i]),
                token=token,
                attempts=int(flat[i + 1]),
                request=Prepared.model_validate_json(flat[i + 2]),
            )
            for i in range(0, len(flat), 3)
        ]

    def claim_lanes(
        self, lanes: Sequence[LaneSpec], n: int, *, lease_s: float, now: float | None = None
    ) -> list[Claimed]:
        """Claim across lanes by priority: an urgent request never waits behind bulk work."""
        out: list[Claimed] = []
        for spec in sorted(lanes, key=lambda s: -s.priority):
            if len(out) >= n:
                break
            out.extend(self.claim(spec.name, n - len(out), lease_s=lease_s, now=now))
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
                k = self._request_keys(c.id)
                self._scripts["start"](
                    keys=[k["req"], k["leases"], k["counts"]],
                    args=[c.id, c.token, state.value, lease, repr(now), route.value]
                    + [s.value for s in LEASED],
                    client=pipe,
                )
            return [bool(x) for x in pipe.execute()] if claimed else []

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
        self, items: Sequence[tuple[str, str, State, StoredResult]], *, now: float | None = None
    ) -> list[bool]:
        """``finish`` for many (id, token, outcome, result) in one pipelined round trip."""
        now = time.time() if now is None else now
        froms = [s.value for s in (*LEASED, State.SUBMITTED)]
        with store_errors(self.url):
            pipe = self.redis.pipeline(transaction=False)
            for request_id, token, outcome, result in items:
                if outcome not in FINISHED:
                    raise ValueError(f"{outcome} is not an outcome")
                k = self._request_keys(request_id)
                self._scripts["finish"](
                    keys=[
                        k["req"],
                        k["leases"],
                        k["outbox"],
                        k["finished"],
                        k["counts"],
                        k["notify"],
                    ],
                    args=[
                        request_id,
                        token,
                        outcome.value,
                        _dumps(result.stored()),
                        repr(now),
                        self.result_ttl_s,
                        *froms,
                    ],
                    client=pipe,
                )
            return [bool(x) for x in pipe.execute()] if items else []

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

        Returns the new state, or None when the request was no longer ours.
        """
        now = time.time() if now is None else now
        k = self._request_keys(request_id)
        with store_errors(self.url):
            code = self._scripts["requeue"](
                keys=[k["req"], k["leases"], k["q"], k["qage"], k["delayed"], k["counts"]],
                args=[
                    request_id,
                    token,
                    repr(now),
                    repr(ready_at or now),
                    error.model_dump_json(),
                    State.QUEUED.value,
                    State.CLAIMED.value,
                    *[s.value for s in (*LEASED, State.SUBMITTED)],
                ],
            )
        if code == 1:
            return State.QUEUED
        if code == -1:
            with store_errors(self.url):
                attempts = self.redis.hget(k["req"], "attempts")
            final = error.model_copy(
                update={"message": f"{error.message} (gave up after {_s(attempts)} attempts)"}
            )
            ok = self.finish(
                request_id,
                token,
                State.FAILED,
                StoredResult(status_code=error.status_code, error=final),
                now=now,
            )
            return State.FAILED if ok else None
        return None

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
        k = self._request_keys(request_id)
        result = {"error": error.model_dump() if error else None}
        with store_errors(self.url):
            out = self._scripts["drop"](
                keys=[
                    k["req"],
                    k["q"],
                    k["qage"],
                    k["delayed"],
                    k["leases"],
                    k["outbox"],
                    k["finished"],
                    k["counts"],
                    k["notify"],
                ],
                args=[
                    request_id,
                    outcome.value,
                    _dumps(result),
                    repr(now),
                    self.result_ttl_s,
                    *[s.value for s in from_states],
                ],
            )
        if not out:
            return False, None
        return bool(int(out[0])), State(_s(out[1]))

    def cancel(self, request_id: str, *, now: float | None = None) -> State:
        """Cancel unless already finished; returns the state the request is in afterwards."""
        dropped, state = self.drop(
            request_id,
            State.CANCELLED,
            ErrorInfo(code="cancelled", message="cancelled by the caller"),
            from_states=(State.QUEUED, *LEASED, State.SUBMITTED),
            now=now,
        )
        if state is None:
            raise NotFound(request_id)
        return State.CANCELLED if dropped else state

    # -- reading --------------------------------------------------------------------------

    def _hash(self, request_id: str) -> dict[str, str]:
        with store_errors(self.url):
            raw = self.redis.hgetall(self.keys.request(request_id))
        if not raw:
            raise NotFound(request_id)
        return {_s(k): _s(v) for k, v in raw.items()}

    def holders(self, request_ids: Sequence[str]) -> dict[str, tuple[Prepared, State, str]]:
        """Request, state and lease token of many requests in one round trip (gone ones left out)."""
        with store_errors(self.url):
            pipe = self.redis.pipeline(transaction=False)
            for rid in request_ids:
                pipe.hmget(self.keys.request(rid), "data", "state", "lease_token")
            rows = pipe.execute()
        out: dict[str, tuple[Prepared, State, str]] = {}
        for rid, (data, state, token) in zip(request_ids, rows, strict=True):
            if data is not None and state is not None:
                out[rid] = (Prepared.model_validate_json(data), State(_s(state)), _s(token or b""))
        return out

    def prepared(self, request_id: str) -> Prepared:
        return Prepared.model_validate_json(self._hash(request_id)["data"])

    def status(self, request_id: str) -> StatusInfo:
        h = self._hash(request_id)
        err_raw = h.get("last_error") or None
        result = json.loads(h["result"]) if h.get("result") else {}
        if result.get("error"):
            err_raw = _dumps(result["error"])
        return StatusInfo(
            id=request_id,
            state=State(h["state"]),
            outcome=State(h["outcome"]) if h.get("outcome") else None,
            lane=lane_of(request_id),
            tenant=h.get("tenant", "default"),
            custom_id=h.get("custom_id") or None,
            attempts=int(h.get("attempts", 0)),
            max_attempts=int(h.get("max_attempts", 1)),
            deadline=float(h["deadline"]),
            created_at=float(h["created_at"]),
            updated_at=float(h.get("updated_at", h["created_at"])),
            route=Route(h["route"]) if h.get("route") else None,
            error=ErrorInfo.model_validate_json(err_raw) if err_raw else None,
        )

    def result(self, request_id: str) -> Result | None:
        """The result if the request has finished, else None."""
        return self._result_from_hash(request_id, self._hash(request_id))

    def _result_from_hash(self, request_id: str, h: dict[str, str]) -> Result | None:
        if not h.get("outcome"):
            return None
        data = json.loads(h["data"])
        stored = json.loads(h.get("result") or "{}")
        return Result(
            id=request_id,
            custom_id=h.get("custom_id") or None,
            tenant=h.get("tenant", "default"),
            lane=lane_of(request_id),
            status=State(h["outcome"]),
            status_code=stored.get("status_code"),
            body=stored.get("body"),
            error=ErrorInfo.model_validate(stored["error"]) if stored.get("error") else None,
            usage=stored.get("usage"),
            route=Route(h["route"]) if h.get("route") else None,
            provider=stored.get("provider"),
            cost_usd=stored.get("cost_usd"),
            saved_usd=stored.get("saved_usd"),
            model=data.get("model"),
            endpoint=data.get("endpoint"),
            attempts=int(h.get("attempts", 0)),
            deadline=float(h["deadline"]),
            created_at=float(h["created_at"]),
            finished_at=float(h["finished_at"]) if h.get("finished_at") else None,
            delivered=h.get("state") == State.DELIVERED.value,
        )

    def wait(self, request_id: str, timeout_s: float | None = None) -> Result:
        """Block until the request finishes, without polling: BLPOP on its notify list."""
        end = None if timeout_s is None else time.monotonic() + timeout_s
        notify = self.keys.notify(request_id)
        while True:
            res = self.result(request_id)
            if res is not None:
                return res
            left = _WAIT_SLICE_S if end is None else min(_WAIT_SLICE_S, end - time.monotonic())
            if left <= 0:
                raise ResultTimeout(request_id, timeout_s or 0.0, self.status(request_id).state)
            with store_errors(self.url):
                popped = self.redis.blpop([notify], timeout=max(left, 0.01))
                if popped is not None:
                    self.redis.lpush(notify, popped[1])

    def results(self, lane: str, *, since: float = 0.0, limit: int = 10_000) -> list[Result]:
        """Finished requests of a lane, oldest first; entries whose TTL ran out are pruned."""
        key = self.keys.finished(lane)
        with store_errors(self.url):
            ids = [_s(i) for i in self.redis.zrangebyscore(key, since, "+inf", start=0, num=limit)]
            pipe = self.redis.pipeline(transaction=False)
            for rid in ids:
                pipe.hgetall(self.keys.request(rid))
            hashes = pipe.execute()
            out: list[Result] = []
            gone: list[str] = []
            for rid, raw in zip(ids, hashes, strict=True):
                if not raw:
                    gone.append(rid)
                    continue
                res = self._result_from_hash(rid, {_s(k): _s(v) for k, v in raw.items()})
                if res is not None:
                    out.append(res)
            if gone:
                self.redis.zrem(key, *gone)
        return out

    def lane_stats(self, lane: str, *, now: float | None = None) -> LaneStats:
        now = time.time() if now is None else now
        k = self.keys
        with store_errors(self.url):
            pipe = self.redis.pipeline(transaction=False)
            pipe.zcard(k.queue(lane))
            pipe.zcard(k.delayed(lane))
            pipe.zcard(k.leases(lane))
            pipe.zrange(k.queue_age(lane), 0, 0, withscores=True)
            pipe.zrange(k.queue(lane), 0, 0, withscores=True)
            pipe.hgetall(k.counts(lane))
            depth, delayed, leased, oldest, nearest, counts = pipe.execute()
        return LaneStats(
            lane=lane,
            depth=depth,
            delayed=delayed,
            leased=leased,
            oldest_age_s=now - oldest[0][1] if oldest else None,
            nearest_deadline_s=nearest[0][1] - now if nearest else None,
            counts={_s(a): int(b) for a, b in counts.items()},
        )

    def leased_count(self, lanes: Iterable[str]) -> int:
        with store_errors(self.url):
            pipe = self.redis.pipeline(transaction=False)
            for lane in lanes:
                pipe.zcard(self.keys.leases(lane))
            return sum(pipe.execute())

    def beat(self, now: float, role: str = "sweep") -> None:
        """Record that a periodic task ran, for ``mixbatch health``."""
        with store_errors(self.url):
            self.redis.set(self.keys.heartbeat(role), repr(now), ex=3600)

    def last_beat(self, role: str = "sweep") -> float | None:
        with store_errors(self.url):
            raw = self.redis.get(self.keys.heartbeat(role))
        return float(raw) if raw is not None else None

    # -- sweeping -------------------------------------------------------------------------

    def expired_leases(self, lane: str, now: float, limit: int = 1000) -> list[str]:
        with store_errors(self.url):
            raw = self.redis.zrangebyscore(self.keys.leases(lane), "-inf", now, start=0, num=limit)
        return [_s(r) for r in raw]

    def overdue_queued(self, lane: str, now: float, limit: int = 1000) -> list[str]:
        with store_errors(self.url):
            raw = self.redis.zrangebyscore(self.keys.queue(lane), "-inf", now, start=0, num=limit)
        return [_s(r) for r in raw]

    def due_deliveries(self, lane: str, now: float, limit: int = 1000) -> list[str]:
        with store_errors(self.url):
            raw = self.redis.zrangebyscore(self.keys.outbox(lane), "-inf", now, start=0, num=limit)
        return [_s(r) for r in raw]

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
                k = self._request_keys(rid)
                self._scripts["deliver_claim"](
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
                k = self._request_keys(rid)
                self._scripts["deliver_done"](
                    keys=[k["req"], k["outbox"], k["counts"]],
                    args=[rid, repr(now), self.result_ttl_s, State.DELIVERED.value, ""],
                    client=pipe,
                )
            return [bool(x) for x in pipe.execute()] if request_ids else []

    def finished_many(self, request_ids: Sequence[str]) -> dict[str, tuple[Prepared, Result]]:
        """Request and result of many finished requests, one round trip (others left out)."""
        with store_errors(self.url):
            pipe = self.redis.pipeline(transaction=False)
            for rid in request_ids:
                pipe.hgetall(self.keys.request(rid))
            rows = pipe.execute() if request_ids else []
        out: dict[str, tuple[Prepared, Result]] = {}
        for rid, raw in zip(request_ids, rows, strict=True):
            h = {_s(k): _s(v) for k, v in raw.items()}
            if not h:
                continue
            res = self._result_from_hash(rid, h)
            if res is not None:
                out[rid] = (Prepared.model_validate_json(h["data"]), res)
        return out

    def dead_letter(self, request_id: str, error: ErrorInfo, *, now: float | None = None) -> bool:
        """Give up on delivery: out of the outbox, into the dead-letter list with its last error."""
        now = time.time() if now is None else now
        entry = {
            "id": request_id,
            "lane": lane_of(request_id),
            "at": now,
            "error": error.model_dump(),
        }
        if not self._deliver_done(request_id, "", error.model_dump_json(), now):
            return False
        with store_errors(self.url):
            self.redis.hset(self.keys.dead_letters(), request_id, _dumps(entry))
        return True

    def _deliver_done(self, request_id: str, state: str, error: str, now: float | None) -> bool:
        now = time.time() if now is None else now
        k = self._request_keys(request_id)
        with store_errors(self.url):
            out = self._scripts["deliver_done"](
                keys=[k["req"], k["outbox"], k["counts"]],
                args=[request_id, repr(now), self.result_ttl_s, state, error],
            )
        return bool(out)

    def retry_delivery(self, request_id: str, error: ErrorInfo, *, due_at: float) -> None:
        script = (
            "if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('ZREM', KEYS[2], ARGV[1]) return 0 end "
            "redis.call('HSET', KEYS[1], 'delivery_error', ARGV[2]) "
            "return redis.call('ZADD', KEYS[2], 'XX', ARGV[3], ARGV[1])"
        )
        k = self._request_keys(request_id)
        with store_errors(self.url):
            self.redis.eval(
                script, 2, k["req"], k["outbox"], request_id, error.model_dump_json(), repr(due_at)
            )

    def dead_letters(self) -> list[dict[str, Any]]:
        with store_errors(self.url):
            raw = self.redis.hgetall(self.keys.dead_letters())
        return sorted((json.loads(v) for v in raw.values()), key=lambda e: e["at"])
