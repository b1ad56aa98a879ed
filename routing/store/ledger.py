"""The cost ledger: what finished requests cost and what the batch route saved, in Redis.

Totals are kept by lane, tenant, spend tag and route, in one hash, so a fresh process (or the
metrics server) reads the same numbers. They are added only by the call whose ``finish`` won,
so a repeated message never counts a request twice. ``mixbatch costs`` prints them.

Spend tags come from producers' metadata, so their number is capped (``MAX_COST_TAGS``): past
it, a new tag's amounts are added to ``tag:other`` (one script, ``ledger_add``, so two workers
cannot both take the last place).
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel

from routing.models import Prepared, Route
from routing.store.base import dumps, store_errors
from routing.store.lanes import LaneStore

#: Distinct ``tag:KEY=VALUE`` rows the ledger keeps; later new tags are summed as ``tag:other``.
MAX_COST_TAGS = 1000
#: Totals kept for each field of the ledger (its other fields are its own bookkeeping).
_MEASURES = ("cost", "saved", "count")


class Cost(BaseModel):
    """One finished request's price; stored with its result and added to the totals."""

    cost_usd: float
    saved_usd: float
    estimated_usd: float
    priced: bool


def record(store: LaneStore, request: Prepared, route: Route, cost: Cost) -> None:
    """Add a finished request to the totals (call once, after its finish succeeded)."""
    record_many(store, [(request, route, cost)])


def record_many(store: LaneStore, entries: Sequence[tuple[Prepared, Route, Cost]]) -> None:
    """Add many finished requests, summed per field first: one script."""
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
    with store_errors(store.url):
        store.scripts["ledger_add"](keys=[store.keys.ledger()], args=[MAX_COST_TAGS, dumps(rows)])


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
