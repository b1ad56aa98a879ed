"""The dead letters: deliveries given up on, each with its last error, until replayed or dropped.

Each lane shard keeps its own, in its own slot (``Keys.dead_letters``: id by when it was filed,
and ``Keys.dead_letters(lane, "entries")``: id -> entry), so filing, replaying and dropping are each one
script beside the request itself: a dead letter is never half filed, and the lane's
``dead_letters`` count is always the number listed. A dead letter is kept while its result is:
the sweeper's ``trim`` forgets those filed more than ``result_ttl_s`` ago, whose result (the one
thing a replay could send) has expired with them. A small set of lane names (``NAME#s`` for a
shard s > 0, ``Keys.dead_letter_lanes``) says where ``entries`` looks.
"""

from __future__ import annotations

import json
import time
from typing import Any, TypedDict

from routing.keys import lane_of, shard_of
from routing.models import ErrorInfo
from routing.store.base import StoreBase, decode, dumps, store_errors

__all__ = ["DeadLetter", "DeadLetters"]


class DeadLetter(TypedDict):
    """One entry of the list, as ``mixbatch dlq list --json`` prints it."""

    id: str
    lane: str
    at: float
    error: dict[str, Any]


class DeadLetters:
    """The dead-letter operations of one lane store (``LaneStore.dlq``)."""

    def __init__(self, store: StoreBase) -> None:
        self.store = store

    def _keys(self, request_id: str) -> tuple[str, str, str, str]:
        """The request's hash, its lane shard's counts, dead letters and entries: one slot."""
        lane, shard = lane_of(request_id), shard_of(request_id)
        k = self.store.keys
        return (
            k.request(request_id),
            k.counts(lane, shard),
            k.dead_letters(lane, shard=shard),
            k.dead_letters(lane, "entries", shard),
        )

    def add(self, request_id: str, error: ErrorInfo, *, now: float | None = None) -> bool:
        """Give up on delivery: out of the outbox, into the list with its last error, one step.

        False when the request was no longer in the outbox (delivered meanwhile, or gone).
        """
        st = self.store
        now = time.time() if now is None else now
        lane, shard = lane_of(request_id), shard_of(request_id)
        req, counts, dead, entries = self._keys(request_id)
        entry = DeadLetter(id=request_id, lane=lane, at=now, error=error.model_dump())
        with store_errors(st.url):
            # The lane is named first: a crash after it leaves a lane with nothing to list.
            st.redis.sadd(st.keys.dead_letter_lanes(), f"{lane}#{shard}" if shard else lane)
            filed = st.scripts["dead_letter_add"](
                keys=[req, st.keys.outbox(lane, shard), counts, dead, entries],
                args=[
                    request_id,
                    repr(now),
                    st.result_ttl_s,
                    error.model_dump_json(),
                    dumps(entry),
                ],
            )
        return bool(filed)

    def _lanes(self) -> list[tuple[str, int]]:
        """(lane, shard) of every lane shard that has had a dead letter."""
        st = self.store
        named = sorted(decode(v) for v in st.redis.smembers(st.keys.dead_letter_lanes()))
        return [
            (lane, int(shard or 0)) for lane, _, shard in (name.partition("#") for name in named)
        ]

    def entries(self) -> list[DeadLetter]:
        """Every dead letter, oldest first."""
        st = self.store
        with store_errors(st.url):
            pipe = st.redis.pipeline(transaction=False)
            for lane, shard in self._lanes():
                pipe.hvals(st.keys.dead_letters(lane, "entries", shard))
            rows = pipe.execute()
        found = [json.loads(v) for values in rows for v in values]
        return sorted(found, key=lambda e: e["at"])

    def count(self) -> int:
        st = self.store
        with store_errors(st.url):
            pipe = st.redis.pipeline(transaction=False)
            for lane, shard in self._lanes():
                pipe.zcard(st.keys.dead_letters(lane, shard=shard))
            return sum(pipe.execute())

    def replay(self, request_id: str, *, now: float | None = None) -> bool | None:
        """Back into its lane's outbox with a fresh count of delivery attempts, one step.

        None when there is no such dead letter; False when the request itself is gone (its
        result outlived the result TTL): the entry is then kept, for ``drop``.
        """
        st = self.store
        now = time.time() if now is None else now
        req, counts, dead, entries = self._keys(request_id)
        outbox = st.keys.outbox(lane_of(request_id), shard_of(request_id))
        with store_errors(st.url):
            code = int(
                st.scripts["dead_letter_replay"](
                    keys=[req, outbox, counts, dead, entries],
                    args=[request_id, repr(now), st.result_ttl_s],
                )
            )
        return None if code < 0 else bool(code)

    def adopt_legacy(self) -> int:
        """Move dead letters an older version kept in one list into their lanes; how many.

        Each is filed in its lane first and only then removed from the old list, so a crash
        between leaves it listed twice for a moment, never lost; filing again changes nothing.
        """
        st = self.store
        legacy = st.keys.legacy_dead_letters()
        with store_errors(st.url):
            raw = st.redis.hgetall(legacy)
            for rid, value in raw.items():
                entry = json.loads(value)
                lane = lane_of(decode(rid))
                st.redis.sadd(st.keys.dead_letter_lanes(), lane)
                st.scripts["dead_letter_adopt"](
                    keys=[
                        st.keys.dead_letters(lane),
                        st.keys.dead_letters(lane, "entries"),
                        st.keys.counts(lane),
                    ],
                    args=[decode(rid), repr(float(entry["at"])), decode(value)],
                )
                st.redis.hdel(legacy, rid)
        return len(raw)

    def drop(self, request_id: str) -> bool:
        """Forget a dead letter for good (its result stays until its TTL); False if none."""
        st = self.store
        with store_errors(st.url):
            return bool(
                st.scripts["dead_letter_drop"](keys=list(self._keys(request_id)), args=[request_id])
            )
