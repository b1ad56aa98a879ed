"""What the route choice knows besides the request, and how it is learned. Pure; no I/O.

``RouteOptions`` holds the priors (per-account batch turnaround, realtime latency, the GPU's
wait and throughput), the margins, the price table, and the estimates learned from what the
service has observed. ``learn`` fills the learned part from an ``Observations`` snapshot and
``now``; whatever the observations do not support stays on the priors, so a fresh install and
a flushed store route alike.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from routing.decide.cost import PriceTable, base_model
from routing.decide.estimates import (
    DEFAULT_HALF_LIFE_S,
    DEFAULT_MIN_SAMPLES,
    DEFAULT_QUANTILE,
    Estimate,
    EstimateRule,
    GpuEstimate,
    LatencyObs,
    Observations,
    TurnaroundObs,
    check_quantile,
    gpu_estimate,
    latency_estimate,
    turnaround_estimate,
)
from routing.decide.ratelimit import rate_limit_wait_s
from routing.models import Endpoint, Route

__all__ = [
    "LOCAL_PROVIDER",
    "PROVIDER_BY_ENDPOINT",
    "RouteOptions",
    "has_tier",
    "learn",
    "serving_accounts",
    "tier_key",
]

#: Which provider account serves an endpoint when the model names none of its own.
PROVIDER_BY_ENDPOINT: dict[Endpoint, str] = {
    Endpoint.CHAT: "openai",
    Endpoint.EMBEDDINGS: "openai",
    Endpoint.RESPONSES: "openai",
    Endpoint.MESSAGES: "anthropic",
    Endpoint.GENERATE_CONTENT: "gemini",
    Endpoint.EMBED_CONTENT: "gemini",
}

#: The provider name of the GPU route (its results, its price-table entries, its group key).
LOCAL_PROVIDER = "local"


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
    #: the expected-cost batch rule (routing.decide.expected): the most P(miss after hedging) a
    #: batch may carry; P(a hedge misses) until learned, and learned ("account|model" -> p)
    miss_tolerance: float = Field(default=0.001, ge=0, le=1)
    hedge_miss_prior: float = Field(default=0.002, ge=0, le=1)
    hedge_miss_p: dict[str, float] = Field(default_factory=dict)
    #: account -> models with a flex tier (the providers table's ``flex_models``)
    flex_models: dict[str, frozenset[str]] = Field(default_factory=dict)
    #: account -> prior flex latency; learned per "account@flex|model" in ``realtime_estimates``
    flex_latency_s: dict[str, float] = Field(default_factory=dict)
    default_flex_latency_s: float = Field(default=600.0, gt=0)
    #: account -> models with a priority tier; used only where opted in (account or lane)
    priority_models: dict[str, frozenset[str]] = Field(default_factory=dict)
    priority_accounts: frozenset[str] = frozenset()
    priority_lanes: frozenset[str] = frozenset()
    #: account -> the fewest lines a batch job may have
    batch_min_lines: dict[str, int] = Field(default_factory=dict)
    #: accounts with no synchronous endpoint (``realtime = false``): batch candidates only
    batch_only: frozenset[str] = frozenset()
    #: "account|endpoint|model" -> lines waiting in that batch group now (size-aware batching)
    batch_waiting: dict[str, int] = Field(default_factory=dict)

    @field_validator("quantile")
    @classmethod
    def _quantile(cls, v: float) -> float:
        return check_quantile(v)


def serving_accounts(options: RouteOptions, endpoint: str, model: str) -> tuple[str, ...]:
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


def tier_key(account: str, route: Route) -> str:
    """The name a tier's latency is observed under: ``openai`` for the standard tier,
    ``openai@flex`` and ``openai@priority`` for the others (so each learns its own)."""
    return account if route is Route.REALTIME else f"{account}@{route.value}"


def has_tier(
    options: RouteOptions, account: str, model: str, route: Route, lane: str | None = None
) -> bool:
    """Whether ``route`` (flex or priority) is a candidate for ``model`` at ``account``.

    Flex: wherever the providers table lists the model. Priority: listed, and opted in by the
    account or by the request's lane (off by default: it costs a premium).
    """
    if route is Route.FLEX:
        listed = options.flex_models.get(account, frozenset())
    elif route is Route.PRIORITY:
        opted = account in options.priority_accounts or (
            lane is not None and lane in options.priority_lanes
        )
        listed = options.priority_models.get(account, frozenset()) if opted else frozenset()
    else:
        return False
    return model in listed or base_model(model) in listed


def _latency_prior(base: RouteOptions, name: str) -> float:
    """The prior of a tier's latency, by its observed name (``tier_key``): flex its own (slow),
    the others the realtime prior. A young sample never reads below it (``latency_estimate``)."""
    account, _, tier = name.partition("@")
    if tier == Route.FLEX.value:
        return base.flex_latency_s.get(account, base.default_flex_latency_s)
    return base.realtime_estimate_s


def learn(base: RouteOptions, seen: Observations, now: float) -> RouteOptions:
    """``base`` with every estimate the observations support (the rest stay on the priors).

    Batch turnarounds are estimated per (account, endpoint, model) and pooled per account (a
    new model borrows its account's behaviour before it has its own history); realtime latency
    per (account, model) and per account; the GPU per model, under its aliases too.
    """
    rule = EstimateRule(base.quantile, base.min_samples, base.half_life_s)
    batch: dict[str, Estimate] = {}
    pooled: dict[str, list[TurnaroundObs]] = {}
    pooled_running: dict[str, list[TurnaroundObs]] = {}
    keys = set(seen.batch) | set(seen.inflight)
    for key in keys:
        account = key.split("|", 1)[0]
        prior = base.batch_turnaround_s.get(account)
        if prior is None:
            continue
        done, running = seen.batch.get(key, []), seen.inflight.get(key, [])
        pooled.setdefault(account, []).extend(done)
        pooled_running.setdefault(account, []).extend(running)
        batch[key] = turnaround_estimate(done, now, prior_s=prior, rule=rule, inflight=running)
    for account, done in pooled.items():
        batch[f"{account}|*"] = turnaround_estimate(
            done,
            now,
            prior_s=base.batch_turnaround_s[account],
            rule=rule,
            inflight=pooled_running.get(account, []),
        )
    realtime: dict[str, Estimate] = {}
    by_account: dict[str, list[LatencyObs]] = {}
    for key, obs in seen.realtime.items():
        name = key.split("|", 1)[0]
        realtime[key] = latency_estimate(obs, now, prior_s=_latency_prior(base, name), rule=rule)
        by_account.setdefault(name, []).extend(obs)
    for name, obs in by_account.items():
        realtime[f"{name}|*"] = latency_estimate(
            obs, now, prior_s=_latency_prior(base, name), rule=rule
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
            quantile=rule.quantile,
            half_life_s=rule.half_life_s,
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
