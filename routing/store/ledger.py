"""The cost ledger: what finished requests cost and what the batch route saved, in Redis.

Totals are kept by lane, tenant, spend tag and route, in one hash, so a fresh process (or the
metrics server) reads the same numbers. They are added only by the call whose ``finish`` won,
so a repeated message never counts a request twice. ``mixbatch costs`` prints them.

Spend tags come from producers' metadata, so their number is capped (``MAX_COST_TAGS``): past
it, a new tag's amounts are added to ``tag:other`` (one script, ``ledger_add``, so two workers
cannot both take the last place).

The same script adds each route's amounts to the hour's own hash (``Keys.ledger_hour``), kept
``HOUR_TTL_S``, so ``mixbatch costs --plot`` draws spend over time without the ledger growing.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from pydantic import BaseModel

from routing.models import Prepared, Route
from routing.store.base import dumps, store_errors
from routing.store.lanes import LaneStore

#: Distinct ``tag:KEY=VALUE`` rows the ledger keeps; later new tags are summed as ``tag:other``.
MAX_COST_TAGS = 1000
#: Totals kept for each field of the ledger (its other fields are its own bookkeeping).
_MEASURES = ("cost", "saved", "count")
#: How long an hour's totals by route are kept: the longest series ``series`` can return.
HOUR_TTL_S = 31 * 86400


class Cost(BaseModel):
    """One finished request's price; stored with its result and added to the totals."""

    cost_usd: float
    saved_usd: float
    estimated_usd: float
    priced: bool


def record(store: LaneStore, request: Prepared, route: Route, cost: Cost) -> None:
    """Add a finished request to the totals (call once, after its finish succeeded)."""
    record_many(store, [(request, route, cost)])


def record_many(
    store: LaneStore, entries: Sequence[tuple[Prepared, Route, Cost]], *, at: float | None = None
) -> None:
    """Add many finished requests, summed per field first: one script. ``at`` (now when None)
    picks the hour they are counted in."""
    sums: dict[str, list[float]] = {}
    for request, route, cost in entries:
        fields = [f"lane:{request.lane}", f"tenant:{request.tenant}", f"route:{route.value}", "all"]
        fields += [f"tag:{k}={v}" for k, v in sorted(request.metadata.items())]
        for f in fields:
            acc = sums.setdefault(f, [0.0, 0.0, 0])
            acc[0] += cost.cost_usd
            acc[1] += cost.saved_usd
            acc[2] += 1
    if not sums:
        return
    rows = [[f, repr(cost), repr(saved), str(int(n))] for f, (cost, saved, n) in sums.items()]
    hour = store.keys.ledger_hour(int((time.time() if at is None else at) // 3600))
    with store_errors(store.url):
        store.scripts["ledger_add"](
            keys=[store.keys.ledger(), hour], args=[MAX_COST_TAGS, dumps(rows), HOUR_TTL_S]
        )


def totals(store: LaneStore) -> dict[str, dict[str, dict[str, float]]]:
    """``{"lane": {"bulk": {"cost": .., "saved": .., "count": ..}}, "tenant": ..., ...}``."""
    with store_errors(store.url):
        raw = store.redis.hgetall(store.keys.ledger())
    out: dict[str, dict[str, dict[str, float]]] = {}
    for k, v in raw.items():
        measure, _, field = k.decode().partition("|")
        if measure not in _MEASURES:
            continue
        group, _, name = field.partition(":")
        if field == "all":
            group, name = "all", "all"
        out.setdefault(group, {}).setdefault(name, {"cost": 0.0, "saved": 0.0, "count": 0.0})
        out[group][name][measure] = float(v)
    return out


class HourTotals(BaseModel):
    """One hour's spend, savings and count by route (``"all"``: every route together)."""

    hour_start: float
    routes: dict[str, dict[str, float]]


def series(store: LaneStore, hours: int, *, now: float | None = None) -> list[HourTotals]:
    """The last ``hours`` hours' totals by route, oldest first; hours with nothing left out."""
    last = int((time.time() if now is None else now) // 3600)
    first = last - min(hours, HOUR_TTL_S // 3600) + 1
    with store_errors(store.url):
        pipe = store.redis.pipeline(transaction=False)
        for hour in range(first, last + 1):
            pipe.hgetall(store.keys.ledger_hour(hour))
        raw = pipe.execute()
    out: list[HourTotals] = []
    for hour, fields in zip(range(first, last + 1), raw, strict=True):
        routes: dict[str, dict[str, float]] = {}
        for k, v in fields.items():
            measure, _, field = k.decode().partition("|")
            name = field.removeprefix("route:")
            routes.setdefault(name, {"cost": 0.0, "saved": 0.0, "count": 0.0})[measure] = float(v)
        if routes:
            out.append(HourTotals(hour_start=hour * 3600.0, routes=routes))
    return out
