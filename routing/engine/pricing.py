"""What a finished request cost: the provider's own ``usage`` priced by the price table.

The arithmetic is pure (``routing.decide.cost``); this step picks actual or estimated cost and
says when a model has no price, so every route prices its answers the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from routing.decide.cost import PriceTable, actual_cost, estimate_cost, saved_vs_realtime
from routing.models import Prepared, Route
from routing.store.ledger import Cost

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
