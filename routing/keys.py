"""Every Redis key mixbatch uses, built in one place.

A lane's keys, and the keys of every request in it, share the hash tag ``{lane:NAME}`` so each
Lua script touches one cluster slot: the store runs on Redis Cluster unchanged. A lane with
``shards = N`` (lanes.toml) spreads over N slots: shard 0 keeps the tag ``{lane:NAME}`` (so a lane
of one shard has exactly the keys it always had) and shard ``s`` > 0 has ``{lane:NAME#s}``. A
request id starts with its lane and, past shard 0, its shard (``urgent.01J...``,
``bulk.3.01J...``), so any process finds a request's keys from its id alone.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import os
import time
from collections.abc import Sequence
from typing import Literal

from routing.errors import InvalidRequest

GroupPart = Literal["members", "tok", "size", "meta"]
BatchIndex = Literal[
    "groups", "windows", "intents", "inflight", "byid", "byid_closed", "takes", "reaping"
]
ObsKind = Literal["b", "r", "g"]
ObsHash = Literal["inflight", "headroom"]
DeadLetterPart = Literal["at", "entries"]
HedgePart = Literal["pending", "from", "index"]

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_FROM_RFC4648 = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", _CROCKFORD)


def ulid(now: float | None = None) -> str:
    """A 26-character, time-ordered id: ids of one lane sort by creation time.

    48 bits of milliseconds then 80 random bits, in Crockford base32. ``b32encode`` does the
    work in C; translating its alphabet to Crockford's keeps the sort order of the value.
    """
    ms = int((time.time() if now is None else now) * 1000)
    raw = (ms << 80 | int.from_bytes(os.urandom(10), "big")).to_bytes(16, "big")
    return base64.b32encode(b"\0\0\0\0" + raw).decode().translate(_FROM_RFC4648)[6:]


def ulids(n: int, now: float | None = None) -> list[str]:
    """``n`` ids as ``ulid(now)`` makes them, in one go: one clock read, one ``os.urandom``,
    one ``b32encode`` over 20-byte blocks (4 zero bytes, 6 of milliseconds, 10 random: exactly
    32 base32 characters each) and one translate; bulk submit made them one at a time."""
    ms = int((time.time() if now is None else now) * 1000).to_bytes(6, "big")
    rand = os.urandom(10 * n)
    head = b"\0\0\0\0" + ms
    blob = b"".join([head + rand[i : i + 10] for i in range(0, 10 * n, 10)])
    text = base64.b32encode(blob).decode().translate(_FROM_RFC4648)
    return [text[i + 6 : i + 32] for i in range(0, 32 * n, 32)]


#: Round robin over a lane's shards, per process: one ``submit_many`` spreads evenly.
_spread = itertools.count()


def new_request_id(lane: str, now: float | None = None, shards: int = 1) -> str:
    """A new id in ``lane``; with ``shards`` > 1, in the next shard of a per-process round robin."""
    shard = next(_spread) % shards if shards > 1 else 0
    return f"{lane}.{shard}.{ulid(now)}" if shard else f"{lane}.{ulid(now)}"


def new_request_ids(lanes: Sequence[tuple[str, int]], now: float | None = None) -> list[str]:
    """``new_request_id(lane, now, shards)`` for each (lane, shards), with ids from one ``ulids``."""
    out = []
    for (lane, shards), uid in zip(lanes, ulids(len(lanes), now), strict=True):
        shard = next(_spread) % shards if shards > 1 else 0
        out.append(f"{lane}.{shard}.{uid}" if shard else f"{lane}.{uid}")
    return out


def lane_of(request_id: str) -> str:
    lane, sep, rest = request_id.partition(".")
    if not sep or not lane or not rest:
        raise InvalidRequest(f"{request_id!r} is not a mixbatch request id", field="id")
    return lane


def shard_of(request_id: str) -> int:
    """The shard in an id (``bulk.3.01J...`` -> 3); 0 for an id with none (``bulk.01J...``).
    A shard is one or two digits (``LaneSpec.shards`` is at most 64); a ULID is 26 characters."""
    lane_of(request_id)
    head, sep, _ = request_id.split(".", 1)[1].partition(".")
    return int(head) if sep and head.isdigit() and len(head) <= 2 else 0


class Keys:
    """Key names under one namespace (``MIXBATCH_NAMESPACE``), so deployments can share a Redis."""

    def __init__(self, namespace: str = "mb") -> None:
        self.ns = namespace

    def lane_tag(self, lane: str, shard: int = 0) -> str:
        return f"{self.ns}:{{lane:{lane}#{shard}}}" if shard else f"{self.ns}:{{lane:{lane}}}"

    def queue(self, lane: str, shard: int = 0) -> str:
        return f"{self.lane_tag(lane, shard)}:q"

    def queue_age(self, lane: str, shard: int = 0) -> str:
        return f"{self.lane_tag(lane, shard)}:qage"

    def delayed(self, lane: str, shard: int = 0) -> str:
        return f"{self.lane_tag(lane, shard)}:delayed"

    def leases(self, lane: str, shard: int = 0) -> str:
        return f"{self.lane_tag(lane, shard)}:leases"

    def outbox(self, lane: str, shard: int = 0) -> str:
        return f"{self.lane_tag(lane, shard)}:outbox"

    def finished(self, lane: str, shard: int = 0) -> str:
        return f"{self.lane_tag(lane, shard)}:finished"

    def counts(self, lane: str, shard: int = 0) -> str:
        return f"{self.lane_tag(lane, shard)}:counts"

    def request_prefix(self, lane: str, shard: int = 0) -> str:
        return f"{self.lane_tag(lane, shard)}:r:"

    def request(self, request_id: str) -> str:
        return self.request_prefix(lane_of(request_id), shard_of(request_id)) + request_id

    def notify(self, request_id: str) -> str:
        return f"{self.lane_tag(lane_of(request_id), shard_of(request_id))}:n:{request_id}"

    def idempotency(self, tenant: str, custom_id: str) -> str:
        """Per tenant, not per lane: the same custom_id in another lane is still a duplicate."""
        if len(custom_id) > 128:
            custom_id = "sha256:" + hashlib.sha256(custom_id.encode()).hexdigest()
        return f"{self.ns}:{{tenant:{tenant}}}:idem:{custom_id}"

    def config(self) -> str:
        return f"{self.ns}:config"

    def dead_letters(self, lane: str, part: DeadLetterPart = "at", shard: int = 0) -> str:
        """A lane shard's dead letters: ``at`` (id by when it was given up on, a sorted set) and
        ``entries`` (id -> the entry: lane, when, last error, as JSON)."""
        key = f"{self.lane_tag(lane, shard)}:dlq"
        return key if part == "at" else f"{key}:{part}"

    def dead_letter_lanes(self) -> str:
        """The lanes (``NAME``, or ``NAME#s`` for shard s > 0) that have had a dead letter: where
        ``mixbatch dlq list`` looks."""
        return f"{self.ns}:dlq:lanes"

    def legacy_dead_letters(self) -> str:
        """Where versions before per-lane dead letters kept them all (id -> entry); the sweeper
        moves what it finds there into the lanes."""
        return f"{self.ns}:dlq"

    def semaphore(self, provider: str, model: str) -> str:
        return f"{self.ns}:{{sem:{provider}:{model}}}"

    def heartbeat(self, role: str) -> str:
        return f"{self.ns}:heartbeat:{role}"

    def ledger(self) -> str:
        """The cost ledger: totals by lane, tenant, route and spend tag."""
        return f"{self.ns}:costs"

    def ledger_hour(self, hour: int) -> str:
        """One hour's totals by route (unix hour); tagged ``{NS:costs}``: the ledger's own slot."""
        return f"{self.ns}:{{{self.ns}:costs}}:h:{hour}"

    def redbeat_prefix(self) -> str:
        """Where celery-redbeat keeps beat's schedule and lock (its ``redbeat_key_prefix``)."""
        return f"{self.ns}:redbeat:"

    # -- the batch registry: every key under the one tag ``{batches}`` ----------------------

    def batch_group(self, gid: str, part: GroupPart = "members") -> str:
        """A pending group: its ``members`` (scored by deadline), their lease tokens (``tok``),
        their line sizes (``size``) and when it began (``meta``)."""
        key = f"{self.ns}:{{batches}}:pending:{gid}"
        return key if part == "members" else f"{key}:{part}"

    def batch(self, key: str) -> str:
        """One batch's record."""
        return f"{self.ns}:{{batches}}:b:{key}"

    def batch_take(self, take_id: str) -> str:
        """The members one flusher took from a group and has not yet put in an intent."""
        return f"{self.ns}:{{batches}}:take:{take_id}"

    def batches(self, index: BatchIndex) -> str:
        """The registry's indexes: pending ``groups``, submit ``windows`` by group, ``intents``
        (recorded before create), ``inflight`` (by next poll), ``byid`` (provider id -> key),
        ``byid_closed`` (provider ids of closed batches, by creation, trimmed), ``takes`` and
        ``reaping`` (takes and intents by their worker's or reconciler's beat)."""
        return f"{self.ns}:{{batches}}:{index}"

    # -- observations: every key under the one tag ``{obs}`` --------------------------------

    def obs_list(self, kind: ObsKind, name: str) -> str:
        """Observations of one kind (``b`` batch, ``r`` realtime, ``g`` gpu) for one name; the
        names ``index`` (the set of a kind's lists) and ``g:aliases`` are reserved."""
        return f"{self.ns}:{{obs}}:{kind}:{name}"

    def obs_seen(self, batch_key: str) -> str:
        """Marks a batch whose turnaround was recorded, so it is recorded once."""
        return f"{self.ns}:{{obs}}:seen:{batch_key}"

    def obs(self, name: ObsHash) -> str:
        """``inflight`` (batches still running) or ``headroom`` (last rate-limit headers)."""
        return f"{self.ns}:{{obs}}:{name}"

    def obs_pattern(self) -> str:
        """A SCAN match for every observation key."""
        return f"{self.ns}:{{obs}}:*"

    # -- sinks ------------------------------------------------------------------------------

    def stream_marker(self, stream: str, request_id: str) -> str:
        """Remembers that ``request_id`` is in ``stream``; in the stream's own hash slot."""
        return f"{self.ns}:stream-once:{{{_slot_tag(stream)}}}:{stream}:{request_id}"

    # -- hedges: every key under the one tag ``{hedges}`` -------------------------------------

    def hedges(self, part: HedgePart) -> str:
        """Hedged requests whose outcome is not judged yet: ``pending`` (id by deadline) and
        ``from`` (id -> the batch account and model it was hedged from, and when); ``index``,
        the names of the outcome lists."""
        return f"{self.ns}:{{hedges}}:{part}"

    def hedge_outcomes(self, name: str) -> str:
        """Judged hedges of one batch "ACCOUNT|MODEL": ``[at, met]``, newest first, capped."""
        return f"{self.ns}:{{hedges}}:o:{name}"


def _slot_tag(key: str) -> str:
    """What Redis Cluster hashes for ``key``: its ``{tag}`` if it has a non-empty one."""
    start = key.find("{")
    if start != -1:
        end = key.find("}", start + 1)
        if end > start + 1:
            return key[start + 1 : end]
    return key
