"""Route choice: pure functions over a request, its deadline, estimates and ``now``; no I/O.

DESIGN.md's rule, per request: list every route that can serve it (a provider batch per
account, the local GPU when the model is served locally, realtime per account), each with its
expected finish at the configured quantile (p95 by default) and its expected cost from the
price table. **The cheapest whose finish plus margin is before the deadline wins; if none fits,
the fastest.** Every candidate, its estimate and its cost are kept in the ``Decision`` so
``mixbatch explain ID`` can say why a request went where it went.

Margins, and why they differ: a provider batch carries ``margin_s`` and at least the time the
hedge needs (the fastest alternative plus ``hedge_margin_s``), so a batch is never chosen for a
request it would have to give up at once; realtime and GPU carry ``fast_margin_s``, small,
since their tails are seconds. A batch's finish is its turnaround estimate plus
``batch_overhead_s`` (one flush step and the poll lag).

A request already in a batch is re-routed (hedged) when its remaining slack falls below the
fastest alternative's learned finish plus the hedge margin (``should_hedge``), and a waiting
group flushes when one more step of waiting would push its tightest deadline past the batch's
finish plus margin (``batch_turnaround_s`` feeds ``routing.decide.planner.should_flush``).

Without a price for a candidate the request still routes, on deadline alone, in the design's
price order (local GPU, provider batch, realtime), and the decision carries a warning naming the
model. ``learn`` turns observations (``routing.decide.estimates.Observations``) into the options.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from routing.decide.cost import PriceTable, estimate_cost
from routing.decide.estimates import (
    DEFAULT_HALF_LIFE_S,
    DEFAULT_MIN_SAMPLES,
    DEFAULT_QUANTILE,
    Estimate,
    GpuEstimate,
    Observations,
    check_quantile,
    gpu_estimate,
    latency_estimate,
    rate_limit_wait_s,
    turnaround_estimate,
)
from routing.models import Endpoint, Prepared, Route

__all__ = [
    "LOCAL_PROVIDER",
    "PROVIDER_BY_ENDPOINT",
    "Candidate",
    "Decision",
    "RouteOptions",
    "batch_margin_s",
    "batch_turnaround_s",
    "choose_route",
    "decide",
    "group_key",
    "hedge_alternative_s",
    "learn",
    "provider_for",
    "request_costs",
    "should_hedge",
]

#: Which provider account serves an endpoint when the model names none of its own.
PROVIDER_BY_ENDPOINT: dict[Endpoint, str] = {
    Endpoint.CHAT: "openai",
    Endpoint.EMBEDDINGS: "openai",
    Endpoint.RESPONSES: "openai",
    Endpoint.MESSAGES: "anthropic",
}

#: The provider name of the GPU route (its results, its price-table entries, its group key).
LOCAL_PROVIDER = "local"

#: Order of preference when prices are unknown: the design's typical price order.
_PRICE_ORDER = {Route.GPU: 0, Route.BATCH: 1, Route.REALTIME: 2}


class RouteOptions(BaseModel):
    """What the choice knows besides the request: priors, learned estimates, margins, prices.

    The first four fields are the static rule's (``batch_turnaround_s`` the per-account prior,
    ``realtime_estimate_s`` the realtime prior); the rest default to "nothing learned", so
    ``RouteOptions()`` behaves as the static rule did. ``learn`` fills the ``*_estimates``.
    """

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    batch_turnaround_s: dict[str, float] = Field(default_factory=dict)
    margin_s: float = 600.0
    hedge_margin_s: float = 120.0
    realtime_estimate_s: float = 30.0

    quantile: float = DEFAULT_QUANTILE
    min_samples: int = Field(default=DEFAULT_MIN_SAMPLES, ge=1)
    half_life_s: float = Field(default=DEFAULT_HALF_LIFE_S, gt=0)
    fast_margin_s: float = Field(default=5.0, ge=0)
    batch_overhead_s: float = Field(default=0.0, ge=0)
    #: endpoint value -> accounts that can serve it; empty: ``PROVIDER_BY_ENDPOINT``
    accounts: dict[str, tuple[str, ...]] = Field(default_factory=dict)
    prices: PriceTable | None = None
    #: "account|endpoint|model" (and "account|*", pooled) -> turnaround at the quantile
    batch_estimates: dict[str, Estimate] = Field(default_factory=dict)
    #: "account|model" (and "account|*") -> realtime latency at the quantile
    realtime_estimates: dict[str, Estimate] = Field(default_factory=dict)
    #: "account|model" -> seconds until the rate limit resets (0 or absent: headroom left)
    realtime_wait_s: dict[str, float] = Field(default_factory=dict)
    #: model names (aliases included) the local GPU worker serves: the only GPU candidates
    local_models: frozenset[str] = frozenset()
    #: model name or alias -> the GPU's estimate; a local model without one uses the priors
    gpu: dict[str, GpuEstimate] = Field(default_factory=dict)
    gpu_prior_wait_s: float = Field(default=2.0, ge=0)
    gpu_prior_texts_per_s: float = Field(default=50.0, gt=0)
    gpu_overhead_s: float = Field(default=1.0, ge=0)
    gpu_max_age_s: float = Field(default=900.0, gt=0)
    gpu_usd_per_hour: float = Field(default=1.0, ge=0)

    @field_validator("quantile")
    @classmethod
    def _quantile(cls, v: float) -> float:
        return check_quantile(v)


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


def _accounts(options: RouteOptions, endpoint: str, model: str) -> tuple[str, ...]:
    """Accounts that can serve ``model`` at ``endpoint``.

    One account per endpoint unless ``options.accounts`` lists several; then, with a price
    table, only those that price the model (an account without the model in the table is taken
    not to serve it), falling back to the first listed so a request always has a candidate.
    """
    given = options.accounts.get(endpoint)
    if not given:
        return (PROVIDER_BY_ENDPOINT[Endpoint(endpoint)],)
    if len(given) == 1 or options.prices is None:
        return given
    serving = tuple(a for a in given if options.prices.lookup(a, model) is not None)
    return serving or given[:1]


def _prior_estimate(seconds: float, options: RouteOptions) -> Estimate:
    return Estimate(
        seconds=seconds, quantile=options.quantile, source="prior", needed=options.min_samples
    )


def _pick(options: RouteOptions, table: Mapping[str, Estimate], *keys: str) -> Estimate | None:
    """The first observed estimate under ``keys`` (exact key, then the account's pool)."""
    for key in keys:
        found = table.get(key)
        if found is not None and found.source == "observed":
            return found
    return None


def batch_turnaround_s(
    options: RouteOptions,
    account: str,
    endpoint: str,
    model: str,
    size: float | None = None,
) -> tuple[float, Estimate] | None:
    """Turnaround at the quantile of a batch of ``size`` lines (None: no batch route there)."""
    prior = options.batch_turnaround_s.get(account)
    if prior is None:
        return None
    est = _pick(
        options, options.batch_estimates, f"{account}|{endpoint}|{model}", f"{account}|*"
    ) or _prior_estimate(prior, options)
    return est.at_size(size), est


def _realtime(options: RouteOptions, account: str, model: str) -> tuple[float, Estimate, float]:
    """(finish seconds, latency estimate, rate-limit wait) of a realtime call."""
    est = _pick(
        options, options.realtime_estimates, f"{account}|{model}", f"{account}|*"
    ) or _prior_estimate(options.realtime_estimate_s, options)
    wait = options.realtime_wait_s.get(f"{account}|{model}", 0.0)
    return est.seconds + wait, est, wait


def _gpu(options: RouteOptions, model: str) -> GpuEstimate | None:
    if model not in options.local_models:
        return None
    return options.gpu.get(model) or GpuEstimate(
        model=model,
        wait_s=options.gpu_prior_wait_s,
        texts_per_s=options.gpu_prior_texts_per_s,
        quantile=options.quantile,
    )


def hedge_alternative_s(
    options: RouteOptions, endpoint: str | None = None, model: str | None = None
) -> float:
    """Seconds the fastest non-batch route needs for this model: what a hedge must leave.

    Without a model (the static callers) it is the realtime prior, as before.
    """
    if endpoint is None or model is None:
        return options.realtime_estimate_s
    best = min(_realtime(options, a, model)[0] for a in _accounts(options, endpoint, model))
    gpu = _gpu(options, model)
    if gpu is not None and not gpu.stale:
        best = min(best, gpu.finish_s + options.gpu_overhead_s)
    return best


def batch_margin_s(
    options: RouteOptions, endpoint: str | None = None, model: str | None = None
) -> float:
    """The batch route's safety margin: ``margin_s``, and never less than what a hedge needs."""
    return max(
        options.margin_s, hedge_alternative_s(options, endpoint, model) + options.hedge_margin_s
    )


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
    for account in _accounts(options, endpoint, request.model):
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
    costs = costs or {}
    priced = options.prices is not None
    slack = deadline - now
    alternative = hedge_alternative_s(options, endpoint, model)
    batch_margin = max(options.margin_s, alternative + options.hedge_margin_s)
    fast = options.fast_margin_s
    candidates: list[Candidate] = []
    accounts = _accounts(options, endpoint, model)
    for account in accounts:
        turnaround = batch_turnaround_s(options, account, endpoint, model)
        if turnaround is None:
            continue
        seconds, est = turnaround
        finish = seconds + options.batch_overhead_s
        fits = finish + batch_margin <= slack
        candidates.append(
            Candidate(
                route=Route.BATCH,
                provider=account,
                expected_finish_s=finish,
                expected_cost_usd=costs.get((Route.BATCH, account)),
                margin_s=batch_margin,
                fits=fits,
                estimate=est.describe(),
                why=(
                    f"turnaround {_fmt(seconds)} + overhead {_fmt(options.batch_overhead_s)}"
                    f" + margin {_fmt(batch_margin)} {'<=' if fits else '>'} slack {_fmt(slack)}"
                ),
            )
        )
    gpu = _gpu(options, model)
    if gpu is not None:
        finish = gpu.finish_s + options.gpu_overhead_s
        fits = (not gpu.stale) and finish + fast <= slack
        cost = costs.get((Route.GPU, LOCAL_PROVIDER))
        if cost is None:
            cost = gpu.usd_per_request(options.gpu_usd_per_hour)
        candidates.append(
            Candidate(
                route=Route.GPU,
                provider=LOCAL_PROVIDER,
                expected_finish_s=math.inf if gpu.stale else finish,
                expected_cost_usd=cost,
                margin_s=fast,
                fits=fits,
                estimate=gpu.describe(),
                why=(
                    "no live GPU worker"
                    if gpu.stale
                    else f"wait {gpu.wait_s:.1f}s + service {gpu.service_s:.2f}s + overhead "
                    f"{options.gpu_overhead_s:g}s + margin {_fmt(fast)} "
                    f"{'<=' if fits else '>'} slack {_fmt(slack)}"
                ),
            )
        )
    for account in accounts:
        finish, est, wait = _realtime(options, account, model)
        fits = finish + fast <= slack
        limit = f" + rate-limit wait {wait:.0f}s" if wait else ""
        candidates.append(
            Candidate(
                route=Route.REALTIME,
                provider=account,
                expected_finish_s=finish,
                expected_cost_usd=costs.get((Route.REALTIME, account)),
                margin_s=fast,
                fits=fits,
                estimate=est.describe(),
                why=(
                    f"latency {est.seconds:.1f}s{limit} + margin {_fmt(fast)} "
                    f"{'<=' if fits else '>'} slack {_fmt(slack)}"
                ),
            )
        )
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


def should_hedge(
    deadline: float,
    now: float,
    options: RouteOptions,
    *,
    endpoint: str | None = None,
    model: str | None = None,
) -> bool:
    """A request waiting on a provider batch must leave it now to be answered in time.

    "Now" is when the remaining slack falls below the fastest alternative's learned finish
    (realtime, or the GPU when the model is served locally) plus the hedge margin.
    """
    return deadline - now < hedge_alternative_s(options, endpoint, model) + options.hedge_margin_s


def group_key(request: Prepared, decision: Decision) -> tuple[str, str, str]:
    """Requests sharing this key can share a task (and a provider batch)."""
    return (decision.route.value, decision.provider, request.model)


def learn(base: RouteOptions, seen: Observations, now: float) -> RouteOptions:
    """``base`` with every estimate the observations support (the rest stay on the priors).

    Batch turnarounds are estimated per (account, endpoint, model) and pooled per account (a
    new model borrows its account's behaviour before it has its own history); realtime latency
    per (account, model) and per account; the GPU per model, under its aliases too.
    """
    q, n, half = base.quantile, base.min_samples, base.half_life_s
    batch: dict[str, Estimate] = {}
    pooled: dict[str, list[Any]] = {}
    pooled_running: dict[str, list[Any]] = {}
    keys = set(seen.batch) | set(seen.inflight)
    for key in keys:
        account = key.split("|", 1)[0]
        prior = base.batch_turnaround_s.get(account)
        if prior is None:
            continue
        done, running = seen.batch.get(key, []), seen.inflight.get(key, [])
        pooled.setdefault(account, []).extend(done)
        pooled_running.setdefault(account, []).extend(running)
        batch[key] = turnaround_estimate(
            done,
            now,
            prior_s=prior,
            quantile=q,
            min_samples=n,
            half_life_s=half,
            inflight=running,
        )
    for account, done in pooled.items():
        batch[f"{account}|*"] = turnaround_estimate(
            done,
            now,
            prior_s=base.batch_turnaround_s[account],
            quantile=q,
            min_samples=n,
            half_life_s=half,
            inflight=pooled_running.get(account, []),
        )
    realtime: dict[str, Estimate] = {}
    by_account: dict[str, list[Any]] = {}
    for key, obs in seen.realtime.items():
        realtime[key] = latency_estimate(
            obs, now, prior_s=base.realtime_estimate_s, quantile=q, min_samples=n, half_life_s=half
        )
        by_account.setdefault(key.split("|", 1)[0], []).extend(obs)
    for account, obs in by_account.items():
        realtime[f"{account}|*"] = latency_estimate(
            obs, now, prior_s=base.realtime_estimate_s, quantile=q, min_samples=n, half_life_s=half
        )
    waits = {key: w for key, h in seen.headroom.items() if (w := rate_limit_wait_s(h, now)) > 0}
    gpu: dict[str, GpuEstimate] = {}
    for model, reports in seen.gpu.items():
        gpu[model] = gpu_estimate(
            model,
            reports,
            now,
            prior_wait_s=base.gpu_prior_wait_s,
            prior_texts_per_s=base.gpu_prior_texts_per_s,
            quantile=q,
            half_life_s=half,
            max_age_s=base.gpu_max_age_s,
        )
    for alias, model in seen.gpu_aliases.items():
        if model in gpu and alias not in gpu:
            gpu[alias] = gpu[model]
    return base.model_copy(
        update={
            "batch_estimates": batch,
            "realtime_estimates": realtime,
            "realtime_wait_s": waits,
            "gpu": gpu,
        }
    )
