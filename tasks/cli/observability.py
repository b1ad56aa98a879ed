"""What the operations tools read: one snapshot of the service, and a health verdict.

``mixbatch top``, ``mixbatch top --json`` and the Prometheus endpoint (``tasks.cli.metrics``) all
render the same ``Snapshot``, so the numbers a person watches are the numbers that alert.
Everything in it is read from Redis on each call: counters live in the lanes' ``counts``
hashes and the cost ledger, so they survive worker restarts and agree across processes.

Where each number comes from:

    lane depth, delayed, leased      ZCARD of the lane's queue, delayed and leases sets
    oldest age, min slack            head of the queue-age set; head of the queue (by deadline)
    per state                        the lane's ``counts`` hash, one field per state
    finished by route and outcome    ``counts`` fields ``route:<route>:<outcome>`` (settle.lua);
                                     ``none`` is a request that never got a route
    deadline misses                  ``counts`` field ``deadline_misses`` (settle.lua)
    provider batches in flight       the batch registry's in-flight index
    cost and savings                 the ledger of ``routing.store.ledger``
    last sweep                       the heartbeat ``mixbatch.sweep`` writes on each run
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pydantic import BaseModel

from config.queues import SERVICE_QUEUES
from routing.errors import ConfigError, MixbatchError, NotFound
from routing.models import LaneSpec, LaneStats
from routing.states import FINISHED, State
from routing.store.base import store_errors
from routing.store.batches import BatchRecord, BatchRegistry
from routing.store.lanes import LaneStore

__all__ = [
    "BatchView",
    "Check",
    "Health",
    "LaneView",
    "Observer",
    "Snapshot",
    "check_health",
    "lane_view",
    "parse_counts",
]

STATES = tuple(s.value for s in State)
OUTCOMES = tuple(sorted(s.value for s in FINISHED))
#: A batch record's identity never changes, but its status does; re-read it this often.
BATCH_REFRESH_S = 10.0


class LaneView(BaseModel):
    lane: str
    priority: int
    depth: int
    delayed: int
    leased: int
    oldest_age_s: float | None
    min_slack_s: float | None
    #: requests in each state now (a gauge; ``delivered`` only grows until results expire)
    states: dict[str, int]
    #: route -> outcome -> requests finished that way, ever (a counter)
    finished: dict[str, dict[str, int]]
    submitted_total: int
    retries_total: int
    deadline_misses: int
    dead_letters: int

    @property
    def finished_total(self) -> int:
        return sum(n for outcomes in self.finished.values() for n in outcomes.values())


class BatchView(BaseModel):
    key: str
    provider: str
    batch_id: str | None
    state: str
    endpoint: str
    model: str
    lines: int
    lanes: list[str]
    submitted_at: float | None
    last_status: str | None
    polls: int
    tightest_deadline: float | None


class CostView(BaseModel):
    cost_usd: float
    saved_usd: float
    requests: int


class Snapshot(BaseModel):
    at: float
    lanes: list[LaneView]
    batches: list[BatchView]
    batch_intents: int
    staged: int
    costs_by_route: dict[str, CostView]
    cost_usd_total: float
    saved_usd_total: float
    dead_letters: int
    last_sweep_at: float | None


def parse_counts(
    counts: Mapping[str, int],
) -> tuple[dict[str, int], dict[str, dict[str, int]], dict[str, int]]:
    """Split a lane's ``counts`` hash into states now, finished by route, and plain totals."""
    states = {s: int(counts.get(s, 0)) for s in STATES}
    finished: dict[str, dict[str, int]] = {}
    totals: dict[str, int] = {}
    for field, value in counts.items():
        kind, _, rest = field.partition(":")
        if kind == "route" and rest:
            route, _, outcome = rest.rpartition(":")
            if route and outcome:
                finished.setdefault(route, {})[outcome] = int(value)
        elif field not in states:
            totals[field] = int(value)
    return states, finished, totals


def lane_view(spec: LaneSpec, stats: LaneStats) -> LaneView:
    """One lane's numbers from its ``LaneStats`` (pure: the tests feed it tables)."""
    states, finished, totals = parse_counts(stats.counts)
    return LaneView(
        lane=spec.name,
        priority=spec.priority,
        depth=stats.depth,
        delayed=stats.delayed,
        leased=stats.leased,
        oldest_age_s=stats.oldest_age_s,
        min_slack_s=stats.nearest_deadline_s,
        states=states,
        finished=finished,
        submitted_total=totals.get("submitted_total", 0),
        retries_total=totals.get("retries_total", 0),
        deadline_misses=totals.get("deadline_misses", 0),
        dead_letters=totals.get("dead_letters", 0),
    )


def _batch_view(record: BatchRecord) -> BatchView:
    deadline = record.tightest_deadline
    return BatchView(
        key=record.key,
        provider=record.provider,
        batch_id=record.batch_id,
        state=record.state,
        endpoint=record.endpoint,
        model=record.model,
        lines=record.lines,
        lanes=record.lanes,
        submitted_at=record.submitted_at,
        last_status=record.last_status,
        polls=record.polls,
        tightest_deadline=None if deadline == float("inf") else deadline,
    )


class Observer:
    """Reads snapshots for one process (a ``top`` session, a metrics endpoint).

    Batch records carry every member and can be megabytes, so each is read when first seen
    and then at most every ``BATCH_REFRESH_S``; the rest is a handful of pipelined reads.
    ``lanes`` defaults to the lanes table the workers published, so a metrics process with
    another lanes file still reports what the service really runs.
    """

    def __init__(
        self,
        store: LaneStore,
        *,
        lanes: Callable[[], Sequence[LaneSpec]] | None = None,
        fallback_lanes: Callable[[], Sequence[LaneSpec]] | None = None,
    ) -> None:
        self.store = store
        self.registry = BatchRegistry(store.redis, namespace=store.keys.ns, url=store.url)
        self._lanes = lanes
        self._fallback = fallback_lanes
        self._batches: dict[str, tuple[float, BatchView]] = {}

    def lanes(self) -> Sequence[LaneSpec]:
        if self._lanes is not None:
            return self._lanes()
        published = self.store.load_config()
        if published is not None:
            return published.lanes
        if self._fallback is not None:
            return self._fallback()
        raise ConfigError(
            "no lanes table published in Redis yet: start a worker (or `mixbatch up`) first"
        )

    def _batch_views(self, now: float) -> list[BatchView]:
        keys = self.registry.inflight()
        live = set(keys)
        for gone in set(self._batches) - live:
            del self._batches[gone]
        out = []
        for key in keys:
            cached = self._batches.get(key)
            if cached is None or now - cached[0] >= BATCH_REFRESH_S:
                try:
                    view = _batch_view(self.registry.get(key))
                except NotFound:
                    continue
                cached = (now, view)
                self._batches[key] = cached
            out.append(cached[1])
        return out

    def snapshot(self, now: float | None = None) -> Snapshot:
        from routing.store.ledger import totals

        now = time.time() if now is None else now
        specs = sorted(self.lanes(), key=lambda s: -s.priority)
        views = [lane_view(spec, self.store.lane_stats(spec.name, now=now)) for spec in specs]
        batches = self._batch_views(now)
        dead = self.store.dlq.count()
        staged = sum(g.count for g in self.registry.groups())
        ledger = totals(self.store)
        routes = {
            name: CostView(
                cost_usd=row.get("cost", 0.0),
                saved_usd=row.get("saved", 0.0),
                requests=int(row.get("count", 0)),
            )
            for name, row in ledger.get("route", {}).items()
        }
        everything = ledger.get("all", {}).get("all", {})
        return Snapshot(
            at=now,
            lanes=views,
            batches=batches,
            batch_intents=self.registry.counts()["intents"],
            staged=staged,
            costs_by_route=routes,
            cost_usd_total=everything.get("cost", 0.0),
            saved_usd_total=everything.get("saved", 0.0),
            dead_letters=dead,
            last_sweep_at=self.store.last_beat("sweep"),
        )


# -- health ----------------------------------------------------------------------------------


class Check(BaseModel):
    name: str
    ok: bool
    detail: str


class Health(BaseModel):
    ok: bool
    checks: list[Check]

    @property
    def redis_ok(self) -> bool:
        return all(c.ok for c in self.checks if c.name == "redis")

    def reason(self) -> str:
        return "; ".join(f"{c.name}: {c.detail}" for c in self.checks if not c.ok)


def _workers_check(
    url: str, timeout_s: float, transport_options: dict[str, Any] | None = None
) -> Check:
    """Every service queue needs a worker that answers, or its requests would wait forever.

    ``transport_options``: what the broker needs besides its URL (a ``sentinel://`` broker's
    ``master_name``; without it kombu refuses to broadcast and no worker could ever answer)."""
    from celery import Celery

    pinger = Celery("mixbatch-health", broker=url, set_as_current=False)
    if transport_options:
        pinger.conf.broker_transport_options = transport_options
    try:
        replies: dict[str, Any] = pinger.control.inspect(timeout=timeout_s).active_queues() or {}
    except Exception as exc:  # the broker dropped mid-broadcast: report it, never crash
        return Check(name="workers", ok=False, detail=f"inspect failed: {exc}")
    finally:
        pinger.close()
    if not replies:
        return Check(
            name="workers",
            ok=False,
            detail=f"no worker answered within {timeout_s:g}s (is `celery -A config worker` running?)",
        )
    served = {q["name"] for queues in replies.values() for q in queues or ()}
    missing = [q for q in SERVICE_QUEUES if q not in served]
    names = ", ".join(sorted(replies))
    if missing:
        return Check(
            name="workers",
            ok=False,
            detail=f"no worker consumes {', '.join(missing)} (answering: {names})",
        )
    return Check(name="workers", ok=True, detail=f"{len(replies)} answering: {names}")


def _beat_check(store: LaneStore, sweep_interval_s: float, now: float) -> Check:
    """Beat is alive when ``mixbatch.sweep`` ran lately (so a worker ran what beat sent, too)."""
    stale_after = 3 * sweep_interval_s
    last = store.last_beat("sweep")
    if last is None:
        return Check(
            name="beat",
            ok=False,
            detail="no sweep has run yet (is `celery -A config beat` running?)",
        )
    age = now - last
    if age > stale_after:
        return Check(
            name="beat",
            ok=False,
            detail=f"last sweep {age:.0f}s ago, stale after {stale_after:g}s "
            "(is `celery -A config beat` running?)",
        )
    return Check(name="beat", ok=True, detail=f"last sweep {max(age, 0.0):.1f}s ago")


def _no_redis(detail: str) -> Health:
    return Health(
        ok=False,
        checks=[
            Check(name="redis", ok=False, detail=detail),
            Check(name="workers", ok=False, detail="not checked: no Redis"),
            Check(name="beat", ok=False, detail="not checked: no Redis"),
        ],
    )


def check_health(
    url: Callable[[], str],
    *,
    namespace: str,
    sweep_interval_s: float,
    timeout_s: float,
    now: float | None = None,
    broker: Callable[[], str] | None = None,
    broker_options: Callable[[], dict[str, Any]] | None = None,
) -> Health:
    """Redis answers, every service queue has a live worker, and beat's sweep is recent.

    ``url`` is a callable so that "no Redis configured and none embedded running" is reported
    as the Redis check failing (with the reason), like any other outage. ``broker`` and
    ``broker_options``: Celery's broker when it is not the store (``Settings.broker_url`` and
    ``broker_transport_options``: a Sentinel broker's master name).
    """
    try:
        resolved = url()
        store = LaneStore.from_url(resolved, namespace=namespace)
    except MixbatchError as exc:
        return _no_redis(str(exc))
    try:
        with store_errors(store.url):
            store.redis.ping()
        checks = [
            Check(name="redis", ok=True, detail="PING answered"),
            _workers_check(
                broker() if broker else resolved,
                timeout_s,
                broker_options() if broker_options else None,
            ),
            _beat_check(store, sweep_interval_s, time.time() if now is None else now),
        ]
    except MixbatchError as exc:
        return _no_redis(str(exc))
    finally:
        store.close()
    return Health(ok=all(c.ok for c in checks), checks=checks)
