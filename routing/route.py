"""Route choice: pure functions over a request, its deadline, estimates and ``now``; no I/O.

DESIGN.md's rule: the cheapest route still expected to finish before the deadline, with a
safety margin. A provider batch costs about half; it is chosen when the request's slack exceeds
the account's expected batch turnaround plus the margin, where the margin is at least the
hedge threshold (so a batch is never chosen for a request it would have to give up at once).
Otherwise realtime. A request already
in a batch is re-routed (hedged) when its remaining slack falls below the realtime estimate
plus the hedge margin, so it is answered before it misses.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from routing.models import Endpoint, Prepared, Route

#: Which provider account serves an endpoint when the model names none of its own.
PROVIDER_BY_ENDPOINT: dict[Endpoint, str] = {
    Endpoint.CHAT: "openai",
    Endpoint.EMBEDDINGS: "openai",
    Endpoint.RESPONSES: "openai",
    Endpoint.MESSAGES: "anthropic",
}


class RouteOptions(BaseModel):
    """What the choice knows besides the request: estimates and margins, in seconds."""

    model_config = {"frozen": True}

    batch_turnaround_s: dict[str, float] = Field(default_factory=dict)
    margin_s: float = 600.0
    hedge_margin_s: float = 120.0
    realtime_estimate_s: float = 30.0
    #: models our own GPU worker serves (config/models.toml, aliases included)
    local_models: frozenset[str] = frozenset()


class Decision(BaseModel):
    """The route a request takes and why; kept with the request for ``explain``."""

    route: Route
    provider: str
    reason: str


def provider_for(request: Prepared) -> str:
    return PROVIDER_BY_ENDPOINT[request.endpoint]


def choose_route(request: Prepared, now: float, options: RouteOptions | None = None) -> Decision:
    options = options or RouteOptions()
    if request.model in options.local_models:
        return Decision(
            route=Route.GPU,
            provider="local",
            reason=f"{request.model} is served by our own GPU worker (no per-token bill)",
        )
    provider = provider_for(request)
    slack_s = request.deadline - now
    turnaround = options.batch_turnaround_s.get(provider)
    if turnaround is None:
        return Decision(
            route=Route.REALTIME,
            provider=provider,
            reason=f"{provider} has no batch route; realtime (slack {slack_s:.0f}s)",
        )
    margin = max(options.margin_s, options.realtime_estimate_s + options.hedge_margin_s)
    needed = turnaround + margin
    if slack_s > needed:
        return Decision(
            route=Route.BATCH,
            provider=provider,
            reason=(
                f"slack {slack_s:.0f}s > batch turnaround {turnaround:.0f}s + margin "
                f"{margin:.0f}s: provider batch (about half price)"
            ),
        )
    return Decision(
        route=Route.REALTIME,
        provider=provider,
        reason=(
            f"slack {slack_s:.0f}s <= batch turnaround {turnaround:.0f}s + margin "
            f"{margin:.0f}s: realtime"
        ),
    )


def should_hedge(deadline: float, now: float, options: RouteOptions) -> bool:
    """A request waiting on a provider batch must leave it now to be answered in time."""
    return deadline - now < options.realtime_estimate_s + options.hedge_margin_s


def group_key(request: Prepared, decision: Decision) -> tuple[str, str, str]:
    """Requests sharing this key can share a task (and a provider batch)."""
    return (decision.route.value, decision.provider, request.model)
