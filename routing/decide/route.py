"""Route choice: pure functions over a request, its deadline, estimates and ``now``; no I/O.

Per request (docs/architecture.md): list every route that can serve it (a provider batch per
account, the local GPU when the model is served locally, realtime per account), each with its
expected finish at the configured quantile (p95 by default) and its expected cost from the
price table. **The cheapest whose finish plus margin is before the deadline wins; if none fits,
the fastest.** Every candidate, its estimate and its cost are kept in the ``Decision`` so
``mixbatch explain ID`` can say why a request went where it went.

Margins, and why they differ: a provider batch carries the margin of
``routing.decide.hedge.batch_margin_s`` (never less than a hedge needs); realtime and GPU carry
``fast_margin_s``, small, since their tails are seconds. A batch's finish is its turnaround
estimate plus ``batch_overhead_s`` (one flush step and the poll lag).

Synchronous tiers are routes of their own: **flex** (``service_tier: "flex"``, batch prices,
slow, may shed load) wherever the providers table lists the model, with its own learned latency
(a prior until observed), and **priority** (a premium) only where an account or the request's
lane opts in. Flex is the cheap way to meet a deadline of minutes, which a batch cannot.

Size-aware batching: a batch candidate whose group would be below the account's minimum, or too
small for its saving to cover the batch's fixed overhead (``routing.decide.flush.batch_pays``),
does not fit, so the request goes by the next-cheapest route instead of waiting to fill.

Without a price for a candidate the request still routes, on deadline alone, in the design's
price order (local GPU, provider batch, flex, realtime, priority), and the decision carries a
warning naming the model. What the choice knows besides the request is
``routing.decide.options.RouteOptions``.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field

from routing.decide.cost import estimate_cost, estimate_tokens
from routing.decide.expected import rerank_batches
from routing.decide.flush import batch_pays
from routing.decide.hedge import (
    batch_margin_s,
    batch_turnaround_s,
    local_gpu,
    realtime_finish,
    tier_finish,
)
from routing.decide.options import (
    LOCAL_PROVIDER,
    PROVIDER_BY_ENDPOINT,
    RouteOptions,
    has_tier,
    serving_accounts,
)
from routing.models import SERVICE_TIER, Prepared, Route

__all__ = [
    "Candidate",
    "Decision",
    "choose_route",
    "choose_routes",
    "decide",
    "decide_one",
    "group_key",
    "provider_for",
    "request_costs",
]

#: Order of preference when prices are unknown: the design's typical price order.
_PRICE_ORDER = {Route.GPU: 0, Route.BATCH: 1, Route.FLEX: 2, Route.REALTIME: 3, Route.PRIORITY: 4}
#: The synchronous tiers beside the standard one, in the order candidates are listed.
_TIERS = (Route.FLEX, Route.PRIORITY)


class Candidate(BaseModel):
    """One way to serve a request, as the choice saw it (a dead GPU: finish ``inf``)."""

    model_config = ConfigDict(frozen=True, ser_json_inf_nan="constants")

    route: Route
    provider: str
    expected_finish_s: float
    """Seconds from the decision until the answer is expected, at the options' quantile."""
    expected_cost_usd: float | None
    """None: the price table has no entry for this model here."""
    margin_s: float
    fits: bool
    estimate: str
    """Where the time came from: "observed p95 of 37", "prior (2 of 5 observations seen)"."""
    why: str


class Decision(BaseModel):
    """The route a request takes and why; kept with the request for ``explain``."""

    route: Route
    provider: str
    reason: str
    model: str = ""
    endpoint: str = ""
    decided_at: float | None = None
    deadline: float | None = None
    quantile: float | None = None
    candidates: list[Candidate] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)


def provider_for(request: Prepared) -> str:
    return PROVIDER_BY_ENDPOINT[request.endpoint]


#: A claim's prices, memoized: (account, model, endpoint, route, tokens) -> USD or None, warning.
PriceMemo = dict[tuple[str, str, str, Route, tuple[int, int]], tuple[float | None, str | None]]


def request_costs(
    request: Prepared, options: RouteOptions, memo: PriceMemo | None = None
) -> tuple[dict[tuple[Route, str], float | None], list[str]]:
    """Expected USD of ``request`` on each route and account, and warnings for missing prices.

    Batch and realtime are priced from the table (``routing.decide.cost.estimate_cost``); the GPU
    from the table's ``local`` entry when there is one, else (None here) from the hardware's
    hourly price and the learned throughput in ``decide``. Without a table: no prices.
    ``memo`` (one per claim) prices each (account, model, route, token estimate) once: a body
    enters ``estimate_cost`` only through ``estimate_tokens``, so the memo is exact.
    """
    out: dict[tuple[Route, str], float | None] = {}
    warnings: list[str] = []
    table = options.prices
    if table is None:
        return out, warnings
    endpoint = request.endpoint.value
    memo = {} if memo is None else memo
    tokens = estimate_tokens(endpoint, request.body)

    def price(account: str, route: Route) -> tuple[float | None, str | None]:
        key = (account, request.model, endpoint, route, tokens)
        found = memo.get(key)
        if found is None:
            est = estimate_cost(table, account, request.model, endpoint, request.body, route)
            found = memo[key] = (est.usd if est.known else None, est.warning)
        return found

    for account in serving_accounts(options, endpoint, request.model):
        routes = [Route.REALTIME]
        if account in options.batch_turnaround_s:
            routes.append(Route.BATCH)
        routes += [t for t in _TIERS if has_tier(options, account, request.model, t, request.lane)]
        for route in routes:
            usd, warning = price(account, route)
            out[(route, account)] = usd
            if usd is None and warning and warning not in warnings:
                warnings.append(warning)
    if request.model in options.local_models:
        usd, _ = price(LOCAL_PROVIDER, Route.GPU)
        if usd is not None:
            out[(Route.GPU, LOCAL_PROVIDER)] = usd
    return out, warnings


def _fmt(seconds: float) -> str:
    if math.isinf(seconds):
        return "never"
    return f"{seconds:.0f}s" if seconds < 7200 else f"{seconds / 3600:.1f}h"


def decide(
    *,
    endpoint: str,
    model: str,
    deadline: float,
    now: float,
    options: RouteOptions,
    costs: Mapping[tuple[Route, str], float | None] | None = None,
    warnings: list[str] | None = None,
    lane: str | None = None,
    pending: int = 1,
) -> Decision:
    """The rule itself, over plain data: every candidate, then the cheapest that fits.

    ``costs`` maps (route, account) to expected USD (None or absent: unknown). ``choose_route``
    builds it from a request with ``request_costs``; the simulation passes precomputed ones.
    ``lane`` opts in to a priority tier where that lane does; ``pending`` is how many requests
    of this claim (this one included) would join the same batch group, for size-aware batching.
    """
    costs = dict(costs or {})
    gpu = local_gpu(options, model)
    if gpu is not None and costs.get((Route.GPU, LOCAL_PROVIDER)) is None:
        # no table price for the local route: the hardware's hourly price at the learned rate
        costs[(Route.GPU, LOCAL_PROVIDER)] = gpu.usd_per_request(options.gpu_usd_per_hour)
    priced = options.prices is not None
    slack = deadline - now
    batch_margin = batch_margin_s(options, endpoint, model)
    fast = options.fast_margin_s
    candidates: list[Candidate] = []

    def add(
        route: Route, provider: str, finish: float, margin: float, spent: str, est: str
    ) -> None:
        """One candidate; ``spent`` says what its ``finish`` is made of, for ``explain``."""
        fits = finish + margin <= slack
        verdict = f"margin {_fmt(margin)} {'<=' if fits else '>'} slack {_fmt(slack)}"
        candidates.append(
            Candidate(
                route=route,
                provider=provider,
                expected_finish_s=finish,
                expected_cost_usd=costs.get((route, provider)),
                margin_s=margin,
                fits=fits,
                estimate=est,
                why=spent if math.isinf(finish) else f"{spent} + {verdict}",
            )
        )

    accounts = serving_accounts(options, endpoint, model)
    for account in accounts:
        turnaround = batch_turnaround_s(options, account, endpoint, model)
        if turnaround is not None:
            seconds, est = turnaround
            overhead = options.batch_overhead_s
            spent = f"turnaround {_fmt(seconds)} + overhead {_fmt(overhead)}"
            add(Route.BATCH, account, seconds + overhead, batch_margin, spent, est.describe())
    if gpu is not None:
        overhead = options.gpu_overhead_s
        spent = (
            "no live GPU worker"
            if gpu.stale
            else f"wait {gpu.wait_s:.1f}s + service {gpu.service_s:.2f}s + overhead {overhead:g}s"
        )
        finish = math.inf if gpu.stale else gpu.finish_s + overhead
        add(Route.GPU, LOCAL_PROVIDER, finish, fast, spent, gpu.describe())
    for account in accounts:
        if account in options.batch_only and account in options.batch_turnaround_s:
            continue  # no synchronous endpoint (realtime = false): batch only
        for route in (Route.FLEX, Route.REALTIME, Route.PRIORITY):
            if route is Route.REALTIME:
                finish, est, wait = realtime_finish(options, account, model)
            elif has_tier(options, account, model, route, lane):
                finish, est, wait = tier_finish(options, account, model, route)
            else:
                continue
            limit = f" + rate-limit wait {wait:.0f}s" if wait else ""
            spent = f"latency {est.seconds:.1f}s{limit}"
            add(route, account, finish, fast, spent, est.describe())
    candidates = rerank_batches(
        candidates, options=options, endpoint=endpoint, model=model, slack=slack
    )
    candidates = _size_aware(candidates, options, costs, endpoint, model, pending)
    warns = list(warnings or [])
    unknown = [c for c in candidates if c.expected_cost_usd is None]
    by_deadline = not priced or bool(unknown)
    if priced and unknown:
        note = (
            f"no price for model {model!r} at "
            + ", ".join(sorted({f"{c.provider} ({c.route.value})" for c in unknown}))
            + ": routed on deadline alone"
        )
        warns.append(note)
    fitting = [c for c in candidates if c.fits]
    if fitting:
        if by_deadline:
            chosen = min(fitting, key=lambda c: (_PRICE_ORDER[c.route], c.expected_finish_s))
            rule = "fits the deadline, first in price order (no prices)"
        else:
            chosen = min(fitting, key=lambda c: (c.expected_cost_usd or 0.0, c.expected_finish_s))
            rule = "cheapest that fits the deadline"
        detail = f"{chosen.why}"
    else:
        live = [c for c in candidates if not math.isinf(c.expected_finish_s)] or candidates
        chosen = min(live, key=lambda c: (c.expected_finish_s, _PRICE_ORDER[c.route]))
        rule = "nothing fits the deadline: the fastest"
        detail = f"expected {_fmt(chosen.expected_finish_s)}, slack {_fmt(slack)}"
    usd = f", ${chosen.expected_cost_usd:.6f}" if chosen.expected_cost_usd is not None else ""
    return Decision(
        route=chosen.route,
        provider=chosen.provider,
        reason=f"{chosen.route.value} at {chosen.provider}{usd}: {rule} ({detail})",
        model=model,
        endpoint=endpoint,
        decided_at=now,
        deadline=deadline,
        quantile=options.quantile,
        candidates=candidates,
        warnings=warns,
    )


def _size_aware(
    candidates: list[Candidate],
    options: RouteOptions,
    costs: Mapping[tuple[Route, str], float | None],
    endpoint: str,
    model: str,
    pending: int,
) -> list[Candidate]:
    """``candidates`` with each batch too small to make marked as not fitting, and why."""
    out = []
    for c in candidates:
        small = (
            ""
            if c.route is not Route.BATCH
            else _batch_too_small(options, costs, c.provider, endpoint, model, pending)
        )
        out.append(c.model_copy(update={"fits": False, "why": f"{small}; {c.why}"}) if small else c)
    return out


def _batch_too_small(
    options: RouteOptions,
    costs: Mapping[tuple[Route, str], float | None],
    account: str,
    endpoint: str,
    model: str,
    pending: int,
) -> str:
    """Why a batch at ``account`` would be too small to make ("" when it is not).

    Its size is what waits in the group now plus ``pending``; its saving per line is the
    next-cheapest priced route's cost minus the batch's, against the account's batch overhead.
    """
    lines = options.batch_waiting.get(f"{account}|{endpoint}|{model}", 0) + max(pending, 1)
    price = options.prices.lookup(account, model) if options.prices is not None else None
    batch = costs.get((Route.BATCH, account))
    others = [
        usd
        for (route, provider), usd in costs.items()
        if usd is not None and route is not Route.BATCH and provider in (account, LOCAL_PROVIDER)
    ]
    saving = None if batch is None or not others else min(others) - batch
    ok, why = batch_pays(
        lines,
        min_lines=options.batch_min_lines.get(account, 1),
        saving_usd_per_line=saving,
        overhead_usd=price.batch_overhead_usd if price is not None else 0.0,
    )
    return "" if ok else why


def _tier_warning(request: Prepared, decision: Decision) -> str | None:
    """A body asking for a tier its model has nowhere: it is routed without it (documented)."""
    asked = request.body.get("service_tier")
    tiers = {tier: route for route, tier in SERVICE_TIER.items() if tier}
    route = tiers.get(asked) if isinstance(asked, str) else None
    if route is None or any(c.route is route for c in decision.candidates):
        return None
    return (
        f"service_tier {asked!r} asked, but model {request.model!r} has no {asked} tier here "
        f"(or it is not opted in): sent as {decision.route.value}, the tier the route chose"
    )


def choose_route(
    request: Prepared, now: float, options: RouteOptions | None = None, *, pending: int = 1
) -> Decision:
    """The route of one request: ``decide`` over its candidates, priced from its body.

    A ``service_tier`` in the body is a hint the route replaces: the call is made at the tier
    of the chosen route (``routing.models.SERVICE_TIER``); one asked for where the model has no
    such tier is noted in the decision's warnings.
    """
    options = options or RouteOptions()
    return choose_routes({"": request}, now, options, pending={"": pending})[""]


def choose_routes(
    requests: Mapping[str, Prepared],
    now: float,
    options: RouteOptions,
    *,
    pending: Mapping[str, int] | None = None,
) -> dict[str, Decision]:
    """The routes of one claim: each request's ``choose_route``, told how many of the claim
    share its (endpoint, model), the lines its batch group would gain at once.

    ``decide`` runs once per class of requests that give it the same inputs, all of them:
    endpoint, model, lane, deadline (exactly), the group's pending count, the priced
    candidates and their warnings (``now`` and ``options`` are the call's). A claim of one
    lane's backlog, submitted together, is a handful of classes, and the rule's candidates and
    estimates are built per class, not per request. Requests of a class share one ``Decision``
    (callers only read it); one whose body asks for a missing tier gets its own copy with the
    note. ``pending`` overrides the counts (``choose_route``'s single request).
    """
    same = Counter((r.endpoint, r.model) for r in requests.values())
    prices: PriceMemo = {}
    memo: dict[tuple[object, ...], Decision] = {}
    out: dict[str, Decision] = {}
    for rid, request in requests.items():
        costs, warnings = request_costs(request, options, prices)
        count = same[(request.endpoint, request.model)] if pending is None else pending[rid]
        key = (
            request.endpoint,
            request.model,
            request.lane,
            request.deadline,
            count,
            tuple(costs.items()),
            tuple(warnings),
        )
        decision = memo.get(key)
        if decision is None:
            decision = memo[key] = decide_one(request, now, options, costs, warnings, count)
        note = _tier_warning(request, decision)
        if note is not None:
            decision = decision.model_copy(update={"warnings": [*decision.warnings, note]})
        out[rid] = decision
    return out


def decide_one(
    request: Prepared,
    now: float,
    options: RouteOptions,
    costs: Mapping[tuple[Route, str], float | None],
    warnings: list[str],
    pending: int,
) -> Decision:
    """``decide`` with a request's own fields (its tier note aside)."""
    return decide(
        endpoint=request.endpoint.value,
        model=request.model,
        deadline=request.deadline,
        now=now,
        options=options,
        costs=costs,
        warnings=warnings,
        lane=request.lane,
        pending=pending,
    )


def group_key(request: Prepared, decision: Decision) -> tuple[str, str, str]:
    """Requests sharing this key can share a task (and a provider batch)."""
    return (decision.route.value, decision.provider, request.model)
