"""The durable batch registry: pending groups waiting to fill up, and provider batches in flight.

A request routed to a provider batch is first *staged* in its group (provider, endpoint, model)
with its lease token, then marked SUBMITTED in its lane. At flush time the group's members are
*taken* into a durable take record (one script), then planned into batches; each batch is
recorded as an **intent** before the provider's ``create``, in the same script that releases its
members from the take, and the provider's batch id is recorded the moment it returns. So every
taken request is referenced by a take, an intent or a batch in flight at every moment.

Takes and intents are scored by their worker's last beat (renewed while it works on them). One
whose worker stopped beating is *reaped* by the poller (moved to the ``reaping`` index under the
reconciler's own beat): a take's members are requeued; an intent is adopted when a batch with
our metadata tag and its custom_ids exists, else its members are requeued. Recording is fenced
on those indexes, so a worker taken for dead and its reconciler never both decide a batch.

All registry keys share the hash tag ``{batches}``; request transitions stay in their lanes'
slots (see ``routing.keys``), so every step is atomic in its own slot and idempotent across.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable
from typing import Literal

import redis
from pydantic import BaseModel, Field, PrivateAttr

from routing.errors import NotFound
from routing.keys import BatchIndex, Keys
from routing.store.base import store_errors
from routing.store.scripts import Scripts

BatchState = Literal["intent", "submitted", "collecting", "done", "failed", "cancelled"]
#: Who records a provider id: the worker that created the batch, or a reconciler adopting it.
Recorder = Literal["worker", "reaper"]
#: How long a closed batch record is kept (``mixbatch`` views and ``explain`` read it).
CLOSED_TTL_S = 14 * 86400
#: How long after its creation a closed batch's provider id stays in ``byid``. An orphan search
#: only looks at batches created a few minutes before its intent (the engine's
#: ``ORPHAN_LOOKBACK_S``), so a day covers it many times over; the ids of older batches are
#: forgotten, unless a live intent older still could look at them.
BYID_KEEP_S = 86400.0
#: The most provider ids one close forgets (the rest go with the next closes).
BYID_TRIM_LIMIT = 1000


class Member(BaseModel):
    """One requester of a batch line: the request, its lease token and its deadline."""

    id: str
    token: str
    deadline: float


class BatchRecord(BaseModel):
    key: str
    provider: str
    protocol: Literal["openai", "anthropic", "gemini", "bedrock", "mistral"]
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
    #: SHA-1 of the stored text this record was read from, so a save can be fenced on it
    _digest: str | None = PrivateAttr(default=None)

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

    def take(self, gid: str, n: int, take_id: str, now: float) -> list[tuple[str, str]]:
        """Up to ``n`` staged (id, token) pairs, earliest deadline first, moved atomically from
        the group into the take ``take_id`` (which the caller beats while it submits them)."""
        keys = [
            self.keys.batch_group(gid),
            self.keys.batch_group(gid, "tok"),
            self.keys.batch_group(gid, "size"),
            self.keys.batch_group(gid, "meta"),
            self.keys.batches("groups"),
            self.keys.batch_take(take_id),
            self.keys.batches("takes"),
        ]
        with store_errors(self.url):
            flat = self._scripts["batch_take"](keys=keys, args=[n, gid, take_id, repr(now)])
        return [(flat[i].decode(), flat[i + 1].decode()) for i in range(0, len(flat), 2)]

    def close_take(self, take_id: str) -> bool:
        """Forget a take whose members all went somewhere; False when it was reaped meanwhile."""
        keys = [self.keys.batch_take(take_id), self.keys.batches("takes")]
        with store_errors(self.url):
            return bool(self._scripts["batch_take_close"](keys=keys, args=[take_id]))

    def take_members(self, take_id: str) -> dict[str, str]:
        """Request id -> lease token of the members a take still holds."""
        with store_errors(self.url):
            raw = self.redis.hgetall(self.keys.batch_take(take_id))
        return {k.decode(): v.decode() for k, v in raw.items()}

    def drop_reaped_take(self, take_id: str) -> None:
        """A reaped take whose members were requeued: nothing refers to it any more."""
        with store_errors(self.url):
            pipe = self.redis.pipeline(transaction=True)
            pipe.delete(self.keys.batch_take(take_id))
            pipe.zrem(self.keys.batches("reaping"), f"take:{take_id}")
            pipe.execute()

    def last_window(self, gid: str) -> float | None:
        """When a submit window last flushed this group (so a window fires once)."""
        with store_errors(self.url):
            raw = self.redis.hget(self.keys.batches("windows"), gid)
        return float(raw) if raw else None

    def mark_window(self, gid: str, now: float) -> None:
        with store_errors(self.url):
            self.redis.hset(self.keys.batches("windows"), gid, repr(now))

    # -- batches --------------------------------------------------------------------------

    def record_intent(self, record: BatchRecord, take_id: str = "") -> bool:
        """Store the intent, scored by ``record.created_at`` (its worker's first beat), and
        release its members from ``take_id``; False when that take was reaped meanwhile."""
        keys = [
            self.keys.batch(record.key),
            self.keys.batches("intents"),
            self.keys.batch_take(take_id or "-"),
            self.keys.batches("takes"),
        ]
        ids = [m.id for m in record.requests()]
        args = [record.key, record.model_dump_json(), repr(record.created_at), take_id, *ids]
        with store_errors(self.url):
            return bool(self._scripts["batch_intent"](keys=keys, args=args))

    def record_submitted(
        self,
        record: BatchRecord,
        batch_id: str,
        now: float,
        first_poll_at: float,
        by: Recorder = "worker",
    ) -> bool:
        """The provider's id, recorded the moment ``create`` returns (or an orphan is adopted).

        Refused (False) when ``by`` no longer holds the intent: a worker whose intent was
        reaped, or a reconciler whose reaped intent another one settled.
        """
        done = record.model_copy(
            update={"batch_id": batch_id, "state": "submitted", "submitted_at": now}
        )
        keys = [
            self.keys.batch(record.key),
            self.keys.batches("intents"),
            self.keys.batches("reaping"),
            self.keys.batches("inflight"),
            self.keys.batches("byid"),
        ]
        args = [record.key, by, done.model_dump_json(), batch_id, repr(first_poll_at)]
        with store_errors(self.url):
            ok = bool(self._scripts["batch_submitted"](keys=keys, args=args))
        if ok:
            record.batch_id, record.state, record.submitted_at = batch_id, "submitted", now
        return ok

    def save(self, record: BatchRecord) -> bool:
        """Write back a record read with ``get``, unless it was written since (then False)."""
        if record._digest is None:
            raise ValueError(f"batch {record.key}: save takes a record read with get()")
        text = record.model_dump_json()
        with store_errors(self.url):
            ok = bool(
                self._scripts["batch_save"](
                    keys=[self.keys.batch(record.key)], args=[record._digest, text]
                )
            )
        if ok:
            record._digest = hashlib.sha1(text.encode()).hexdigest()
        return ok

    def get(self, key: str) -> BatchRecord:
        with store_errors(self.url):
            raw = self.redis.get(self.keys.batch(key))
        if raw is None:
            raise NotFound(key)
        record = BatchRecord.model_validate_json(raw)
        record._digest = hashlib.sha1(raw).hexdigest()
        return record

    def known_batch_ids(self) -> list[str]:
        """Provider batch ids already recorded (an orphan search must not adopt them)."""
        with store_errors(self.url):
            return [r.decode() for r in self.redis.hkeys(self.keys.batches("byid"))]

    def stale_intents(self, older_than: float) -> list[str]:
        """Intents whose worker (or reconciler) has not beaten since ``older_than``."""
        return self._stale("intents", "intent", older_than)

    def stale_takes(self, older_than: float) -> list[str]:
        """Takes whose worker (or reconciler) has not beaten since ``older_than``."""
        return self._stale("takes", "take", older_than)

    def _stale(self, index: Literal["intents", "takes"], kind: str, older_than: float) -> list[str]:
        with store_errors(self.url):
            pipe = self.redis.pipeline(transaction=False)
            pipe.zrangebyscore(self.keys.batches(index), "-inf", older_than)
            pipe.zrangebyscore(self.keys.batches("reaping"), "-inf", older_than)
            live, reaping = pipe.execute()
        prefix = f"{kind}:"
        names = [r.decode() for r in live]
        return names + [r.decode()[len(prefix) :] for r in reaping if r.decode().startswith(prefix)]

    def reap(
        self, kind: Literal["intent", "take"], name: str, older_than: float, now: float
    ) -> bool:
        """Claim a stale intent or take for this reconciler; False when its worker is alive
        (it beat since ``older_than``), another reconciler holds it, or it is gone."""
        index = self.keys.batches("intents" if kind == "intent" else "takes")
        keys = [index, self.keys.batches("reaping")]
        args = [name, f"{kind}:{name}", repr(older_than), repr(now)]
        with store_errors(self.url):
            return bool(self._scripts["batch_reap"](keys=keys, args=args))

    def beat(
        self,
        now: float,
        *,
        takes: Iterable[str] = (),
        intents: Iterable[str] = (),
        reaping: Iterable[str] = (),
    ) -> None:
        """Renew the beat of what this process works on; something reaped is not revived."""
        live: dict[BatchIndex, list[str]] = {
            "takes": list(takes),
            "intents": list(intents),
            "reaping": list(reaping),
        }
        if not any(live.values()):
            return
        with store_errors(self.url):
            pipe = self.redis.pipeline(transaction=True)
            for index, names in live.items():
                if names:
                    pipe.zadd(self.keys.batches(index), dict.fromkeys(names, now), xx=True)
            pipe.execute()

    def abandon(self, record: BatchRecord, now: float, note: str) -> bool:
        """Close a reaped intent never created (its members requeued first); False when another
        reconciler settled it meanwhile."""
        closed = record.model_copy(update={"state": "failed", "finished_at": now, "note": note})
        keys = [
            self.keys.batch(record.key),
            self.keys.batches("reaping"),
            self.keys.batches("intents"),
        ]
        args = [record.key, closed.model_dump_json(), CLOSED_TTL_S]
        with store_errors(self.url):
            return bool(self._scripts["batch_abandon"](keys=keys, args=args))

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
        """One collector at a time: a due batch's next look is pushed past the lease, in one
        script, so a second collector finds it not due."""
        with store_errors(self.url):
            return bool(
                self._scripts["batch_claim_collect"](
                    keys=[self.keys.batches("inflight")], args=[key, repr(now), repr(now + lease_s)]
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
            pipe.set(self.keys.batch(record.key), record.model_dump_json(), ex=CLOSED_TTL_S)
            pipe.zrem(self.keys.batches("inflight"), record.key)
            pipe.zrem(self.keys.batches("intents"), record.key)
            pipe.zrem(self.keys.batches("reaping"), f"intent:{record.key}")
            pipe.execute()
        self.trim_byid(now, closed=record)

    def trim_byid(self, now: float, closed: BatchRecord | None = None) -> int:
        """Forget the provider ids of batches created more than ``BYID_KEEP_S`` before ``now``
        and before the oldest live intent, once closed (``closed``: the batch closing now), so
        ``byid`` does not grow with every batch ever made. An orphan search never looks that
        far back, so an id it must exclude (``known_batch_ids``) is never forgotten. Returns
        how many ids were forgotten."""
        created = 0.0
        if closed is not None:
            created = closed.submitted_at or closed.created_at
        cutoff = min(now, self._oldest_intent(default=now)) - BYID_KEEP_S
        keys = [self.keys.batches("byid"), self.keys.batches("byid_closed")]
        batch_id = closed.batch_id if closed is not None and closed.batch_id else ""
        args = [batch_id, repr(created), repr(cutoff), BYID_TRIM_LIMIT]
        with store_errors(self.url):
            return int(self._scripts["batch_byid_trim"](keys=keys, args=args))

    def _oldest_intent(self, default: float) -> float:
        """When the oldest intent still live (or being reaped) was created: its orphan search
        reaches back from there. A record that cannot be read counts as the oldest possible,
        so nothing is forgotten on a guess."""
        with store_errors(self.url):
            pipe = self.redis.pipeline(transaction=False)
            pipe.zrange(self.keys.batches("intents"), 0, -1)
            pipe.zrange(self.keys.batches("reaping"), 0, -1)
            live, reaping = pipe.execute()
            names = [n.decode() for n in live]
            names += [
                n.decode().removeprefix("intent:") for n in reaping if n.startswith(b"intent:")
            ]
            raws = self.redis.mget([self.keys.batch(n) for n in names]) if names else []
        created = [default]
        for raw in raws:
            try:
                created.append(float(json.loads(raw)["created_at"]) if raw else default)
            except (ValueError, TypeError, KeyError):
                created.append(0.0)
        return min(created)

    def counts(self) -> dict[str, int]:
        with store_errors(self.url):
            pipe = self.redis.pipeline(transaction=False)
            pipe.zcard(self.keys.batches("inflight"))
            pipe.zcard(self.keys.batches("intents"))
            pipe.zcard(self.keys.batches("takes"))
            pipe.zcard(self.keys.batches("reaping"))
            inflight, intents, takes, reaping = pipe.execute()
        return {"inflight": inflight, "intents": intents, "takes": takes, "reaping": reaping}
