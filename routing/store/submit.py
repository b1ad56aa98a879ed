"""Submitting requests: idempotency by custom_id, then creation, pipelined, one lane per script.

Part of ``LaneStore`` (``routing.store.lanes``); the scripts are ``claim_ids``, ``submit_many``,
``submit_one`` and ``release_idempotency`` in ``routing/lua/``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Sequence
from typing import Any

from routing.errors import InvalidRequest, LaneFull
from routing.keys import lane_of, new_request_id, new_request_ids, shard_of
from routing.models import LaneSpec, Prepared, ServiceConfig, Ticket, trusted
from routing.states import State
from routing.store.base import StoreBase, decode, dumps, store_errors
from routing.store.connect import NO_WAIT, Replication

try:  # optional: the ``fast`` extra
    from orjson import dumps as _fast_dumps
except ImportError:  # pragma: no cover - exercised where orjson is not installed
    _fast_dumps = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

#: A custom_id claimed this long ago whose request never appeared: its submitter died.
TAKEOVER_S = 30.0
#: Requests per Lua call in bulk submit: long enough to amortise, short enough not to stall Redis.
_SCRIPT_CHUNK = 1000
#: A custom_id is remembered until its request's result expires, counting from its deadline,
#: but never counting more than this wait: a far deadline must not keep a key for a year.
IDEMPOTENCY_WAIT_MAX_S = 28 * 86400
#: And a little past that, for a request answered after its deadline.
IDEMPOTENCY_SLACK_S = 3600


class SubmitOps(StoreBase):
    """Enqueueing: a request is durable once these return."""

    replication: Replication = NO_WAIT  # routing.store.connect: replicas acknowledge, or raise

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
        for i, p in enumerate(items):
            _check_numbers(p, i)
        self.learn_lanes(lanes.lanes)
        shards = {spec.name: spec.shards for spec in lanes.lanes}
        ids = new_request_ids(
            [(p.lane, shards.get(p.lane) or lanes.lane(p.lane).shards) for p in items], now
        )
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
            self.replication.confirm(self.redis, [key for _, _, _, key in outcomes])
        full: dict[str, list[int]] = {}
        for i, code, lane, _ in outcomes:
            if code == -2:
                self._release_idempotency([(items[i], ids[i])])
                raise _unorderable(i, "deadline")
            if code == -1:
                full.setdefault(lane, []).append(i)
                continue
            fields = {
                "id": ids[i],
                "custom_id": items[i].custom_id,
                "lane": lane,
                "deadline": float(items[i].deadline),
                "duplicate": False,
            }
            tickets[i] = trusted(Ticket, fields)  # checked by _check_numbers; ours
        for i, j in alias.items():
            first = tickets[j]
            if first is not None:
                tickets[i] = first.model_copy(update={"duplicate": True})
        if full:
            self._release_idempotency([(items[i], ids[i]) for ix in full.values() for i in ix])
            lane = next(iter(full))
            refused = set(full[lane]) | {i for i, j in alias.items() if j in full[lane]}
            raise LaneFull(
                lane,
                lanes.lane(lane).max_queued,
                accepted=[t for t in tickets if t is not None],
                rejected=sorted(refused | {i for ix in full.values() for i in ix}),
            )
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
            rid, _, when = decode(raw).partition("|")
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
                self.scripts["claim_ids"](
                    keys=[idem[n][1] for n in chunk], args=[_rows(rows)], client=pipe
                )
                calls.append(chunk)
        won = [False] * len(idem)
        for chunk, out in zip(calls, pipe.execute(), strict=True):
            for n, code in zip(chunk, out, strict=True):
                won[n] = code == 1
        return won

    def _idem_ttl(self, item: Prepared, now: float) -> int:
        """Seconds to keep a custom_id: the wait to its deadline (at most
        ``IDEMPOTENCY_WAIT_MAX_S``), the result's TTL, and ``IDEMPOTENCY_SLACK_S``."""
        wait = min(max(item.deadline - now, 0.0), IDEMPOTENCY_WAIT_MAX_S)
        return int(wait + self.result_ttl_s + IDEMPOTENCY_SLACK_S)

    def _create(
        self,
        items: Sequence[Prepared],
        ids: list[str],
        order: list[int],
        lanes: ServiceConfig,
        now: float,
    ) -> list[tuple[int, int, str, str]]:
        """Create requests, one script per lane shard and chunk: one fsync and one reply per
        chunk, every request's hash in the script's KEYS. Returns (index, code, lane, hash key)
        per request, so the caller parses no id again."""
        by_shard: dict[tuple[str, int], list[int]] = {}
        for i in order:
            by_shard.setdefault(_lane_shard(ids[i]), []).append(i)
        pipe = self.redis.pipeline(transaction=False)
        calls: list[tuple[list[int], str, str]] = []
        k = self.keys
        for (lane, shard), members in by_shard.items():
            cap = shard_cap(lanes.lane(lane))
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
                keys = [k.queue(lane, shard), k.queue_age(lane, shard), k.counts(lane, shard)]
                prefix = k.request_prefix(lane, shard)
                keys.extend(prefix + ids[i] for i in chunk)
                args = [cap, repr(now), State.QUEUED.value, _rows(rows)]
                self.scripts["submit_many"](keys=keys, args=args, client=pipe)
                calls.append((chunk, lane, prefix))
        out: list[tuple[int, int, str, str]] = []
        for (chunk, lane, prefix), codes in zip(calls, pipe.execute(), strict=True):
            out.extend(
                (i, int(code), lane, prefix + ids[i]) for i, code in zip(chunk, codes, strict=True)
            )
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
        _check_numbers(item, 0)
        rid = new_request_id(item.lane, now, lanes.lane(item.lane).shards)
        keys, args = self.submit_one_call(item, rid, lanes, now)
        with store_errors(self.url):
            out = self.scripts["submit_one"](keys=keys, args=args)
            self.replication.confirm(self.redis, [self.keys.request(rid)])
        code = int(out[0])
        if code == 1:
            return Ticket(id=rid, custom_id=item.custom_id, lane=item.lane, deadline=item.deadline)
        if code == -1:
            raise LaneFull(item.lane, lanes.lane(item.lane).max_queued, rejected=[0])
        if code == -2:
            raise _unorderable(0, "deadline")
        return self.submit_many([item], lanes, now=now)[0]

    def submit_one_call(
        self, item: Prepared, rid: str, lanes: ServiceConfig, now: float
    ) -> tuple[list[str], list[Any]]:
        """``submit_one.lua``'s KEYS and ARGV for ``item`` under id ``rid``; pure, so
        ``routing.async_client`` sends the very same call."""
        k = self.keys
        lane, shard = lane_of(rid), shard_of(rid)
        req = k.request(rid)
        idem = k.idempotency(item.tenant, item.custom_id) if item.custom_id else req
        keys = [idem, req, k.queue(lane, shard), k.queue_age(lane, shard), k.counts(lane, shard)]
        args = [
            rid,
            repr(item.deadline),
            item.model_dump_json(),
            shard_cap(lanes.lane(lane)),
            repr(now),
            item.tenant,
            item.custom_id or "",
            item.max_attempts,
            State.QUEUED.value,
            f"{rid}|{now!r}",
            self._idem_ttl(item, now),
        ]
        return keys, args

    def _release_idempotency(self, pairs: Iterable[tuple[Prepared, str]]) -> None:
        """Free the custom_id of a request that was refused, but only if it still points at it."""
        release = self.scripts["release_idempotency"]
        with store_errors(self.url):
            for p, rid in pairs:
                if p.custom_id is not None:
                    release(keys=[self.keys.idempotency(p.tenant, p.custom_id)], args=[rid])


def _rows(rows: list[list[Any]]) -> str | bytes:
    """A script's rows as one JSON argument; orjson where installed (about 8x quicker on a
    chunk of requests; the script's ``cjson`` reads both forms alike), else ``dumps``."""
    if _fast_dumps is not None:
        try:
            return _fast_dumps(rows)
        except TypeError:  # a string orjson will not encode (a lone surrogate): json can
            pass
    return dumps(rows)


def _lane_shard(request_id: str) -> tuple[str, int]:
    """``(lane_of(id), shard_of(id))`` in one parse: bulk submit asks for every id."""
    lane, _, rest = request_id.partition(".")
    head, sep, _ = rest.partition(".")
    if not lane or not rest:
        lane_of(request_id)  # raises, naming the id
    return lane, int(head) if sep and head.isdigit() and len(head) <= 2 else 0


def shard_cap(spec: LaneSpec) -> int:
    """Backpressure per shard: the lane's ``max_queued`` split over its shards (0: no cap).
    Submits spread round robin, so the shards fill together and the lane holds about the cap."""
    return -(-spec.max_queued // spec.shards)


def _check_numbers(item: Prepared, index: int) -> None:
    """Refuse a request Redis could not order, before anything is written.

    ``Prepared`` already refuses these; this catches one built without validation
    (``model_construct``, ``model_copy(update=...)``). The scripts check again and write nothing
    for such a request (code -2), so none is ever stored half made.
    """
    for name in ("deadline", "created_at"):
        value = getattr(item, name)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise _unorderable(index, name)
    attempts = item.max_attempts
    if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
        raise _unorderable(index, "max_attempts")


def _unorderable(index: int, field: str) -> InvalidRequest:
    return InvalidRequest(
        f"request {index}: its {field} is not a finite number the store can keep", field=field
    )
