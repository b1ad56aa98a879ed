"""Per-process handles shared by the tasks: settings, the lane store, provider adapters."""

from __future__ import annotations

import functools
import logging
import threading

from celery import signals

from config.providers import batch_turnarounds, capability, check_accounts, provider_account
from config.settings import get_settings
from routing.decide.backoff import RetryPolicy
from routing.decide.route import RouteOptions
from routing.errors import ConfigError
from routing.models import ServiceConfig
from routing.providers import RealtimeAdapter, adapter_for
from routing.providers.batch import BatchAdapter, batch_adapter_for
from routing.store.batches import BatchRegistry
from routing.store.lanes import LaneStore

_lock = threading.Lock()


@functools.cache
def store() -> LaneStore:
    s = get_settings()
    return LaneStore.from_url(s.broker_url(), namespace=s.namespace, result_ttl_s=s.result_ttl_s)


@functools.cache
def service_config() -> ServiceConfig:
    return get_settings().service_config()


@functools.cache
def retry_policy() -> RetryPolicy:
    s = get_settings()
    return RetryPolicy(max_tries=s.realtime_max_tries, base_s=s.retry_base_s, cap_s=s.retry_cap_s)


@functools.cache
def route_options() -> RouteOptions:
    s = get_settings()
    from tasks.explain import route_settings  # learned route choice: quantile, margins, prices

    return RouteOptions(
        batch_turnaround_s=batch_turnarounds(s),
        margin_s=s.batch_margin_s,
        hedge_margin_s=s.hedge_margin_s,
        realtime_estimate_s=s.realtime_estimate_s,
        local_models=_local_models(),
        **route_settings(s),
    )


def _local_models() -> frozenset[str]:
    from tasks.gpu import served_models

    return served_models()


@functools.cache
def registry() -> BatchRegistry:
    s = get_settings()
    st = store()
    return BatchRegistry(st.redis, namespace=s.namespace, url=st.url)


_adapters: dict[str, RealtimeAdapter] = {}
_batch_adapters: dict[str, BatchAdapter] = {}


def adapter(provider: str) -> RealtimeAdapter:
    with _lock:
        if provider not in _adapters:
            _adapters[provider] = adapter_for(provider_account(get_settings(), provider))
        return _adapters[provider]


def batch_adapter(provider: str) -> BatchAdapter:
    with _lock:
        if provider not in _batch_adapters:
            s = get_settings()
            cap = capability(s, provider)
            if s.batch_max_lines is not None:
                cap = cap.model_copy(update={"max_lines": min(cap.max_lines, s.batch_max_lines)})
            _batch_adapters[provider] = batch_adapter_for(provider_account(s, provider), cap)
        return _batch_adapters[provider]


def reset() -> None:
    """Drop per-process handles: after fork, and between tests."""
    with _lock:
        for a in _adapters.values():
            a.close()
        for b in _batch_adapters.values():
            b.close()
        _adapters.clear()
        _batch_adapters.clear()
    store.cache_clear()
    registry.cache_clear()
    route_options.cache_clear()
    service_config.cache_clear()
    retry_policy.cache_clear()


@signals.worker_process_init.connect
def _after_fork(**_: object) -> None:
    _adapters.clear()
    _batch_adapters.clear()
    store.cache_clear()
    registry.cache_clear()


@signals.worker_init.connect
def _check_accounts(**_: object) -> None:
    """Refuse to start without the keys of the configured accounts (the error names the variable).

    Celery logs and swallows exceptions from signal handlers, so the worker is stopped with
    ``SystemExit`` after the error is logged.
    """
    try:
        check_accounts(get_settings())
    except ConfigError as exc:
        logging.getLogger(__name__).critical("cannot start: %s", exc)
        raise SystemExit(2) from None


@signals.worker_ready.connect
def _publish_config(**_: object) -> None:
    """Producers read the lanes table from Redis; publish ours when a worker comes up."""
    store().publish_config(service_config())
