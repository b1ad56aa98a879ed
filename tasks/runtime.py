"""Every per-process handle of the service, built once on first use and kept in one table.

The lane store, batch registry, observation and decision stores, provider adapters, the price
table, the sinks' shared clients, the local models: the tasks ask here and pass what they get to
the engine steps (``routing.engine``), which never build a handle themselves. ``reset()`` drops
(and closes) them between tests; after a fork (``worker_process_init``) the child forgets the
parent's without closing them, so no socket is ever shared between processes.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

from celery import signals

from config import app
from config.providers import batch_turnarounds, capability, check_accounts, provider_account
from config.queues import GPU_QUEUE, SERVICE_QUEUES
from config.settings import Settings, get_settings
from gpu_worker.config import served_models
from routing.decide.backoff import RetryPolicy
from routing.decide.cost import PriceTable, parse_prices
from routing.decide.estimates import check_quantile
from routing.decide.options import RouteOptions
from routing.engine.pricing import price as price_with
from routing.errors import ConfigError
from routing.models import Prepared, Route, ServiceConfig
from routing.providers import RealtimeAdapter, adapter_for
from routing.providers.batch import BatchAdapter, batch_adapter_for
from routing.sinks import SinkContext, get_sink_settings
from routing.store.batches import BatchRegistry
from routing.store.hedges import HedgeStore
from routing.store.lanes import LaneStore
from routing.store.ledger import Cost
from routing.store.observations import DecisionStore, ObservationStore

if TYPE_CHECKING:
    from gpu_worker.registry import Registry

T = TypeVar("T")


class _Closable(Protocol):
    def close(self) -> None: ...


_lock = threading.RLock()
_handles: dict[str, Any] = {}
_closable: list[str] = []


def _once(name: str, build: Callable[[], T], *, closes: bool = False) -> T:
    """The handle ``name``, built by ``build`` the first time; ``closes``: closed by reset."""
    with _lock:
        if name not in _handles:
            _handles[name] = build()
            if closes:
                _closable.append(name)
        return cast(T, _handles[name])


def store() -> LaneStore:
    def build() -> LaneStore:
        s = get_settings()
        return LaneStore.from_url(s.store_url(), namespace=s.namespace, result_ttl_s=s.result_ttl_s)

    return _once("store", build, closes=True)


def service_config() -> ServiceConfig:
    return _once("service_config", lambda: get_settings().service_config())


def retry_policy() -> RetryPolicy:
    s = get_settings()
    return _once(
        "retry_policy",
        lambda: RetryPolicy(
            max_tries=s.realtime_max_tries, base_s=s.retry_base_s, cap_s=s.retry_cap_s
        ),
    )


def prices() -> PriceTable:
    path = get_settings().prices_file
    return _once("prices", lambda: parse_prices(path.read_text(), source=str(path)))


def price(request: Prepared, provider: str, route: Route, usage: Mapping[str, Any] | None) -> Cost:
    """``routing.engine.pricing.price`` with this process's price table."""
    return price_with(prices(), request, provider, route, usage)


def route_settings(settings: Settings) -> dict[str, Any]:
    """``RouteOptions`` fields of the learned route choice; a bad quantile names its variable."""
    return {
        "quantile": check_quantile(settings.route_quantile, "MIXBATCH_ROUTE_QUANTILE"),
        "min_samples": settings.route_min_samples,
        "accounts": settings.route_accounts,
        "half_life_s": settings.route_half_life_s,
        "fast_margin_s": settings.route_fast_margin_s,
        # one flush step, and the poll lag before a finished batch is seen
        "batch_overhead_s": settings.batch_flush_interval_s + settings.batch_poll_max_interval_s,
        "prices": prices(),
        "gpu_max_age_s": settings.route_gpu_max_age_s,
        "gpu_prior_wait_s": settings.route_gpu_prior_wait_s,
        "gpu_prior_texts_per_s": settings.route_gpu_prior_texts_per_s,
        "gpu_overhead_s": settings.route_gpu_overhead_s,
        "gpu_usd_per_hour": settings.route_gpu_usd_per_hour,
    }


def route_options() -> RouteOptions:
    """The route choice's priors and margins; ``tasks.explain`` adds what was learned."""

    def build() -> RouteOptions:
        s = get_settings()
        return RouteOptions(
            batch_turnaround_s=batch_turnarounds(s),
            margin_s=s.batch_margin_s,
            hedge_margin_s=s.hedge_margin_s,
            realtime_estimate_s=s.realtime_estimate_s,
            local_models=served_models(s.gpu_models_file),
            **route_settings(s),
        )

    return _once("route_options", build)


def registry() -> BatchRegistry:
    def build() -> BatchRegistry:
        st = store()
        return BatchRegistry(st.redis, namespace=st.keys.ns, url=st.url)

    return _once("registry", build)


def observations() -> ObservationStore:
    """Where batch turnarounds, realtime latency and headroom, and GPU throughput are recorded."""

    def build() -> ObservationStore:
        st = store()
        return ObservationStore(
            st.redis, namespace=st.keys.ns, url=st.url, max_per_key=get_settings().route_obs_max
        )

    return _once("observations", build)


def hedges() -> HedgeStore:
    """Hedged requests until judged, and whether their hedges met the deadline."""
    return _once("hedges", lambda: HedgeStore.of(store(), max_per_key=get_settings().route_obs_max))


def decisions() -> DecisionStore:
    def build() -> DecisionStore:
        st = store()
        return DecisionStore(st.redis, st.keys, url=st.url)

    return _once("decisions", build)


def warned_models() -> set[str]:
    """Models whose missing price this process has logged already."""
    return _once("warned_models", set)


def sink_context() -> SinkContext:
    """This process's sinks: one HTTP client, SQL pools and Redis clients, opened lazily."""

    def build() -> SinkContext:
        st = store()
        s = get_settings()
        return SinkContext(
            get_sink_settings(),
            sinks=s.sink_table(),
            redis=st.redis,
            namespace=st.keys.ns,
            celery_app=app,
            reserved_queues=(*SERVICE_QUEUES, GPU_QUEUE),
        )

    return _once("sink_context", build, closes=True)


def adapter(provider: str) -> RealtimeAdapter:
    return _once(
        f"adapter:{provider}",
        lambda: adapter_for(provider_account(get_settings(), provider)),
        closes=True,
    )


def batch_adapter(provider: str) -> BatchAdapter:
    def build() -> BatchAdapter:
        s = get_settings()
        cap = capability(s, provider)
        if s.batch_max_lines is not None:
            cap = cap.model_copy(update={"max_lines": min(cap.max_lines, s.batch_max_lines)})
        return batch_adapter_for(provider_account(s, provider), cap)

    return _once(f"batch_adapter:{provider}", build, closes=True)


def local_models() -> Registry:
    """The local models of a gpu worker, each loaded on first use.

    Imported here, not at the top: ``gpu_worker.registry`` imports torch, which only the gpu
    worker may pay for.
    """
    from gpu_worker.registry import Registry

    s = get_settings()
    return _once(
        "local_models", lambda: Registry.from_file(s.gpu_models_file, s.gpu_device or None)
    )


def reset() -> None:
    """Drop every handle, closing those that hold connections (between tests)."""
    with _lock:
        for name in _closable:
            cast(_Closable, _handles[name]).close()
        _handles.clear()
        _closable.clear()


@signals.worker_process_init.connect
def _after_fork(**_: object) -> None:
    """The child builds its own handles; the parent's sockets and locks stay the parent's."""
    global _lock
    _lock = threading.RLock()
    _handles.clear()
    _closable.clear()


@signals.worker_init.connect
def _check_accounts(**_: object) -> None:
    """Refuse to start without the keys of the configured accounts (the error names the variable),
    or with a mistake in the sinks table (the error names its file and line).

    Celery logs and swallows exceptions from signal handlers, so the worker is stopped with
    ``SystemExit`` after the error is logged.
    """
    try:
        check_accounts(get_settings())
        get_settings().sink_table()
    except ConfigError as exc:
        logging.getLogger(__name__).critical("cannot start: %s", exc)
        raise SystemExit(2) from None


@signals.worker_ready.connect
def _publish_config(**_: object) -> None:
    """Producers read the lanes table from Redis; publish ours when a worker comes up."""
    store().publish_config(service_config())
