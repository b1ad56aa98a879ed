"""The cost ledger: what finished requests cost and what the batch route saved, in Redis.

Totals are kept by lane, tenant, spend tag and route, in one hash, so a fresh process (or the
metrics server) reads the same numbers. They are added only by the call whose ``finish`` won,
so a repeated message never counts a request twice. ``mixbatch costs`` prints them.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel

from routing.models import Prepared, Route
from routing.store.base import store_errors
from routing.store.lanes import LaneStore


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
    """Add many finished requests, summed per field first: one small transaction."""
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
    key = store.keys.ledger()
    with store_errors(store.url):
        pipe = store.redis.pipeline(transaction=True)
        for f, (cost_usd, saved_usd, count) in sums.items():
            pipe.hincrbyfloat(key, f"cost|{f}", cost_usd)
            pipe.hincrbyfloat(key, f"saved|{f}", saved_usd)
            pipe.hincrby(key, f"count|{f}", int(count))
        pipe.execute()


def totals(store: LaneStore) -> dict[str, dict[str, dict[str, float]]]:
    """``{"lane": {"bulk": {"cost": .., "saved": .., "count": ..}}, "tenant": ..., ...}``."""
    with store_errors(store.url):
        raw = store.redis.hgetall(store.keys.ledger())
    out: dict[str, dict[str, dict[str, float]]] = {}
    for k, v in raw.items():
        measure, _, field = k.decode().partition("|")
        group, _, name = field.partition(":")
        if field == "all":
            group, name = "all", "all"
        out.setdefault(group, {}).setdefault(name, {"cost": 0.0, "saved": 0.0, "count": 0.0})
        out[group][name][measure] = float(v)
    return out
