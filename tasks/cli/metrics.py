"""The Prometheus endpoint: ``mixbatch metrics --port N``, or inside every worker.

Nothing is counted in process memory. A custom collector reads Redis on each scrape (the
lanes' ``counts`` hashes, the batch registry, the cost ledger; see ``tasks.cli.observability``),
so the counters survive worker restarts and every process serving the endpoint reports the
same numbers. Scrape one of them: several endpoints show the same totals, not shares.

Worker option: with ``MIXBATCH_WORKER_METRICS_PORT`` set, a worker checks the port at start
(refusing to start, with one sentence, when it is taken) and serves the endpoint from its main
process once ready. This module must be imported by the worker for that (it is in the Celery
``include`` list); ``celery -A tasks.cli.metrics worker`` works too.

Families (``_total`` ones are counters):

    mixbatch_redis_up                               1 when the last scrape could read Redis
    mixbatch_lane_depth{lane}                       queued requests
    mixbatch_lane_delayed{lane}                     waiting to retry
    mixbatch_lane_leased{lane}                      claimed or running, under a lease
    mixbatch_lane_oldest_age_seconds{lane}          age of the oldest queued request (0: empty)
    mixbatch_lane_min_slack_seconds{lane}           nearest deadline minus now (absent: empty)
    mixbatch_lane_requests{lane,state}              requests in each state now
    mixbatch_requests_submitted_total{lane}
    mixbatch_requests_total{lane,route,status}      finished: done, failed, expired, cancelled
    mixbatch_retries_total{lane}
    mixbatch_deadline_misses_total{lane}            finished after their deadline
    mixbatch_delivery_dead_letters_total{lane}
    mixbatch_dead_letters                           in the dead-letter list now
    mixbatch_provider_batches_in_flight{provider}
    mixbatch_batch_intents                          recorded, not yet confirmed by the provider
    mixbatch_batch_staged_requests                  waiting in a group for their batch
    mixbatch_cost_usd_total{route}                 by the tier that answered: batch, flex, realtime,
                                                    priority, gpu
    mixbatch_saved_usd_total                        what the batch route saved against realtime
    mixbatch_last_sweep_timestamp_seconds           when ``mixbatch.sweep`` last ran
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from celery import signals
from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from config import app
from config.ops import check_port, get_ops_settings
from routing.errors import ConfigError, MixbatchError
from tasks.cli.observability import Observer, Snapshot

__all__ = [
    "MixbatchCollector",
    "app",
    "build_registry",
    "families",
    "render_text",
    "serve",
]

log = logging.getLogger(__name__)


def families(snap: Snapshot, providers: Iterable[str] = ()) -> list[Metric]:
    """The metric families of one snapshot (pure, so it is tested without a server).

    ``providers`` are always reported, with 0 batches when none is in flight, so an alert on
    ``mixbatch_provider_batches_in_flight`` never sees a missing series.
    """
    depth = GaugeMetricFamily("mixbatch_lane_depth", "Queued requests.", labels=["lane"])
    delayed = GaugeMetricFamily(
        "mixbatch_lane_delayed", "Requests waiting to retry.", labels=["lane"]
    )
    leased = GaugeMetricFamily(
        "mixbatch_lane_leased", "Requests claimed or running, under a lease.", labels=["lane"]
    )
    oldest = GaugeMetricFamily(
        "mixbatch_lane_oldest_age_seconds",
        "Age of the oldest queued request; 0 when the lane is empty.",
        labels=["lane"],
    )
    slack = GaugeMetricFamily(
        "mixbatch_lane_min_slack_seconds",
        "Nearest deadline of a queued request minus now (negative: overdue); absent when empty.",
        labels=["lane"],
    )
    in_state = GaugeMetricFamily(
        "mixbatch_lane_requests", "Requests in each state now.", labels=["lane", "state"]
    )
    submitted = CounterMetricFamily(
        "mixbatch_requests_submitted_total", "Requests accepted into the lane.", labels=["lane"]
    )
    finished = CounterMetricFamily(
        "mixbatch_requests_total",
        "Finished requests by route (batch, flex, realtime, priority, gpu; none: never routed) "
        "and outcome.",
        labels=["lane", "route", "status"],
    )
    retries = CounterMetricFamily(
        "mixbatch_retries_total", "Requests put back in their lane to retry.", labels=["lane"]
    )
    misses = CounterMetricFamily(
        "mixbatch_deadline_misses_total",
        "Requests that finished after their deadline.",
        labels=["lane"],
    )
    dead_total = CounterMetricFamily(
        "mixbatch_delivery_dead_letters_total",
        "Deliveries given up on (see `mixbatch dlq list`).",
        labels=["lane"],
    )
    for lane in snap.lanes:
        name = [lane.lane]
        depth.add_metric(name, lane.depth)
        delayed.add_metric(name, lane.delayed)
        leased.add_metric(name, lane.leased)
        oldest.add_metric(name, max(lane.oldest_age_s or 0.0, 0.0))
        if lane.min_slack_s is not None:
            slack.add_metric(name, lane.min_slack_s)
        for state, n in lane.states.items():
            in_state.add_metric([lane.lane, state], n)
        submitted.add_metric(name, lane.submitted_total)
        for route, outcomes in sorted(lane.finished.items()):
            for status, n in sorted(outcomes.items()):
                finished.add_metric([lane.lane, route, status], n)
        retries.add_metric(name, lane.retries_total)
        misses.add_metric(name, lane.deadline_misses)
        dead_total.add_metric(name, lane.dead_letters)

    per_provider = dict.fromkeys(providers, 0)
    for batch in snap.batches:
        per_provider[batch.provider] = per_provider.get(batch.provider, 0) + 1
    inflight = GaugeMetricFamily(
        "mixbatch_provider_batches_in_flight",
        "Provider batches submitted and not yet collected.",
        labels=["provider"],
    )
    for provider, n in sorted(per_provider.items()):
        inflight.add_metric([provider], n)

    cost = CounterMetricFamily(
        "mixbatch_cost_usd_total",
        "Spend priced from the providers' usage (config/prices.toml).",
        labels=["route"],
    )
    for route, row in sorted(snap.costs_by_route.items()):
        cost.add_metric([route], row.cost_usd)
    out: list[Metric] = [
        depth, delayed, leased, oldest, slack, in_state, submitted, finished, retries, misses,
        dead_total, inflight, cost,
        CounterMetricFamily(
            "mixbatch_saved_usd_total",
            "What the batch route saved against synchronous prices.",
            value=snap.saved_usd_total,
        ),
        GaugeMetricFamily(
            "mixbatch_dead_letters", "Entries in the dead-letter list now.", value=snap.dead_letters
        ),
        GaugeMetricFamily(
            "mixbatch_batch_intents",
            "Batches recorded before create and not yet confirmed.",
            value=snap.batch_intents,
        ),
        GaugeMetricFamily(
            "mixbatch_batch_staged_requests",
            "Requests waiting in a group for their provider batch.",
            value=snap.staged,
        ),
    ]  # fmt: skip
    if snap.last_sweep_at is not None:
        out.append(
            GaugeMetricFamily(
                "mixbatch_last_sweep_timestamp_seconds",
                "Unix time mixbatch.sweep last ran (beat and a worker are alive).",
                value=snap.last_sweep_at,
            )
        )
    return out


class MixbatchCollector:
    """Reads a fresh snapshot on every scrape; a Redis outage is ``mixbatch_redis_up 0``.

    An exception escaping ``collect`` would turn the whole scrape into an HTTP 500 and hide
    *why*; reporting ``redis_up`` keeps the endpoint answering and alertable.
    """

    def __init__(
        self, observer: Callable[[], Observer], providers: Callable[[], Sequence[str]]
    ) -> None:
        self._observer = observer
        self._providers = providers
        self._lock = threading.Lock()

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("mixbatch_redis_up", "1 when this scrape could read Redis.")
        with self._lock:
            try:
                snap = self._observer().snapshot()
            except MixbatchError as exc:
                log.warning("metrics scrape failed", extra={"error": str(exc)})
                up.add_metric([], 0)
                yield up
                return
        up.add_metric([], 1)
        yield up
        yield from families(snap, self._providers())


def _default_observer() -> Observer:
    from tasks.runtime import service_config, store

    return Observer(store(), fallback_lanes=lambda: service_config().lanes)


def _default_providers() -> Sequence[str]:
    from config.settings import get_settings

    return get_settings().providers


def build_registry(
    observer: Callable[[], Observer] | None = None,
    providers: Callable[[], Sequence[str]] | None = None,
) -> CollectorRegistry:
    """A registry holding only mixbatch's collector (not the process's default metrics)."""
    made: list[Observer] = []

    def lazy() -> Observer:
        # One Observer per registry, built on the first scrape (so a server can start before
        # Redis answers) and kept, so its cache of batch records outlives a scrape.
        if not made:
            made.append(_default_observer())
        return made[0]

    registry = CollectorRegistry()
    registry.register(MixbatchCollector(observer or lazy, providers or _default_providers))
    return registry


def render_text(registry: CollectorRegistry) -> str:
    """The exposition text a scrape would get (``mixbatch metrics --once``)."""
    return generate_latest(registry).decode()


def serve(address: str, port: int, registry: CollectorRegistry, variable: str) -> Any:
    """Start the HTTP endpoint in a daemon thread; a taken port is a ``ConfigError``."""
    check_port(address, port, variable)
    try:
        server, _thread = start_http_server(port, addr=address, registry=registry)
    except OSError as exc:
        raise ConfigError(
            f"{variable}: cannot listen on {address}:{port} ({exc.strerror}); pick another port"
        ) from None
    return server


# -- the worker option -----------------------------------------------------------------------

_server: list[Any] = []


@signals.worker_init.connect
def _check_worker_port(**_: object) -> None:
    """Refuse to start a worker whose metrics port is taken: say so once, exit 2.

    Celery logs and swallows exceptions from signal handlers, so a ``ConfigError`` alone would
    leave a worker running without its endpoint; ``SystemExit`` is not swallowed.
    """
    try:
        ops = get_ops_settings()
        if ops.worker_metrics_port is not None:
            check_port(ops.metrics_address, ops.worker_metrics_port, "MIXBATCH_WORKER_METRICS_PORT")
    except ConfigError as exc:
        log.error("worker refused to start: %s", exc)
        raise SystemExit(2) from None


@signals.worker_ready.connect
def _serve_from_worker(**_: object) -> None:
    """Serve from the worker's main process, after the pool has forked (no thread to copy)."""
    ops = get_ops_settings()
    if ops.worker_metrics_port is None or _server:
        return
    _server.append(
        serve(
            ops.metrics_address,
            ops.worker_metrics_port,
            build_registry(),
            "MIXBATCH_WORKER_METRICS_PORT",
        )
    )
    log.info(
        "metrics endpoint up",
        extra={"address": ops.metrics_address, "port": ops.worker_metrics_port},
    )


@signals.worker_shutdown.connect
def _stop_serving(**_: object) -> None:
    while _server:
        server = _server.pop()
        server.shutdown()
        server.server_close()
