"""What the service has seen, kept in Redis, bounded: the input of the learned route choice.

Tasks record as they go (I/O at the edge); ``routing.decide.estimates`` turns a ``snapshot()`` into
numbers (pure). What is kept, per key, newest first, at most ``max_per_key`` entries and
``ttl_s`` after the last write (so keys of a model nobody uses any more disappear):

==============================================  =================================================
key (all under the hash tag ``{obs}``)          entries
==============================================  =================================================
``NS:{obs}:b:ACCOUNT|ENDPOINT|MODEL``           list ``[at, seconds, size, censored]``: one per
                                                provider batch, create to terminal status
``NS:{obs}:inflight``                           hash batch key -> ``[obs key, started_at, size]``:
                                                batches still running (censored at their age)
``NS:{obs}:seen:BATCHKEY``                      marker, so a batch is recorded once
``NS:{obs}:r:ACCOUNT|MODEL``                    list ``[at, seconds]``: realtime latency
``NS:{obs}:headroom``                           hash ACCOUNT|MODEL -> last rate-limit ``Headroom``
``NS:{obs}:g:MODEL``                            list ``[at, texts_per_s, queue_wait_s]``: GPU
``NS:{obs}:g:hosts``                            hash ``[model, host, alias]`` -> last report:
                                                who serves what, per host (GPU liveness)
``NS:{obs}:b:index`` / ``r:index`` / ``g:index``  sets of the list keys, so a snapshot is one pipeline
==============================================  =================================================

Every key shares the ``{obs}`` hash tag, so on Redis Cluster a record is one atomic script and a
snapshot one slot. Recording is **advisory**: a failed write is logged and dropped, never raised
into the task that answers a request (a lost observation costs a little accuracy; a lost answer
would cost the request). A flushed store is not an error either: estimates fall back to priors.

``DecisionStore`` keeps each request's route ``Decision`` in its request hash (field
``decision``) for ``mixbatch explain``.

For the GPU worker: call ``ObservationStore.record_gpu(model, texts_per_s=..., queue_wait_s=...,
aliases=...)`` after each micro-batch and on a heartbeat (every minute or so, idle or not); a
model whose last report is older than ``MIXBATCH_ROUTE_GPU_MAX_AGE_S`` is treated as unserved.
Liveness is per host (``host``: hostname and pid by default): each host's report of a model and
of each alias is stamped on its own and expires on its own after ``gpu_max_age_s``, so with
workers on several hosts the local route stays open while some host serving the model reports,
and an alias routes locally only while a host that serves it reports.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
from collections.abc import Iterable, Mapping
from typing import Any

import redis
from pydantic import BaseModel

from routing.decide.estimates import GpuObs, LatencyObs, Observations, TurnaroundObs
from routing.decide.options import RouteOptions, learn
from routing.decide.ratelimit import Headroom, parse_rate_limit
from routing.decide.route import Decision
from routing.errors import NotFound
from routing.keys import Keys, ObsKind, lane_of
from routing.store.base import decision_calls, store_errors
from routing.store.scripts import Scripts

log = logging.getLogger(__name__)

__all__ = ["DecisionStore", "Explained", "ObservationStore"]

DEFAULT_MAX_PER_KEY = 500
DEFAULT_TTL_S = 14 * 86400
SEEN_TTL_S = 3 * 86400
INFLIGHT_MAX_AGE_S = 3 * 86400
"""An in-flight entry older than this lost its batch to a path that never closed it: dropped."""
DEFAULT_GPU_MAX_AGE_S = 900.0
"""A host's GPU report older than this is forgotten (``MIXBATCH_ROUTE_GPU_MAX_AGE_S``'s default)."""


def default_host() -> str:
    """This process as a GPU host: hostname and pid, unique across hosts and workers."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _finite(value: float | None) -> bool:
    return value is not None and isinstance(value, int | float) and math.isfinite(value)


class ObservationStore:
    """Bounded observation lists in Redis, and the learned route options built from them."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        namespace: str = "mb",
        url: str = "redis",
        max_per_key: int = DEFAULT_MAX_PER_KEY,
        ttl_s: int = DEFAULT_TTL_S,
        gpu_max_age_s: float = DEFAULT_GPU_MAX_AGE_S,
    ) -> None:
        if max_per_key < 1:
            raise ValueError(f"max_per_key: must be >= 1, got {max_per_key}")
        self.redis = client
        self.url = url
        self.max_per_key = max_per_key
        self.ttl_s = ttl_s
        self.keys = Keys(namespace)
        self.gpu_max_age_s = gpu_max_age_s
        scripts = Scripts(client)
        self._record, self._gpu_hosts = scripts["observe"], scripts["gpu_hosts"]
        self._learned: tuple[float, int, RouteOptions] | None = None

    # -- recording (advisory) ---------------------------------------------------------------

    def _push(self, kind: ObsKind, name: str, entry: list[Any], batch_key: str = "") -> bool:
        k = self.keys
        list_key = k.obs_list(kind, name)
        keys = [
            k.obs_seen(batch_key or "-"),
            list_key,
            k.obs_list(kind, "index"),
            k.obs("inflight"),
        ]
        args = [_dumps(entry), self.max_per_key, self.ttl_s, SEEN_TTL_S, name, batch_key]
        try:
            with store_errors(self.url):
                return bool(self._record(keys=keys, args=args))
        except Exception as exc:  # advisory: never fail the caller
            log.warning("observation not recorded", extra={"key": list_key, "error": str(exc)})
            return False

    def batch_started(
        self, provider: str, endpoint: str, model: str, *, batch_key: str, size: int, at: float
    ) -> None:
        """A provider batch was created: it counts as "running for N seconds" until it ends."""
        entry = _dumps([f"{provider}|{endpoint}|{model}", at, max(int(size), 1)])
        try:
            with store_errors(self.url):
                self.redis.hset(self.keys.obs("inflight"), batch_key, entry)
        except Exception as exc:
            log.warning(
                "observation not recorded", extra={"batch_key": batch_key, "error": str(exc)}
            )

    def record_batch(
        self,
        provider: str,
        endpoint: str,
        model: str,
        *,
        turnaround_s: float,
        size: int,
        at: float,
        censored: bool = False,
        batch_key: str = "",
    ) -> bool:
        """A provider batch ended: ``turnaround_s`` from create to terminal status.

        ``censored``: its answers never came in that time (expired, or cancelled by us); it is
        still evidence that the provider takes *at least* that long. With ``batch_key`` a batch
        is recorded once, however many pollers see it end. Returns whether it was recorded.
        """
        if not _finite(turnaround_s) or turnaround_s < 0:
            log.warning("bad batch turnaround ignored", extra={"turnaround_s": turnaround_s})
            return False
        entry = [round(at, 3), round(turnaround_s, 3), max(int(size), 1), bool(censored)]
        return self._push("b", f"{provider}|{endpoint}|{model}", entry, batch_key)

    def record_realtime(
        self,
        provider: str,
        model: str,
        *,
        latency_s: float | None,
        at: float,
        rate_limit: Mapping[str, str] | None = None,
        limited: bool = False,
    ) -> None:
        """A realtime call ended: its latency (None for a 429) and the provider's rate-limit
        headers (``ProviderResponse.rate_limit``); ``limited`` marks a 429."""
        name = f"{provider}|{model}"
        if _finite(latency_s) and latency_s is not None and latency_s >= 0:
            self._push("r", name, [round(at, 3), round(latency_s, 4)])
        headroom = parse_rate_limit(rate_limit or {}, at, limited=limited)
        if headroom is None:
            return
        try:
            with store_errors(self.url):
                self.redis.hset(self.keys.obs("headroom"), name, headroom.model_dump_json())
        except Exception as exc:
            log.warning("observation not recorded", extra={"key": name, "error": str(exc)})

    def record_gpu(
        self,
        model: str,
        *,
        texts_per_s: float | None,
        queue_wait_s: float | None,
        at: float | None = None,
        aliases: Iterable[str] = (),
        host: str | None = None,
    ) -> None:
        """What the GPU worker measured for ``model``: throughput while busy and queue wait.

        Call after each micro-batch and on a heartbeat; either figure may be None (not measured
        yet). The report itself is the liveness signal the route choice reads, kept per
        ``host`` (default: this host and process) with the aliases that host serves.
        """
        at = time.time() if at is None else at
        rate = texts_per_s if _finite(texts_per_s) and (texts_per_s or 0) > 0 else None
        wait = queue_wait_s if _finite(queue_wait_s) and (queue_wait_s or 0) >= 0 else None
        self._push("g", model, [round(at, 3), rate, wait])
        host = host or default_host()
        fields = [_dumps([model, host, a]) for a in ("", *aliases) if a != model]
        args = [repr(at), repr(at - self.gpu_max_age_s), self.ttl_s, *fields]
        try:
            with store_errors(self.url):
                self._gpu_hosts(keys=[self.keys.obs_list("g", "hosts")], args=args)
        except Exception as exc:  # advisory, as every observation
            log.warning("observation not recorded", extra={"key": model, "error": str(exc)})

    def gpu_hosts(self, now: float | None = None) -> dict[str, dict[str, float]]:
        """Model (or alias) -> host -> its last report, for the hosts reporting lately."""
        now = time.time() if now is None else now
        with store_errors(self.url):
            raw = self.redis.hgetall(self.keys.obs_list("g", "hosts"))
        return _live_hosts(raw, now - self.gpu_max_age_s)[0]

    # -- reading ------------------------------------------------------------------------------

    def snapshot(
        self, now: float | None = None, gpu_max_age_s: float | None = None
    ) -> Observations:
        """Every observation, in one pipelined read (an empty store gives empty lists); GPU
        aliases of the hosts that reported within ``gpu_max_age_s`` (default: the store's)."""
        now = time.time() if now is None else now
        max_age = self.gpu_max_age_s if gpu_max_age_s is None else gpu_max_age_s
        with store_errors(self.url):
            pipe = self.redis.pipeline(transaction=False)
            for kind in ("b", "r", "g"):
                pipe.smembers(self.keys.obs_list(kind, "index"))
            pipe.hgetall(self.keys.obs("inflight"))
            pipe.hgetall(self.keys.obs("headroom"))
            pipe.hgetall(self.keys.obs_list("g", "hosts"))
            b_idx, r_idx, g_idx, inflight_raw, headroom_raw, hosts_raw = pipe.execute()
            names: dict[ObsKind, list[str]] = {
                "b": sorted(n.decode() for n in b_idx),
                "r": sorted(n.decode() for n in r_idx),
                "g": sorted(n.decode() for n in g_idx),
            }
            pipe = self.redis.pipeline(transaction=False)
            for kind, keys in names.items():
                for name in keys:
                    pipe.lrange(self.keys.obs_list(kind, name), 0, -1)
            lists = iter(pipe.execute())
        seen = Observations()
        stale: list[str] = []
        for kind, keys in names.items():
            for name in keys:
                rows = [json.loads(r) for r in next(lists)]
                if not rows:
                    continue
                if kind == "b":
                    seen.batch[name] = [
                        TurnaroundObs(float(a), float(s), int(n), bool(c)) for a, s, n, c in rows
                    ]
                elif kind == "r":
                    seen.realtime[name] = [LatencyObs(float(a), float(s)) for a, s in rows]
                else:
                    seen.gpu[name] = [GpuObs(float(a), t, w) for a, t, w in rows]
        for raw_key, raw in inflight_raw.items():
            name, started, size = json.loads(raw)
            age = now - float(started)
            if age > INFLIGHT_MAX_AGE_S:
                stale.append(raw_key.decode())
                continue
            seen.inflight.setdefault(name, []).append(
                TurnaroundObs(now, max(age, 0.0), int(size), True)
            )
        for raw_key, raw in headroom_raw.items():
            seen.headroom[raw_key.decode()] = Headroom.model_validate_json(raw)
        seen.gpu_aliases = _live_hosts(hosts_raw, now - max_age)[1]
        if stale:
            with store_errors(self.url):
                self.redis.hdel(self.keys.obs("inflight"), *stale)
        return seen

    def learned(self, base: RouteOptions, now: float, refresh_s: float = 5.0) -> RouteOptions:
        """``base`` with learned estimates, re-read at most every ``refresh_s`` seconds.

        The aggregator asks on every pass (every couple of seconds); a snapshot per pass would
        be wasted work, and estimates a few seconds old are as good.
        """
        cached = self._learned
        if cached is not None and cached[1] == id(base) and 0 <= now - cached[0] < refresh_s:
            return cached[2]
        options = learn(base, self.snapshot(now, base.gpu_max_age_s), now)
        self._learned = (now, id(base), options)
        return options

    def clear(self) -> int:
        """Forget every observation (operations: after a provider incident that is over)."""
        with store_errors(self.url):
            keys = list(self.redis.scan_iter(match=self.keys.obs_pattern(), count=1000))
            self._learned = None
            return int(self.redis.delete(*keys)) if keys else 0


class Explained(BaseModel):
    """What ``mixbatch explain`` shows: a request's state and the decision that routed it."""

    id: str
    lane: str
    state: str
    route: str | None
    deadline: float
    decision: Decision | None
    decisions: int


def _live_hosts(
    raw: Mapping[bytes, bytes], cutoff: float
) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """The ``g:hosts`` entries stamped since ``cutoff``: name -> host -> at (a model or an alias),
    and alias -> model for the aliases some live host serves."""
    live: dict[str, dict[str, float]] = {}
    aliases: dict[str, str] = {}
    for field, stamp in raw.items():
        at = float(stamp)
        if at < cutoff:
            continue
        model, host, alias = json.loads(field)
        live.setdefault(alias or model, {})[host] = at
        if alias:
            aliases[alias] = model
    return live, aliases


class DecisionStore:
    """Each request's latest route ``Decision``, in its own hash (field ``decision``)."""

    def __init__(self, client: redis.Redis, keys: Keys, url: str = "redis") -> None:
        self.redis = client
        self.keys = keys
        self.url = url
        self._save = Scripts(client)["save_decision"]

    def save_many(self, decisions: Mapping[str, Decision]) -> None:
        """Store decisions in one pipeline, one script per lane shard and chunk, each class's
        record serialized once; a request that is gone is skipped. Advisory."""
        if not decisions:
            return
        try:
            with store_errors(self.url):
                pipe = self.redis.pipeline(transaction=False)
                for keys, args in decision_calls(self.keys, decisions):
                    self._save(keys=keys, args=args, client=pipe)
                pipe.execute()
        except Exception as exc:
            log.warning("decisions not recorded", extra={"n": len(decisions), "error": str(exc)})

    def explain(self, request_id: str) -> Explained:
        """The request's decision; ``NotFound`` for an unknown (or expired) id."""
        lane = lane_of(request_id)
        with store_errors(self.url):
            raw = self.redis.hmget(
                self.keys.request(request_id), "state", "route", "deadline", "decision", "decisions"
            )
        state, route, deadline, decision, count = (None if v is None else v.decode() for v in raw)
        if state is None:
            raise NotFound(request_id)
        return Explained(
            id=request_id,
            lane=lane,
            state=state,
            route=route or None,
            deadline=float(deadline or 0.0),
            decision=Decision.model_validate_json(decision) if decision else None,
            decisions=int(count or 0),
        )
