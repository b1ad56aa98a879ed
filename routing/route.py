"""Route choice: pure functions over a request, its deadline and ``now``; no I/O, no clock.

DESIGN.md's rule is the cheapest route still expected to finish before the deadline. Until the
provider-batch and GPU routes exist, the only route is realtime; the shape (candidates in,
a decision with its reason out) is what those routes extend.
"""

from __future__ import annotations

from pydantic import BaseModel

from routing.models import Endpoint, Prepared, Route

#: Which provider account serves an endpoint when the model names none of its own.
PROVIDER_BY_ENDPOINT: dict[Endpoint, str] = {
    Endpoint.CHAT: "openai",
    Endpoint.EMBEDDINGS: "openai",
    Endpoint.RESPONSES: "openai",
    Endpoint.MESSAGES: "anthropic",
}


class Decision(BaseModel):
    """The route a request takes and why; kept with the request for ``explain``."""

    route: Route
    provider: str
    reason: str


def provider_for(request: Prepared) -> str:
    return PROVIDER_BY_ENDPOINT[request.endpoint]


def choose_route(request: Prepared, now: float) -> Decision:
    slack_s = request.deadline - now
    return Decision(
        route=Route.REALTIME,
        provider=provider_for(request),
        reason=f"realtime is the only route configured (slack {slack_s:.0f}s)",
    )


def group_key(request: Prepared, decision: Decision) -> tuple[str, str, str]:
    """Requests sharing this key can share a task (and later a provider batch)."""
    return (decision.route.value, decision.provider, request.model)
