"""The realtime route: call a provider's synchronous endpoint for started requests.

One request's step: wait for a slot of the provider's semaphore (shared by every process),
call with retries, then finish it (answer priced, totals added) or, on a retryable error, put it
back in its lane after the provider's Retry-After or the shared backoff. The slot wait and the
tries share one time budget: each try's timeout is what the wait left. The leases of a chunk's
requests are renewed by a heartbeat while it runs, so a call slower than the lease is neither
requeued under the worker (and paid twice) nor charged an attempt. Latency and rate-limit
headroom are recorded for the route choice. Errors are told apart by type only
(``routing.errors``): a ``RateLimited`` is a 429 (or Groq's 498) wherever it came from.

The flex and priority routes are this step at another ``service_tier``. A flex call that is
shed (429, 498) is retried on flex with backoff while the request's slack allows, keeping
``fallback_reserve_s`` for one standard call; then it goes once more at the standard tier. The
answer records the tier that answered (the provider's echo of ``service_tier``), and the price
and the ledger follow it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from routing.decide.backoff import RetryPolicy, backoff_s
from routing.decide.cost import PriceTable
from routing.decide.options import tier_key
from routing.engine.claims import Heartbeat
from routing.engine.clock import Clock
from routing.engine.pricing import price, usage_of
from routing.errors import MixbatchError, ProviderError, RateLimited
from routing.faults import fault_point
from routing.models import SERVICE_TIER, Claimed, ErrorInfo, Route, StoredResult
from routing.providers import RealtimeAdapter, call_with_retries
from routing.providers.base import ProviderResponse
from routing.states import State
from routing.store.lanes import LaneStore
from routing.store.ledger import record
from routing.store.observations import ObservationStore
from routing.store.semaphore import RedisSemaphore

log = logging.getLogger(__name__)

#: A semaphore slot outlives the call it guards by this much, so a slow exit never frees it early.
SLOT_SLACK_S = 30.0
#: The longest a request keeps trying flex (OpenAI's docs raise the client timeout to 900 s).
FLEX_MAX_S = 900.0
#: Tries on flex are bounded by the slack, not counted: shedding is expected there.
FLEX_MAX_TRIES = 1000


@dataclass(frozen=True)
class Realtime:
    """The handles of one provider account's realtime calls."""

    store: LaneStore
    adapter: RealtimeAdapter
    observations: ObservationStore
    policy: RetryPolicy
    prices: PriceTable
    clock: Clock = time
    #: The route of the requests: the standard tier, flex or priority.
    route: Route = Route.REALTIME
    #: Seconds of slack kept for the standard call when flex keeps shedding.
    fallback_reserve_s: float = 30.0

    def flex_budget_s(self, deadline: float) -> float:
        """Seconds a flex request may spend on flex: its slack less the standard call's share."""
        if self.route is not Route.FLEX:
            return 0.0
        return max(0.0, min(FLEX_MAX_S, deadline - self.clock.time() - self.fallback_reserve_s))


def error_info(exc: MixbatchError) -> ErrorInfo:
    """What is stored about a failed call: a 429 is ``rate_limited``, others their type."""
    if isinstance(exc, ProviderError):
        code = "rate_limited" if isinstance(exc, RateLimited) else type(exc).__name__
        return ErrorInfo(
            code=code, message=str(exc), retryable=exc.retryable, status_code=exc.status_code
        )
    return ErrorInfo(code=type(exc).__name__, message=str(exc), retryable=exc.retryable)


def run_all(
    rt: Realtime,
    started: Sequence[Claimed],
    *,
    budget_s: float,
    lease_s: float,
    concurrency: int,
) -> list[str]:
    """Run started requests concurrently, their leases renewed meanwhile; the ids that reached
    an outcome, to deliver. No request runs past ``budget_s``, so the renewing stops then."""
    if not started:
        return []
    flex = max(rt.flex_budget_s(c.request.deadline) for c in started)
    beat = Heartbeat(
        rt.store,
        started,
        lease_s=lease_s,
        now=rt.clock.time,
        max_hold_s=flex + budget_s + SLOT_SLACK_S,
    )
    with beat, ThreadPoolExecutor(max_workers=min(len(started), concurrency)) as pool:
        outcomes = list(pool.map(lambda c: run_one(rt, c, budget_s), started))
    finished = (State.DONE, State.FAILED)
    return [c.id for c, o in zip(started, outcomes, strict=True) if o in finished]


def run_one(rt: Realtime, claimed: Claimed, budget_s: float) -> State | None:
    """One request, start to outcome: the state it ended in (None: its lease was lost).

    ``budget_s`` covers the slot wait and every try together.
    """
    account, req = rt.adapter.account, claimed.request
    total_s = rt.flex_budget_s(req.deadline) + budget_s
    sem = RedisSemaphore(
        rt.store.redis,
        rt.store.keys.semaphore(account.name, req.model),
        account.max_concurrency,
        lease_s=total_s + SLOT_SLACK_S,
    )
    started = rt.clock.monotonic()  # latency as a caller sees it: the slot wait included
    try:
        with sem.hold(timeout_s=total_s):
            resp, used = _call(rt, claimed, started, budget_s)
    except MixbatchError as exc:
        return _failed(rt, claimed, exc)
    fault_point("realtime")  # answered, not yet stored: a crash here is a call paid twice
    rt.observations.record_realtime(
        tier_key(account.name, used),
        req.model,
        latency_s=rt.clock.monotonic() - started,
        at=rt.clock.time(),
        rate_limit=resp.rate_limit,
    )
    return _answered(rt, claimed, resp, used)


def with_tier(body: dict[str, Any], route: Route) -> dict[str, Any]:
    """``body`` as sent on ``route``: its ``service_tier`` set to the route's tier, or a flex or
    priority one the producer wrote taken out on the standard route (the route decides)."""
    tier = SERVICE_TIER.get(route)
    if tier is not None:
        return {**body, "service_tier": tier}
    if body.get("service_tier") in ("flex", "priority"):
        return {k: v for k, v in body.items() if k != "service_tier"}
    return body


def _call(
    rt: Realtime, claimed: Claimed, started: float, budget_s: float
) -> tuple[ProviderResponse, Route]:
    """The call at the route's tier, and the route that answered: flex while the slack allows
    (retried with backoff when shed), then the standard tier."""
    req, route = claimed.request, rt.route
    flex_s = rt.flex_budget_s(req.deadline)
    if route is Route.FLEX and flex_s > 0:
        try:
            resp = call_with_retries(
                rt.adapter,
                req.endpoint,
                with_tier(req.body, Route.FLEX),
                policy=rt.policy.model_copy(update={"max_tries": FLEX_MAX_TRIES}),
                budget_s=flex_s,
                sleep=rt.clock.sleep,
                clock=rt.clock.monotonic,
            )
            return resp, Route.FLEX
        except RateLimited as exc:
            _shed(rt, claimed, exc)
        started = rt.clock.monotonic()
    if route is Route.FLEX:
        route = Route.REALTIME
    resp = call_with_retries(
        rt.adapter,
        req.endpoint,
        with_tier(req.body, route),
        policy=rt.policy,
        budget_s=max(0.0, started + budget_s - rt.clock.monotonic()),
        sleep=rt.clock.sleep,
        clock=rt.clock.monotonic,
    )
    return resp, route


def _shed(rt: Realtime, claimed: Claimed, exc: RateLimited) -> None:
    """Flex kept shedding until the slack ran short: note it (the route choice sees flex's
    wait) and fall back to the standard tier."""
    account, now = rt.adapter.account.name, rt.clock.time()
    rt.observations.record_realtime(
        tier_key(account, Route.FLEX),
        claimed.request.model,
        latency_s=None,
        at=now,
        rate_limit={"retry-after": str(exc.retry_after_s or 0)},
        limited=True,
    )
    log.info(
        "flex shed; falling back to the standard tier",
        extra={"request_id": claimed.id, "provider": account, "status_code": exc.status_code},
    )


def answered_tier(body: dict[str, Any], route: Route) -> tuple[str, Route]:
    """The tier that answered, from the provider's echo (``service_tier``, top level or in
    Anthropic's ``usage``; Gemini's ``usageMetadata.serviceTier``), and the route it is priced
    as; without an echo, the tier asked."""
    usage = body.get("usage") or body.get("usageMetadata")
    echo = body.get("service_tier")
    if not isinstance(echo, str) and isinstance(usage, dict):
        echo = usage.get("service_tier") or usage.get("serviceTier")
    if not isinstance(echo, str) or not echo:
        return SERVICE_TIER.get(route) or "default", route
    priced = {"flex": Route.FLEX, "priority": Route.PRIORITY}.get(echo.lower(), Route.REALTIME)
    return echo, priced


def _answered(rt: Realtime, claimed: Claimed, resp: ProviderResponse, route: Route) -> State | None:
    req, provider = claimed.request, rt.adapter.account.name
    usage = usage_of(resp.body)
    tier, priced_as = answered_tier(resp.body, route)
    cost = price(rt.prices, req, provider, priced_as, usage)
    result = StoredResult(
        status_code=resp.status_code,
        body=resp.body,
        usage=usage,
        provider=provider,
        provider_request_id=resp.provider_request_id,
        latency_s=resp.latency_s,
        service_tier=tier,
        **cost.model_dump(),
    )
    if not rt.store.finish(claimed.id, claimed.token, State.DONE, result, now=rt.clock.time()):
        return None
    record(rt.store, req, priced_as, cost)
    return State.DONE


def _failed(rt: Realtime, claimed: Claimed, exc: MixbatchError) -> State | None:
    """Retryable: back to the lane after Retry-After (a floor) or the backoff; else FAILED."""
    req, provider, now = claimed.request, rt.adapter.account.name, rt.clock.time()
    info = error_info(exc)
    retry_after = exc.retry_after_s if isinstance(exc, ProviderError) else None
    if isinstance(exc, RateLimited):  # no headroom until the provider's retry-after
        rt.observations.record_realtime(
            provider,
            req.model,
            latency_s=None,
            at=now,
            rate_limit={"retry-after": str(retry_after or 0)},
            limited=True,
        )
    if exc.retryable:
        wait = retry_after or backoff_s(rt.store.status(claimed.id).attempts, rt.policy)
        log.info(
            "realtime retry later",
            extra={"request_id": claimed.id, "provider": provider, "error": info.code},
        )
        return rt.store.requeue(claimed.id, claimed.token, info, ready_at=now + wait, now=now)
    body = exc.body if isinstance(exc, ProviderError) and isinstance(exc.body, dict) else None
    result = StoredResult(status_code=info.status_code, body=body, error=info, provider=provider)
    ok = rt.store.finish(claimed.id, claimed.token, State.FAILED, result, now=now)
    return State.FAILED if ok else None
