"""The aggregator's steps: route claimed requests, group them per task, keep each decision.

The route of each request comes from ``routing.decide.route`` (pure); what is added here is the
grouping into messages and the record ``mixbatch explain`` reads back.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import TypeVar

from routing.decide.options import RouteOptions
from routing.decide.route import Decision, choose_routes, group_key
from routing.models import Claimed, LaneSpec
from routing.store.observations import DecisionStore

log = logging.getLogger(__name__)

#: (route, provider, model): requests sharing it can share a task.
GroupKey = tuple[str, str, str]
T = TypeVar("T")


def route_claimed(
    claimed: Sequence[Claimed], now: float, options: RouteOptions
) -> tuple[dict[str, Decision], dict[GroupKey, list[Claimed]]]:
    """Each request's decision, and the requests grouped by where they go."""
    chosen = choose_routes({c.id: c.request for c in claimed}, now, options)
    groups: dict[GroupKey, list[Claimed]] = defaultdict(list)
    for c in claimed:
        groups[group_key(c.request, chosen[c.id])].append(c)
    return chosen, dict(groups)


def record_decisions(
    decisions: DecisionStore, chosen: Mapping[str, Decision], warned: set[str]
) -> None:
    """Keep each request's decision for ``explain``; log a missing price once per model.

    ``warned`` is the process's set of models already logged, so a backlog of one unpriced
    model logs one line, not one per request.
    """
    for decision in chosen.values():
        if decision.warnings and decision.model not in warned:
            warned.add(decision.model)
            log.warning(
                "no price for a model; routed on deadline alone",
                extra={"model": decision.model, "warning": decision.warnings[0]},
            )
    decisions.save_many(chosen)


def lane_ranks(lanes: Sequence[LaneSpec]) -> dict[str, int]:
    """Celery message priority (0 first, 9 last) of each lane, most urgent lanes first."""
    return {spec.name: min(i * 3, 9) for i, spec in enumerate(lanes)}


def chunks(items: Sequence[T], size: int) -> list[list[T]]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]
