"""Per-process handles shared by the tasks: settings, the lane store, provider adapters."""

from __future__ import annotations

import functools
import threading

from celery import signals

from config.providers import provider_accounts
from config.settings import get_settings
from routing.backoff import RetryPolicy
from routing.models import ServiceConfig
from routing.providers import RealtimeAdapter, adapter_for
from routing.store import LaneStore

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


_adapters: dict[str, RealtimeAdapter] = {}


def adapter(provider: str) -> RealtimeAdapter:
    with _lock:
        if provider not in _adapters:
            _adapters[provider] = adapter_for(provider_accounts(get_settings())[provider])
        return _adapters[provider]


def reset() -> None:
    """Drop per-process handles: after fork, and between tests."""
    with _lock:
        for a in _adapters.values():
            a.close()
        _adapters.clear()
    store.cache_clear()
    service_config.cache_clear()
    retry_policy.cache_clear()


@signals.worker_process_init.connect
def _after_fork(**_: object) -> None:
    _adapters.clear()
    store.cache_clear()


@signals.worker_ready.connect
def _publish_config(**_: object) -> None:
    """Producers read the lanes table from Redis; publish ours when a worker comes up."""
    store().publish_config(service_config())
