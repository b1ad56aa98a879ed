"""The durable batch registry: pending groups waiting to fill up, and provider batches in flight.

A request routed to a provider batch is first *staged* in its group (provider, endpoint, model)
with its lease token, then marked SUBMITTED in its lane. At flush time the group's members are
*taken*, written to JSONL, and the batch is recorded as an **intent** before the provider's
``create``; the provider's batch id is recorded the moment it returns. An intent that never got
an id (a crash between create and record) is reconciled by listing the provider's batches for
our metadata tag and adopting the orphan, never by submitting twice.

All registry keys share the hash tag ``{batches}``; request transitions stay in their lanes'
slots (see ``routing.keys``), so every step is atomic in its own slot and idempotent across.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Literal

import redis
from pydantic import BaseModel, Field

from routing.errors import NotFound
from routing.keys import Keys
from routing.store.base import store_errors
from routing.store.scripts import Scripts

BatchState = Literal["intent", "submitted", "collecting", "done", "failed", "cancelled"]


class Member(BaseModel):
    """One requester of a batch line: the request, its lease token and its deadline."""

    id: str
    token: str
    deadline: float


class BatchRecord(BaseModel):
    key: str
    provider: str
    protocol: Literal["openai", "anthropic"]
    endpoint: str
    model: str
    state: BatchState = "intent"
    batch_id: str | None = None
    created_at: float
    submitted_at: float | None = None
    finished_at: float | None = None
    lines: int
    lanes: list[str] = Field(default_factory=list)
    #: line custom_id -> every request answered by that line (dedupe fans out)
    members: dict[str, list[Member]]
    #: the order lines were written, so a provider's line numbers map back to custom_ids
    order: list[str]
    last_status: str | None = None
    polls: int = 0
    note: str | None = None

    def requests(self) -> list[Member]:
        return [m for group in self.members.values() for m in group]

    @property
    def tightest_deadline(self) -> float:
        return min((m.deadline for m in self.requests()), default=float("inf"))


def group_id(provider: str, endpoint: str, model: str) -> str:
    return f"{provider}|{endpoint}|{model}"


def split_group_id(gid: str) -> tuple[str, str, str]:
    provider, endpoint, model = gid.split("|", 2)
    return provider, endpoint, model


class GroupInfo(BaseModel):
    gid: str
    count: int
    bytes: int
    first_at: float
    tightest_deadline: float


class BatchRegistry:
    def __init__(self, client: redis.Redis, *, namespace: str = "mb", url: str = "redis") -> None:
        self.redis = client
        self.url = url
        self.keys = Keys(namespace)
        self._scripts = Scripts(client)

    # -- pending groups -------------------------------------------------------------------

    def stage(
        self, gid: str, members: Iterable[Member], line_bytes: Iterable[int], now: float
    ) -> None:
        """Add claimed requests to their group before they are marked SUBMITTED in the lane."""
        members = list(members)
        sizes = list(line_bytes)
        if not members:
            return
        with store_errors(self.url):
            pipe = self.redis.pipeline(transaction=True)
            pipe.zadd(self.keys.batch_group(gid), {m.id: m.deadline for m in members})
            pipe.hset(self.keys.batch_group(gid, "tok"), mapping={m.id: m.token for m in members})
            pipe.hset(
                self.keys.batch_group(gid, "size"),
                mapping=dict(zip((m.id for m in members), sizes, strict=True)),
            )
            pipe.hsetnx(self.keys.batch_group(gid, "meta"), "first_at", repr(now))
            pipe.sadd(self.keys.batches("groups"), gid)
            pipe.execute()

    def groups(self) -> list[GroupInfo]:
        with store_errors(self.url):
            gids = sorted(g.decode() for g in self.redis.smembers(self.keys.batches("groups")))
            pipe = self.redis.pipeline(transaction=False)
            for gid in gids:
                pipe.zcard(self.keys.batch_group(gid))
                pipe.hvals(self.keys.batch_group(gid, "size"))
                pipe.hget(self.keys.batch_group(gid, "meta"), "first_at")
                pipe.zrange(self.keys.batch_group(gid), 0, 0, withscores=True)
            raw = pipe.execute()
        out = []
        for i, gid in enumerate(gids):
            count, sizes, first_at, head = raw[4 * i : 4 * i + 4]
            if not count:
                continue
            out.append(
                GroupInfo(
                    gid=gid,
                    count=count,
                    bytes=sum(int(s) for s in sizes),
                    first_at=float(first_at or time.time()),
                    tightest_deadline=head[0][1] if head else float("inf"),
                )
            )
        return out

    def take(self, gid: str, n: int) -> list[tuple[str, str]]:
        """Up to ``n`` staged (id, token) pairs, earliest deadline first, removed atomically."""
        keys = [
            self.keys.batch_group(gid),
            self.keys.batch_group(gid, "tok"),
            self.keys.batch_group(gid, "size"),
            self.keys.batch_group(gid, "meta"),
            self.keys.batches("groups"),
        ]
        with store_errors(self.url):
            flat = self._scripts["batch_take"](keys=keys, args=[n, gid])
        return [(flat[i].decode(), flat[i + 1].decode()) for i in range(0, len(flat), 2)]

    def last_window(self, gid: str) -> float | None:
        """When a submit window last flushed this group (so a window fires once)."""
        with store_errors(self.url):
            raw = self.redis.hget(self.keys.batches("windows"), gid)
        return float(raw) if raw else None

    def mark_window(self, gid: str, now: float) -> None:
        with store_errors(self.url):
            self.redis.hset(self.keys.batches("windows"), gid, repr(now))

    # -- batches --------------------------------------------------------------------------

    def record_intent(self, record: BatchRecord) -> None:
        with store_errors(self.url):
            pipe = self.redis.pipeline(transaction=True)
            pipe.set(self.keys.batch(record.key), record.model_dump_json())
            pipe.zadd(self.keys.batches("intents"), {record.key: record.created_at})
            pipe.execute()

    def record_submitted(
        self, record: BatchRecord, batch_id: str, now: float, first_poll_at: float
    ) -> None:
        """The provider's id, recorded the moment ``create`` returns."""
        record.batch_id = batch_id
        record.state = "submitted"
        record.submitted_at = now
        with store_errors(self.url):
            pipe = self.redis.pipeline(transaction=True)
            pipe.set(self.keys.batch(record.key), record.model_dump_json())
            pipe.zrem(self.keys.batches("intents"), record.key)
            pipe.zadd(self.keys.batches("inflight"), {record.key: first_poll_at})
            pipe.hset(self.keys.batches("byid"), batch_id, record.key)
            pipe.execute()

    def save(self, record: BatchRecord) -> None:
        with store_errors(self.url):
            self.redis.set(self.keys.batch(record.key), record.model_dump_json())

    def get(self, key: str) -> BatchRecord:
        with store_errors(self.url):
            raw = self.redis.get(self.keys.batch(key))
        if raw is None:
            raise NotFound(key)
        return BatchRecord.model_validate_json(raw)

    def known_batch_ids(self) -> list[str]:
        """Provider batch ids already recorded (an orphan search must not adopt them)."""
        with store_errors(self.url):
            return [r.decode() for r in self.redis.hkeys(self.keys.batches("byid"))]

    def stale_intents(self, older_than: float) -> list[str]:
        with store_errors(self.url):
            raw = self.redis.zrangebyscore(self.keys.batches("intents"), "-inf", older_than)
        return [r.decode() for r in raw]

    def due(self, now: float, limit: int = 100) -> list[str]:
        with store_errors(self.url):
            raw = self.redis.zrangebyscore(
                self.keys.batches("inflight"), "-inf", now, start=0, num=limit
            )
        return [r.decode() for r in raw]

    def inflight(self) -> list[str]:
        with store_errors(self.url):
            return [r.decode() for r in self.redis.zrange(self.keys.batches("inflight"), 0, -1)]

    def schedule_poll(self, key: str, at: float) -> None:
        with store_errors(self.url):
            self.redis.zadd(self.keys.batches("inflight"), {key: at}, xx=True)

    def claim_collect(self, key: str, lease_s: float, now: float) -> bool:
        """One collector at a time: push the next poll past the collection's lease."""
        with store_errors(self.url):
            score = self.redis.zscore(self.keys.batches("inflight"), key)
            if score is None:
                return False
            return bool(
                self.redis.zadd(
                    self.keys.batches("inflight"), {key: now + lease_s}, xx=True, ch=True
                )
            )

    def finish(
        self, record: BatchRecord, state: BatchState, now: float, note: str | None = None
    ) -> None:
        record.state = state
        record.finished_at = now
        record.note = note
        with store_errors(self.url):
            pipe = self.redis.pipeline(transaction=True)
            pipe.set(self.keys.batch(record.key), record.model_dump_json(), ex=14 * 86400)
            pipe.zrem(self.keys.batches("inflight"), record.key)
            pipe.zrem(self.keys.batches("intents"), record.key)
            pipe.execute()

    def counts(self) -> dict[str, int]:
        with store_errors(self.url):
            pipe = self.redis.pipeline(transaction=False)
            pipe.zcard(self.keys.batches("inflight"))
            pipe.zcard(self.keys.batches("intents"))
            inflight, intents = pipe.execute()
        return {"inflight": inflight, "intents": intents}
