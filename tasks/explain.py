"""Wiring of the learned route choice: the options with what was observed, and the record of
each request's decision that ``mixbatch explain`` reads back.

The decision logic is pure (``routing.decide.route``, ``routing.decide.estimates``); what tasks
record (batch turnarounds, realtime latency and headroom, GPU throughput) goes to
``tasks.runtime.observations()``. The providers table adds its tiers (flex, priority opt-ins)
and batch minimums, the lanes table its priority opt-ins, and the batch registry the size of
each waiting group (size-aware batching).
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from config.providers import capabilities
from config.settings import get_settings
from routing.decide.options import RouteOptions
from routing.decide.route import Decision
from routing.engine.aggregate import record_decisions as keep_decisions
from routing.providers.capabilities import tier_options
from routing.store.batches import split_group_id
from tasks.runtime import (
    _once,
    decisions,
    hedges,
    observations,
    registry,
    route_options,
    service_config,
    warned_models,
)


def tiered_options() -> RouteOptions:
    """``route_options()`` with the providers table's tiers and the lanes' priority opt-ins."""

    def build() -> RouteOptions:
        lanes = frozenset(spec.name for spec in service_config().lanes if spec.priority_tier)
        tiers = tier_options(capabilities(get_settings()))
        return route_options().model_copy(update={**tiers, "priority_lanes": lanes})

    return _once("tiered_options", build)


def learned_options(now: float | None = None) -> RouteOptions:
    """The options with the learned estimates (re-read every ``route_refresh_s``) and the lines
    waiting in each batch group now."""
    now = time.time() if now is None else now
    refresh = get_settings().route_refresh_s
    learned = hedges().learned(observations().learned(tiered_options(), now, refresh), now, refresh)
    waiting = {"|".join(split_group_id(g.gid)): g.count for g in registry().groups()}
    return learned.model_copy(update={"batch_waiting": waiting}) if waiting else learned


def record_decisions(chosen: Mapping[str, Decision]) -> None:
    """Keep each request's decision for ``explain``; a missing price is logged once per model."""
    keep_decisions(decisions(), chosen, warned_models())
