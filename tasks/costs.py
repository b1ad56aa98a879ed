"""What each finished request cost, and what the batch route saved: a ledger in Redis.

A request's cost is priced from the provider's own ``usage`` when it finishes (the price table
is ``config/prices.toml``), stored with its result, and added to running totals by lane,
tenant, spend tag and route. Totals are added only by the call whose ``finish`` won, so a
repeated message never counts a request twice. ``mixbatch costs`` prints them.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from pydantic import BaseModel

from config.settings import get_settings
from routing.decide.cost import (
    PriceTable,
    actual_cost,
    estimate_cost,
    parse_prices,
    saved_vs_realtime,
)
from routing.models import Prepared, Route
from routing.store.lanes import LaneStore, store_errors

log = logging.getLogger(__name__)


@functools.cache
def prices() -> PriceTable:
    s = get_settings()
    return parse_prices(s.prices_file.read_text(), source=str(s.prices_file))


class Cost(BaseModel):
    cost_usd: float
    saved_usd: float
    estimated_usd: float
    priced: bool


def price(request: Prepared, provider: str, route: Route, usage: dict[str, Any] | None) -> Cost:
    """The actual cost from ``usage`` (the estimate when the provider gave none)."""
    table = prices()
    estimate = estimate_cost(table, provider, request.model, request.endpoint, request.body, route)
    if not estimate.known and estimate.warning:
        log.warning("no price", extra={"provider": provider, "model": request.model})
    if not usage:
        return Cost(
            cost_usd=estimate.usd, saved_usd=0.0, estimated_usd=estimate.usd, priced=estimate.known
        )
    return Cost(
        cost_usd=actual_cost(table, provider, request.model, usage, route),
        saved_usd=saved_vs_realtime(table, provider, request.model, usage, route),
        estimated_usd=estimate.usd,
        priced=estimate.known,
    )


def ledger_key(store: LaneStore) -> str:
    return f"{store.keys.ns}:costs"


def record(store: LaneStore, request: Prepared, route: Route, cost: Cost) -> None:
    """Add a finished request to the totals (call once, after its finish succeeded)."""
    record_many(store, [(request, route, cost)])


def record_many(store: LaneStore, entries: list[tuple[Prepared, Route, Cost]]) -> None:
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
    with store_errors(store.url):
        pipe = store.redis.pipeline(transaction=True)
        for f, (cost_usd, saved_usd, count) in sums.items():
            pipe.hincrbyfloat(ledger_key(store), f"cost|{f}", cost_usd)
            pipe.hincrbyfloat(ledger_key(store), f"saved|{f}", saved_usd)
            pipe.hincrby(ledger_key(store), f"count|{f}", int(count))
        pipe.execute()


def totals(store: LaneStore) -> dict[str, dict[str, dict[str, float]]]:
    """``{"lane": {"bulk": {"cost": .., "saved": .., "count": ..}}, "tenant": ..., ...}``."""
    with store_errors(store.url):
        raw = store.redis.hgetall(ledger_key(store))
    out: dict[str, dict[str, dict[str, float]]] = {}
    for k, v in raw.items():
        measure, _, field = k.decode().partition("|")
        group, _, name = field.partition(":")
        if field == "all":
            group, name = "all", "all"
        out.setdefault(group, {}).setdefault(name, {"cost": 0.0, "saved": 0.0, "count": 0.0})
        out[group][name][measure] = float(v)
    return out
