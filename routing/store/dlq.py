"""The dead letters: deliveries given up on, each with its last error, until replayed or dropped.

The list is one hash (``Keys.dead_letters``, id -> entry); the request itself keeps its result
and a ``dead_letter`` flag, counted per lane. The request's own changes are one script in its
lane's slot (``deliver_done``, ``dead_letter_replay``, ``dead_letter_drop``); the list's entry
lives in another slot and is written after filing and removed after a replay, so a crash in
between leaves an entry listed rather than a dead letter lost.
"""

from __future__ import annotations

import json
import time
from typing import Any, TypedDict

from routing.keys import lane_of
from routing.models import ErrorInfo
from routing.store.base import StoreBase, dumps, store_errors

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

    def add(self, request_id: str, error: ErrorInfo, *, now: float | None = None) -> bool:
        """Give up on delivery: out of the outbox, into the list with its last error.

        False when the request was no longer in the outbox (delivered meanwhile, or gone).
        """
        st = self.store
        now = time.time() if now is None else now
        lane = lane_of(request_id)
        k = st.keys
        with store_errors(st.url):
            out = st.scripts["deliver_done"](
                keys=[k.request(request_id), k.outbox(lane), k.counts(lane)],
                args=[request_id, repr(now), st.result_ttl_s, "", error.model_dump_json()],
            )
            if not out:
                return False
            entry = DeadLetter(id=request_id, lane=lane, at=now, error=error.model_dump())
            st.redis.hset(k.dead_letters(), request_id, dumps(entry))
        return True

    def entries(self) -> list[DeadLetter]:
        """Every dead letter, oldest first."""
        st = self.store
        with store_errors(st.url):
            raw = st.redis.hgetall(st.keys.dead_letters())
        return sorted((json.loads(v) for v in raw.values()), key=lambda e: e["at"])

    def count(self) -> int:
        st = self.store
        with store_errors(st.url):
            return int(st.redis.hlen(st.keys.dead_letters()))

    def replay(self, request_id: str, *, now: float | None = None) -> bool | None:
        """Back into its lane's outbox with a fresh count of delivery attempts.

        None when there is no such dead letter; False when the request itself is gone (its
        result outlived the result TTL): the entry is then kept, for ``drop``.
        """
        st = self.store
        now = time.time() if now is None else now
        lane = lane_of(request_id)
        k = st.keys
        with store_errors(st.url):
            if not st.redis.hexists(k.dead_letters(), request_id):
                return None
            replayed = st.scripts["dead_letter_replay"](
                keys=[k.request(request_id), k.outbox(lane), k.counts(lane)],
                args=[request_id, repr(now), st.result_ttl_s],
            )
            if not replayed:
                return False
            st.redis.hdel(k.dead_letters(), request_id)
        return True

    def drop(self, request_id: str) -> bool:
        """Forget a dead letter for good (its result stays until its TTL); False if none."""
        st = self.store
        k = st.keys
        with store_errors(st.url):
            if not st.redis.hdel(k.dead_letters(), request_id):
                return False
            st.scripts["dead_letter_drop"](
                keys=[k.request(request_id), k.counts(lane_of(request_id))]
            )
        return True
