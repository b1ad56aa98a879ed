"""What a finished request cost: the provider's own ``usage`` priced by the price table, or,
on the GPU route, the device's measured busy time at its hourly price (``price_gpu``).

Every route reads an answer's usage with ``usage_of`` (``usage``, or Gemini's ``usageMetadata``),
so a provider whose answers spell it differently is priced the same way on every route.

The arithmetic is pure (``routing.decide.cost``); this step picks actual or estimated cost and
says when a model has no price, so every route prices its answers the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from routing.decide.cost import (
    PriceTable,
    actual_cost,
    estimate_cost,
    saved_vs_realtime,
    usage_of,
    usage_tokens,
)
from routing.decide.options import LOCAL_PROVIDER
from routing.models import Prepared, Route
from routing.store.ledger import Cost

__all__ = ["GpuPricer", "price", "price_gpu", "usage_of"]

log = logging.getLogger(__name__)


def price(
    table: PriceTable,
    request: Prepared,
    provider: str,
    route: Route,
    usage: Mapping[str, Any] | None,
) -> Cost:
    """The actual cost from ``usage`` (the estimate when the provider gave none)."""
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


#: Price the GPU's own time (``route_gpu_usd_per_hour``) over the answers of one micro-batch:
#: ``(requests with their usage, busy seconds) -> one Cost per request``.
GpuPricer = Callable[[Sequence[tuple[Prepared, Mapping[str, Any] | None]], float], list[Cost]]


def _tokens(usage: Mapping[str, Any] | None) -> int:
    if not usage:
        return 0
    used = usage_tokens(usage)
    return used.input + used.cached_input + used.cache_write + used.output


def _realtime_usd(table: PriceTable, model: str, usage: Mapping[str, Any] | None) -> float | None:
    """The cheapest provider's realtime price of the same usage; None where none prices it."""
    if not usage:
        return None
    found = [
        actual_cost(table, provider, model, usage, Route.REALTIME)
        for provider in table.prices
        if provider != LOCAL_PROVIDER and table.lookup(provider, model) is not None
    ]
    return min(found) if found else None


def price_gpu(
    table: PriceTable,
    usd_per_hour: float,
    answered: Sequence[tuple[Prepared, Mapping[str, Any] | None]],
    busy_s: float,
) -> list[Cost]:
    """Each answer's share of one micro-batch's measured busy time at the GPU's hourly price.

    The device was busy for the whole batch whatever each request asked, so the batch's cost is
    ``busy_s * usd_per_hour / 3600``, split over its answers by their share of the tokens
    (evenly when any answer reports none). Requests that failed or went back to their lane take
    no share: the answers pay for the time. ``saved_usd`` is the cheapest realtime price of
    the same usage in the table minus that share (negative when the GPU was dearer); 0 where no
    provider prices the model.
    """
    if not answered:
        return []
    total = max(0.0, busy_s) * usd_per_hour / 3600.0
    weights = [_tokens(usage) for _, usage in answered]
    if not all(weights):
        weights = [1] * len(answered)
    out: list[Cost] = []
    for (request, usage), weight in zip(answered, weights, strict=True):
        usd = total * weight / sum(weights)
        realtime = _realtime_usd(table, request.model, usage)
        saved = 0.0 if realtime is None else realtime - usd
        out.append(Cost(cost_usd=usd, saved_usd=saved, estimated_usd=usd, priced=True))
    return out
