"""Whether hedges caught late batches: the input of ``hedge_miss_p`` in the learned route choice.

The expected-cost rule (``routing.decide.expected``) sends a request to a batch only while
P(the batch is late) x P(its hedge misses) stays under the lane's tolerance; P(a hedge misses)
is learned here. A hedge is judged by the request's own outcome, not by the call that answered
it, so every way a hedge can miss counts: answered late by realtime or flex, rate-limited until
its attempts ran out, expired by the sweeper, or still running when its deadline passed.

* ``hedged`` (the batch poller, right after it re-routes a late batch's requests): each id goes
  to ``pending`` (by deadline) with the batch account and model it was hedged from.
* ``resolve`` (the aggregator, once per ``route_refresh_s``): reads the request hashes of the
  pending ids with the earliest deadlines (at most ``limit``), judges each
  (``routing.decide.expected.judge_hedge``) and moves the judged ones to their outcome lists in
  one script, each once however many aggregators judge it.
* ``learned``: the options with ``hedge_miss_p`` (``learn_hedges``), re-read every refresh.

==============================================  =================================================
key (all under the hash tag ``{hedges}``)        entries
==============================================  =================================================
``NS:{hedges}:pending``                         sorted set: request id by deadline; at most
                                                ``pending_max``, the earliest forgotten first
``NS:{hedges}:from``                            hash id -> ``[account, model, hedged_at]``
``NS:{hedges}:o:ACCOUNT|MODEL``                 list ``[at, met]``, newest first, capped
``NS:{hedges}:index``                           set of the outcome lists' names
==============================================  =================================================

Every key has a TTL renewed on write and a cap. Recording is **advisory**, as for observations:
a failed write is logged and dropped, never raised into the step that hedges or routes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

import redis

from routing.decide.expected import HedgeObs, judge_hedge, learn_hedges
from routing.decide.options import RouteOptions
from routing.keys import Keys
from routing.store.base import decode, store_errors
from routing.store.lanes import LaneStore
from routing.store.scripts import Scripts

log = logging.getLogger(__name__)

__all__ = ["HedgeStore"]

DEFAULT_MAX_PER_KEY = 500
DEFAULT_TTL_S = 14 * 86400
DEFAULT_PENDING_MAX = 100_000
RESOLVE_LIMIT = 1000
"""Pending hedges judged per pass: the earliest deadlines first, so a pass stays small."""


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _retryable(raw: Any) -> bool:
    """Whether a stored FAILED result's error was retryable (capacity, not the request)."""
    try:
        error = json.loads(decode(raw)).get("error") or {}
    except (ValueError, AttributeError):
        return False
    return bool(error.get("retryable"))


class HedgeStore:
    """Hedged requests waiting for their verdict, and the verdicts per batch account and model."""

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        *,
        url: str = "redis",
        scripts: Scripts | None = None,
        max_per_key: int = DEFAULT_MAX_PER_KEY,
        ttl_s: int = DEFAULT_TTL_S,
        pending_max: int = DEFAULT_PENDING_MAX,
    ) -> None:
        if max_per_key < 1 or pending_max < 1:
            raise ValueError("max_per_key and pending_max: must be >= 1")
        self.redis = client
        self.keys = keys
        self.url = url
        self.scripts = Scripts(client) if scripts is None else scripts
        self.max_per_key = max_per_key
        self.ttl_s = ttl_s
        self.pending_max = pending_max
        self._learned: tuple[float, int, RouteOptions] | None = None

    @classmethod
    def of(cls, store: LaneStore, **kw: Any) -> HedgeStore:
        """On the lane store's client and scripts: hedges are judged from its request hashes."""
        return cls(store.redis, store.keys, url=store.url, scripts=store.scripts, **kw)

    def hedged(
        self, account: str, model: str, requests: Sequence[tuple[str, float]], now: float
    ) -> None:
        """``requests`` (id, deadline) were just re-routed from a late batch of ``account``."""
        if not requests:
            return
        entry = _dumps([account, model, round(now, 3)])
        args: list[Any] = [self.ttl_s, self.pending_max]
        for rid, deadline in requests:
            args += [rid, deadline, entry]
        keys = [self.keys.hedges("pending"), self.keys.hedges("from")]
        try:
            with store_errors(self.url):
                self.scripts["hedge_mark"](keys=keys, args=args)
        except Exception as exc:  # advisory: the hedge itself is done
            log.warning("hedges not recorded", extra={"n": len(requests), "error": str(exc)})

    def resolve(self, now: float, limit: int = RESOLVE_LIMIT) -> int:
        """Judge the pending hedges whose requests finished or missed; returns how many were
        recorded. The pending ids with the earliest deadlines are read first."""
        k = self.keys
        with store_errors(self.url):
            ids = [decode(i) for i in self.redis.zrange(k.hedges("pending"), 0, limit - 1)]
            if not ids:
                return 0
            pipe = self.redis.pipeline(transaction=False)
            pipe.hmget(k.hedges("from"), ids)
            for rid in ids:
                pipe.hmget(k.request(rid), "outcome", "finished_at", "deadline")
            origin, *rows = pipe.execute()
            failed = [rid for rid, row in zip(ids, rows, strict=True) if decode(row[0]) == "failed"]
            results = dict(zip(failed, self._results(failed), strict=True))
        names: list[str] = []
        args: list[Any] = [self.max_per_key, self.ttl_s]
        for rid, source, (outcome, finished, deadline) in zip(ids, origin, rows, strict=True):
            if source is None or deadline is None:  # its request is gone: nothing to judge
                args += [rid, 0, "", ""]
                continue
            verdict = judge_hedge(
                outcome=decode(outcome) if outcome else None,
                finished_at=float(finished) if finished else None,
                deadline=float(deadline),
                retryable=_retryable(results.get(rid)),
                now=now,
            )
            if verdict == "wait":
                continue
            if verdict == "forget":
                args += [rid, 0, "", ""]
                continue
            account, model, _ = json.loads(source)
            name = f"{account}|{model}"
            if name not in names:
                names.append(name)
            args += [rid, names.index(name) + 1, _dumps([round(verdict.at, 3), verdict.met]), name]
        if len(args) == 2:
            return 0
        keys = [k.hedges("pending"), k.hedges("from"), k.hedges("index")]
        keys += [k.hedge_outcomes(n) for n in names]
        with store_errors(self.url):
            return int(self.scripts["hedge_resolve"](keys=keys, args=args))

    def _results(self, ids: Sequence[str]) -> list[Any]:
        if not ids:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for rid in ids:
            pipe.hget(self.keys.request(rid), "result")
        return list(pipe.execute())

    def snapshot(self) -> dict[str, list[HedgeObs]]:
        """Every judged hedge per "account|model", newest first, in two pipelined reads."""
        with store_errors(self.url):
            names = sorted(decode(n) for n in self.redis.smembers(self.keys.hedges("index")))
            pipe = self.redis.pipeline(transaction=False)
            for name in names:
                pipe.lrange(self.keys.hedge_outcomes(name), 0, -1)
            lists = pipe.execute() if names else []
        out: dict[str, list[HedgeObs]] = {}
        for name, rows in zip(names, lists, strict=True):
            seen = [HedgeObs(float(at), bool(met)) for at, met in map(json.loads, rows)]
            if seen:
                out[name] = seen
        return out

    def learned(self, base: RouteOptions, now: float, refresh_s: float = 5.0) -> RouteOptions:
        """``base`` with ``hedge_miss_p`` learned from the judged hedges, after judging what
        finished since the last pass; re-read at most every ``refresh_s`` seconds. A store that
        cannot be read gives ``base`` (the prior): routing never waits on this."""
        cached = self._learned
        if cached is not None and cached[1] == id(base) and 0 <= now - cached[0] < refresh_s:
            return cached[2]
        try:
            self.resolve(now)
            seen = self.snapshot()
        except Exception as exc:
            log.warning("hedge outcomes not read", extra={"error": str(exc)})
            return base
        options = learn_hedges(base, seen, now) if seen else base
        self._learned = (now, id(base), options)
        return options

    def clear(self) -> int:
        """Forget every hedge and verdict (operations: after an incident that is over)."""
        with store_errors(self.url):
            self._learned = None
            keys = list(self.redis.scan_iter(match=f"{self.keys.ns}:{{hedges}}:*", count=1000))
            return int(self.redis.delete(*keys)) if keys else 0
