"""Reading requests and lanes: state, results, waiting for one, counters.

Part of ``LaneStore`` (``routing.store.lanes``). Reads run no script: a request hash is read
whole, or the fields asked for, in one pipelined round trip per call.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from pydantic import TypeAdapter, ValidationError

from routing.callbacks import CallbackSpec
from routing.errors import NotFound, ResultTimeout
from routing.keys import lane_of, shard_of
from routing.models import ErrorInfo, LaneStats, Prepared, Result, Route, StatusInfo
from routing.states import State
from routing.store.base import StoreBase, decode, dumps, store_errors

#: Below redis-py's default socket timeout (5 s), so a BLPOP never trips it.
_WAIT_SLICE_S = 2.0


def wait_slice_s(end: float | None) -> float:
    """How long the next BLPOP of a wait may block: a slice under redis-py's socket timeout,
    cut to what is left before ``end`` (monotonic; None waits for ever). Shared by the sync
    store and the async client so both wait the same way."""
    return _WAIT_SLICE_S if end is None else min(_WAIT_SLICE_S, end - time.monotonic())


_CALLBACK: TypeAdapter[Any] = TypeAdapter(CallbackSpec | None)


def _number(h: dict[str, str], field: str, default: float = 0.0) -> float:
    """A stored number, or ``default`` where an older version or a hand edit left none."""
    try:
        value = float(h[field])
    except (KeyError, ValueError):
        return default
    return value if math.isfinite(value) else default


def _object(raw: str | None) -> dict[str, Any]:
    """Stored JSON that should be an object; ``{}`` when it is not (never a read that raises)."""
    try:
        value = json.loads(raw or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _for_delivery(data: str) -> Prepared:
    """The stored request a delivery needs. One that no longer validates (failed at its claim as
    ``invalid_stored_request``) still carries its callback when that part reads, so its failure
    reaches the caller's sink; otherwise it has none, and waits in the result store."""
    try:
        return Prepared.model_validate_json(data)
    except ValidationError:
        pass
    try:
        callback = _CALLBACK.validate_python(_object(data).get("callback"))
    except ValidationError:
        callback = None
    return Prepared.model_construct(callback=callback)


class Holder(NamedTuple):
    """Who holds a request now: the request, its state and its lease token ('' when none)."""

    request: Prepared
    state: State
    token: str


class ReadOps(StoreBase):
    """Everything that reads a request or a lane without changing it (``results`` prunes)."""

    def _hash(self, request_id: str) -> dict[str, str]:
        with store_errors(self.url):
            raw = self.redis.hgetall(self.keys.request(request_id))
        if not raw:
            raise NotFound(request_id)
        return {decode(k): decode(v) for k, v in raw.items()}

    def holders(self, request_ids: Sequence[str]) -> dict[str, Holder]:
        """Request, state and lease token of many requests in one round trip.

        Gone ones are left out, and so are unreadable ones (an older version's, a hand edit's):
        their lease runs out and their next claim fails them alone, with the reason.
        """
        with store_errors(self.url):
            pipe = self.redis.pipeline(transaction=False)
            for rid in request_ids:
                pipe.hmget(self.keys.request(rid), "data", "state", "lease_token")
            rows = pipe.execute()
        out: dict[str, Holder] = {}
        for rid, (data, state, token) in zip(request_ids, rows, strict=True):
            if data is None or state is None:
                continue
            try:
                holder = Holder(
                    Prepared.model_validate_json(data), State(decode(state)), decode(token or b"")
                )
            except ValueError:  # pydantic's ValidationError is one
                continue
            out[rid] = holder
        return out

    def prepared(self, request_id: str) -> Prepared:
        return Prepared.model_validate_json(self._hash(request_id)["data"])

    def status(self, request_id: str) -> StatusInfo:
        h = self._hash(request_id)
        err_raw = h.get("last_error") or None
        result = _object(h.get("result"))
        if result.get("error"):
            err_raw = dumps(result["error"])
        return StatusInfo(
            id=request_id,
            state=State(h["state"]),
            outcome=State(h["outcome"]) if h.get("outcome") else None,
            lane=lane_of(request_id),
            tenant=h.get("tenant", "default"),
            custom_id=h.get("custom_id") or None,
            attempts=int(_number(h, "attempts")),
            max_attempts=int(_number(h, "max_attempts", 1)),
            deadline=_number(h, "deadline"),
            created_at=_number(h, "created_at"),
            updated_at=_number(h, "updated_at", _number(h, "created_at")),
            route=Route(h["route"]) if h.get("route") else None,
            error=ErrorInfo.model_validate_json(err_raw) if err_raw else None,
        )

    def result(self, request_id: str) -> Result | None:
        """The result if the request has finished, else None."""
        return self._result_from_hash(request_id, self._hash(request_id))

    def _result_from_hash(self, request_id: str, h: dict[str, str]) -> Result | None:
        if not h.get("outcome"):
            return None
        data = _object(h.get("data"))
        stored = _object(h.get("result"))
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
            service_tier=stored.get("service_tier"),
            model=data.get("model"),
            endpoint=data.get("endpoint"),
            attempts=int(_number(h, "attempts")),
            deadline=_number(h, "deadline"),
            created_at=_number(h, "created_at"),
            finished_at=_number(h, "finished_at") if h.get("finished_at") else None,
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
            left = wait_slice_s(end)
            if left <= 0:
                raise ResultTimeout(request_id, timeout_s or 0.0, self.status(request_id).state)
            with store_errors(self.url):
                popped = self.redis.blpop([notify], timeout=max(left, 0.01))
                if popped is not None:
                    self.redis.lpush(notify, popped[1])

    def results(self, lane: str, *, since: float = 0.0, limit: int = 10_000) -> list[Result]:
        """Finished requests of a lane (all its shards), oldest first; entries whose TTL ran
        out are pruned."""
        k = self.keys
        with store_errors(self.url):
            pipe = self.redis.pipeline(transaction=False)
            for shard in self.shards(lane):
                pipe.zrangebyscore(
                    k.finished(lane, shard), since, "+inf", 0, limit, withscores=True
                )
            found = sorted((score, decode(rid)) for rows in pipe.execute() for rid, score in rows)[
                :limit
            ]
            ids = [rid for _, rid in found]
            pipe = self.redis.pipeline(transaction=False)
            for rid in ids:
                pipe.hgetall(k.request(rid))
            hashes = pipe.execute()
            out: list[Result] = []
            pipe = self.redis.pipeline(transaction=False)
            for rid, raw in zip(ids, hashes, strict=True):
                if not raw:
                    pipe.zrem(k.finished(lane, shard_of(rid)), rid)
                    continue
                res = self._result_from_hash(rid, {decode(f): decode(v) for f, v in raw.items()})
                if res is not None:
                    out.append(res)
            pipe.execute()
        return out

    def lane_stats(self, lane: str, *, now: float | None = None) -> LaneStats:
        """A lane's depth, leases, oldest and nearest request and counts, summed over its shards."""
        now = time.time() if now is None else now
        k = self.keys
        shards = self.shards(lane)
        with store_errors(self.url):
            pipe = self.redis.pipeline(transaction=False)
            for s in shards:
                pipe.zcard(k.queue(lane, s))
                pipe.zcard(k.delayed(lane, s))
                pipe.zcard(k.leases(lane, s))
                pipe.zrange(k.queue_age(lane, s), 0, 0, withscores=True)
                pipe.zrange(k.queue(lane, s), 0, 0, withscores=True)
                pipe.hgetall(k.counts(lane, s))
            replies = pipe.execute()
        parts = [replies[6 * n : 6 * n + 6] for n in range(len(shards))]
        oldest = min((p[3][0][1] for p in parts if p[3]), default=None)
        nearest = min((p[4][0][1] for p in parts if p[4]), default=None)
        counts: dict[str, int] = {}
        for p in parts:
            for name, value in p[5].items():
                counts[decode(name)] = counts.get(decode(name), 0) + int(value)
        return LaneStats(
            lane=lane,
            depth=sum(p[0] for p in parts),
            delayed=sum(p[1] for p in parts),
            leased=sum(p[2] for p in parts),
            oldest_age_s=now - oldest if oldest is not None else None,
            nearest_deadline_s=nearest - now if nearest is not None else None,
            counts=counts,
        )

    def leased_count(self, lanes: Iterable[str]) -> int:
        with store_errors(self.url):
            pipe = self.redis.pipeline(transaction=False)
            for lane in lanes:
                for shard in self.shards(lane):
                    pipe.zcard(self.keys.leases(lane, shard))
            return sum(pipe.execute())

    def queued_ids(self, lane: str) -> list[str]:
        """Every request waiting in the lane's queues or delayed sets (a retry's backoff)."""
        k = self.keys
        with store_errors(self.url):
            pipe = self.redis.pipeline(transaction=False)
            for shard in self.shards(lane):
                pipe.zrange(k.queue(lane, shard), 0, -1)
                pipe.zrange(k.delayed(lane, shard), 0, -1)
            return [decode(m) for members in pipe.execute() for m in members]

    def finished_many(self, request_ids: Sequence[str]) -> dict[str, tuple[Prepared, Result]]:
        """Request and result of many finished requests, one round trip (others left out)."""
        with store_errors(self.url):
            pipe = self.redis.pipeline(transaction=False)
            for rid in request_ids:
                pipe.hgetall(self.keys.request(rid))
            rows = pipe.execute() if request_ids else []
        out: dict[str, tuple[Prepared, Result]] = {}
        for rid, raw in zip(request_ids, rows, strict=True):
            h = {decode(k): decode(v) for k, v in raw.items()}
            if not h:
                continue
            res = self._result_from_hash(rid, h)
            if res is not None:
                out[rid] = (_for_delivery(h.get("data", "")), res)
        return out
