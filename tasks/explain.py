"""Wiring of the learned route choice: the options with what was observed, and the record of
each request's decision that ``mixbatch explain`` reads back.

The decision logic is pure (``routing.decide.route``, ``routing.decide.estimates``); what tasks
record (batch turnarounds, realtime latency and headroom, GPU throughput) goes to
``tasks.runtime.observations()``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from config.settings import get_settings
from routing.decide.options import RouteOptions
from routing.decide.route import Decision
from routing.engine.aggregate import record_decisions as keep_decisions
from tasks.runtime import decisions, observations, route_options, warned_models


def learned_options(now: float | None = None) -> RouteOptions:
    """``route_options()`` with the learned estimates, re-read every ``route_refresh_s``."""
    now = time.time() if now is None else now
    return observations().learned(route_options(), now, get_settings().route_refresh_s)


def record_decisions(chosen: Mapping[str, Decision]) -> None:
    """Keep each request's decision for ``explain``; a missing price is logged once per model."""
    keep_decisions(decisions(), chosen, warned_models())
