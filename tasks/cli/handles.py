"""The settings, client and store a command uses, built from this invocation's environment
(never a cached one from another run), with a bad ``MIXBATCH_*`` variable named in one line."""

from __future__ import annotations

from typing import Any

from routing.decide.tables import settings_error
from routing.store.lanes import LaneStore
from tasks.cli.observability import Observer


def load_settings() -> Any:
    from pydantic import ValidationError

    from config.settings import get_settings

    try:
        return get_settings()
    except ValidationError as exc:
        raise settings_error(exc) from None


def open_client() -> Any:
    from routing.client import Client

    s = load_settings()
    return Client(s.store_url(), namespace=s.namespace, config=s.service_config())


def open_observer() -> tuple[Observer, LaneStore]:
    """An observer and the store it reads; the caller closes the store."""
    s = load_settings()
    store = LaneStore.from_url(s.store_url(), namespace=s.namespace, result_ttl_s=s.result_ttl_s)
    return Observer(store, fallback_lanes=lambda: s.lanes()), store
