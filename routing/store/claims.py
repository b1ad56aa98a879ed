"""Claiming: the queue heads of every lane shard read at once, merged, then claimed by script.

Part of ``LaneStore`` (``routing.store.lanes``), whose ``claim`` and ``claim_lanes`` read back
what is claimed here. ``claim.lua`` may touch only the keys it is given, so a claim is two steps
and still atomic where it matters: one pipelined read of each shard's queue heads (with their
deadlines) and of its delayed retries that are due, a merge of those by lane priority and then
deadline, and one pipelined call of ``claim.lua`` per shard with the chosen candidates' hashes.
The script re-checks each candidate and skips one another claim took meanwhile; when some were
skipped, the claim reads again (a few rounds at most), so two aggregators racing for the same
heads both fill their batch.

The granularity of earliest-deadline-first across the shards of a lane: what was queued when
the heads were read is claimed in deadline order, exactly; a request queued (or a retry whose
backoff ended) after that read waits for the next claim, one round trip later. Due retries are
taken before the fresh work of their lane (their deadline is only read by the script).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from typing import Any

from routing.states import State
from routing.store.base import StoreBase, decode, store_errors

__all__ = ["ClaimOps"]

#: Retries promoted from a shard's delayed set per claim (as many as one claim ever moved).
_PROMOTE_MAX = 1000
#: Read-and-claim rounds of one claim when other claims took some of its candidates.
_ROUNDS = 3

#: One shard's part of a claim: (lane, shard, due retry ids, chosen queue heads, most to claim).
_Part = tuple[str, int, list[str], list[str], int]


def _plan(
    shards: Sequence[tuple[str, int]], replies: Sequence[Any], want: int
) -> tuple[list[_Part], int]:
    """Choose up to ``want`` candidates: lanes in the order given, within a lane due retries
    first and then the queue heads of all its shards merged by deadline. Returns each shard's
    part and how many were chosen. A shard's due retries are all promoted; the script claims
    the earliest of its candidates, as many as the part says."""
    parts: list[_Part] = []
    left = want
    by_lane: dict[str, list[int]] = {}
    for n, (lane, _) in enumerate(shards):
        by_lane.setdefault(lane, []).append(n)
    for positions in by_lane.values():
        due = {n: [decode(i) for i in replies[2 * n]] for n in positions}
        quota = {}
        for n in positions:
            quota[n] = min(left, len(due[n]))
            left -= quota[n]
        promoted = {rid for n in positions for rid in due[n]}
        chosen: dict[int, list[str]] = {n: [] for n in positions}
        heads = heapq.merge(
            *([(score, decode(rid), n) for rid, score in replies[2 * n + 1]] for n in positions)
        )
        for _, rid, n in heads:
            if left <= 0:
                break
            if rid not in promoted:  # promoted by another claim between our two reads
                chosen[n].append(rid)
                left -= 1
        for n in positions:
            if due[n] or chosen[n]:
                lane, shard = shards[n]
                parts.append((lane, shard, due[n], chosen[n], quota[n] + len(chosen[n])))
    return parts, want - left


class ClaimOps(StoreBase):
    """The script side of a claim: ``claim_flat`` returns ``claim.lua``'s replies, joined."""

    def claim_flat(
        self,
        lanes: Sequence[tuple[str, int]],
        n: int,
        *,
        token: str,
        lease_until: float,
        now: float,
    ) -> list[Any]:
        """Up to ``n`` requests of ``lanes`` ((name, shards), most urgent first), as the flat
        list ``claim.lua`` returns (id, attempts, data, problem per request)."""
        shards = [(lane, s) for lane, count in lanes for s in range(count)]
        k = self.keys
        out: list[Any] = []
        with store_errors(self.url):
            for _ in range(_ROUNDS):
                want = n - len(out) // 4
                if want <= 0:
                    break
                pipe = self.redis.pipeline(transaction=False)
                for lane, s in shards:
                    pipe.zrangebyscore(k.delayed(lane, s), "-inf", now, start=0, num=_PROMOTE_MAX)
                    pipe.zrange(k.queue(lane, s), 0, want - 1, withscores=True)
                parts, chosen = _plan(shards, pipe.execute(), want)
                if not parts:
                    break
                pipe = self.redis.pipeline(transaction=False)
                for lane, s, due, heads, most in parts:
                    ids = due + heads
                    self.scripts["claim"](
                        keys=[
                            k.queue(lane, s),
                            k.queue_age(lane, s),
                            k.delayed(lane, s),
                            k.leases(lane, s),
                            k.counts(lane, s),
                            *(k.request_prefix(lane, s) + rid for rid in ids),
                        ],
                        args=[
                            repr(now),
                            most,
                            repr(lease_until),
                            token,
                            State.QUEUED.value,
                            State.CLAIMED.value,
                            len(due),
                            *ids,
                        ],
                        client=pipe,
                    )
                got = pipe.execute()
                for flat in got:
                    out.extend(flat)
                if sum(len(flat) for flat in got) // 4 >= chosen:
                    break
        return out
