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

Without a price for a candidate the request still routes, on deadline alone, in the design's
price order (local GPU, provider batch, realtime), and the decision carries a warning naming the
model. What the choice knows besides the request is ``routing.decide.options.RouteOptions``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field

from routing.decide.cost import estimate_cost
from routing.decide.hedge import batch_margin_s, batch_turnaround_s, local_gpu, realtime_finish
from routing.decide.options import (
    LOCAL_PROVIDER,
    PROVIDER_BY_ENDPOINT,
    RouteOptions,
    serving_accounts,
)
from routing.models import Prepared, Route

__all__ = [
    "Candidate",
    "Decision",
    "choose_route",
    "decide",
    "group_key",
    "provider_for",
    "request_costs",
]

#: Order of preference when prices are unknown: the design's typical price order.
_PRICE_ORDER = {Route.GPU: 0, Route.BATCH: 1, Route.REALTIME: 2}


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


def request_costs(
    request: Prepared, options: RouteOptions
) -> tuple[dict[tuple[Route, str], float | None], list[str]]:
    """Expected USD of ``request`` on each route and account, and warnings for missing prices.

    Batch and realtime are priced from the table (``routing.decide.cost.estimate_cost``); the GPU
    from the table's ``local`` entry when there is one, else (None here) from the hardware's
    hourly price and the learned throughput in ``decide``. Without a table: no prices.
    """
    out: dict[tuple[Route, str], float | None] = {}
    warnings: list[str] = []
    table = options.prices
    if table is None:
        return out, warnings
    endpoint = request.endpoint.value
    for account in serving_accounts(options, endpoint, request.model):
        routes = [Route.REALTIME]
        if account in options.batch_turnaround_s:
            routes.append(Route.BATCH)
        for route in routes:
            est = estimate_cost(table, account, request.model, endpoint, request.body, route)
            out[(route, account)] = est.usd if est.known else None
            if not est.known and est.warning and est.warning not in warnings:
                warnings.append(est.warning)
    if request.model in options.local_models:
        est = estimate_cost(table, LOCAL_PROVIDER, request.model, endpoint, request.body, Route.GPU)
        if est.known:
            out[(Route.GPU, LOCAL_PROVIDER)] = est.usd
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
) -> Decision:
    """The rule itself, over plain data: every candidate, then the cheapest that fits.

    ``costs`` maps (route, account) to expected USD (None or absent: unknown). ``choose_route``
    builds it from a request with ``request_costs``; the simulation passes precomputed ones.
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
        finish, est, wait = realtime_finish(options, account, model)
        limit = f" + rate-limit wait {wait:.0f}s" if wait else ""
        spent = f"latency {est.seconds:.1f}s{limit}"
        add(Route.REALTIME, account, finish, fast, spent, est.describe())
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


def choose_route(request: Prepared, now: float, options: RouteOptions | None = None) -> Decision:
    """The route of one request: ``decide`` over its candidates, priced from its body."""
    options = options or RouteOptions()
    costs, warnings = request_costs(request, options)
    return decide(
        endpoint=request.endpoint.value,
        model=request.model,
        deadline=request.deadline,
        now=now,
        options=options,
        costs=costs,
        warnings=warnings,
    )


def group_key(request: Prepared, decision: Decision) -> tuple[str, str, str]:
    """Requests sharing this key can share a task (and a provider batch)."""
    return (decision.route.value, decision.provider, request.model)
