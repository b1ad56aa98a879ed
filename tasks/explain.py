"""Glue of the learned route choice: its settings, the observation store, each request's decision.

The decision logic is pure (``routing.decide.route``, ``routing.decide.estimates``); this module is the edge
the tasks call: ``learned_options()`` (the route options with what has been observed, re-read
every ``MIXBATCH_ROUTE_REFRESH_S``), ``observations()`` (where tasks record batch turnarounds,
realtime latency and rate-limit headroom, and the GPU worker its throughput and queue wait),
``record_decisions()`` (each request's ``Decision``, kept for ``mixbatch explain``).

Settings are read with ``getattr(settings, name, default)`` so this works before
``config/settings.py`` declares them; the defaults are in ``ROUTE_SETTINGS``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

from routing.decide.estimates import check_quantile
from routing.decide.route import Decision, RouteOptions
from routing.store.lanes import LaneStore
from routing.store.observations import DecisionStore, Explained, ObservationStore
from tasks.runtime import route_options, store

log = logging.getLogger(__name__)

#: Settings of the learned route choice (MIXBATCH_ + upper-case name) and their defaults.
ROUTE_SETTINGS: dict[str, Any] = {
    "route_quantile": 0.95,
    "route_min_samples": 5,
    "route_half_life_s": 7200.0,
    "route_fast_margin_s": 5.0,
    "route_refresh_s": 5.0,
    "route_obs_max": 500,
    "route_gpu_max_age_s": 900.0,
    "route_gpu_prior_wait_s": 2.0,
    "route_gpu_prior_texts_per_s": 50.0,
    "route_gpu_overhead_s": 1.0,
    "route_gpu_usd_per_hour": 1.0,
}


def setting(settings: Any, name: str) -> Any:
    return getattr(settings, name, ROUTE_SETTINGS[name])


def route_settings(settings: Any) -> dict[str, Any]:
    """``RouteOptions`` fields from the settings; a bad quantile names its variable."""
    from tasks.costs import prices

    quantile = check_quantile(setting(settings, "route_quantile"), "MIXBATCH_ROUTE_QUANTILE")
    return {
        "quantile": quantile,
        "min_samples": int(setting(settings, "route_min_samples")),
        "half_life_s": float(setting(settings, "route_half_life_s")),
        "fast_margin_s": float(setting(settings, "route_fast_margin_s")),
        # one flush step, and the poll lag before a finished batch is seen
        "batch_overhead_s": settings.batch_flush_interval_s + settings.batch_poll_max_interval_s,
        "prices": prices(),
        "gpu_max_age_s": float(setting(settings, "route_gpu_max_age_s")),
        "gpu_prior_wait_s": float(setting(settings, "route_gpu_prior_wait_s")),
        "gpu_prior_texts_per_s": float(setting(settings, "route_gpu_prior_texts_per_s")),
        "gpu_overhead_s": float(setting(settings, "route_gpu_overhead_s")),
        "gpu_usd_per_hour": float(setting(settings, "route_gpu_usd_per_hour")),
    }


_lock = threading.Lock()
_handles: dict[str, Any] = {}


def _for_store(kind: str, build: Any) -> Any:
    """One handle per ``store()`` instance: a fork or ``common.reset()`` makes a new store."""
    st = store()
    with _lock:
        held = _handles.get(kind)
        if held is None or held[0] is not st:
            held = (st, build(st))
            _handles[kind] = held
        return held[1]


def observations() -> ObservationStore:
    """The observation store of this process (same Redis and namespace as the lanes)."""
    from config.settings import get_settings

    def build(st: LaneStore) -> ObservationStore:
        s = get_settings()
        return ObservationStore(
            st.redis,
            namespace=s.namespace,
            url=st.url,
            max_per_key=int(setting(s, "route_obs_max")),
        )

    found: ObservationStore = _for_store("observations", build)
    return found


def decisions() -> DecisionStore:
    found: DecisionStore = _for_store(
        "decisions", lambda st: DecisionStore(st.redis, st.keys, url=st.url)
    )
    return found


def learned_options(now: float | None = None) -> RouteOptions:
    """``route_options()`` with the learned estimates, re-read every ``route_refresh_s``."""
    from config.settings import get_settings

    refresh = float(setting(get_settings(), "route_refresh_s"))
    return observations().learned(route_options(), time.time() if now is None else now, refresh)


_warned: set[str] = set()


def record_decisions(chosen: Mapping[str, Decision]) -> None:
    """Keep each request's decision for ``explain``; log a missing price once per model."""
    for decision in chosen.values():
        if decision.warnings and decision.model not in _warned:
            _warned.add(decision.model)
            log.warning(
                "no price for a model; routed on deadline alone",
                extra={"model": decision.model, "warning": decision.warnings[0]},
            )
    decisions().save_many(chosen)


def explain(request_id: str) -> Explained:
    """A request's state and latest decision; ``NotFound`` for an unknown id."""
    return decisions().explain(request_id)
