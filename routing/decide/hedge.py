"""Each route's expected finish as the options say, and the margins and hedge rule built on it.

Pure; no I/O. A route's time is its learned estimate when one has been observed (exact key,
then the account's pool), else its prior. A provider batch's margin is ``margin_s`` and at
least what a hedge needs (the fastest alternative plus ``hedge_margin_s``), so a batch is never
chosen for a request it would have to give up at once. A request already in a batch is
re-routed (hedged) when its remaining slack falls below that same need (``should_hedge``);
``batch_turnaround_s`` also feeds ``routing.decide.flush.should_flush``, which flushes a
waiting group before one more step of waiting would push its tightest deadline past the batch's
finish plus margin.
"""

from __future__ import annotations

from collections.abc import Mapping

from routing.decide.estimates import Estimate, GpuEstimate
from routing.decide.options import RouteOptions, serving_accounts, tier_key
from routing.models import Route

__all__ = [
    "batch_margin_s",
    "batch_turnaround_s",
    "hedge_alternative_s",
    "local_gpu",
    "realtime_finish",
    "should_hedge",
    "tier_finish",
]


def _prior_estimate(seconds: float, options: RouteOptions) -> Estimate:
    return Estimate(
        seconds=seconds, quantile=options.quantile, source="prior", needed=options.min_samples
    )


def _observed(table: Mapping[str, Estimate], *keys: str) -> Estimate | None:
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
    est = _observed(
        options.batch_estimates, f"{account}|{endpoint}|{model}", f"{account}|*"
    ) or _prior_estimate(prior, options)
    return est.at_size(size), est


def realtime_finish(
    options: RouteOptions, account: str, model: str
) -> tuple[float, Estimate, float]:
    """(finish seconds, latency estimate, rate-limit wait) of a realtime call."""
    est = _observed(
        options.realtime_estimates, f"{account}|{model}", f"{account}|*"
    ) or _prior_estimate(options.realtime_estimate_s, options)
    wait = options.realtime_wait_s.get(f"{account}|{model}", 0.0)
    return est.seconds + wait, est, wait


def tier_finish(
    options: RouteOptions, account: str, model: str, route: Route
) -> tuple[float, Estimate, float]:
    """(finish seconds, latency estimate, rate-limit wait) at a flex or priority tier.

    Each tier learns its own latency (observed under ``openai@flex``...). Until it has, flex
    uses the account's flex prior (slow by design) and priority the standard tier's estimate
    (it is at least as fast). A tier's own 429s and 498s make its wait, so a shedding flex
    tier looks slower and loses to the standard one.
    """
    name = tier_key(account, route)
    est = _observed(options.realtime_estimates, f"{name}|{model}", f"{name}|*")
    if est is None:
        if route is Route.FLEX:
            prior = options.flex_latency_s.get(account, options.default_flex_latency_s)
            est = _prior_estimate(prior, options)
        else:
            est = realtime_finish(options, account, model)[1]
    wait = options.realtime_wait_s.get(f"{name}|{model}", 0.0)
    return est.seconds + wait, est, wait


def local_gpu(options: RouteOptions, model: str) -> GpuEstimate | None:
    """The GPU's estimate for ``model``, on the priors until reported; None: not served here."""
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
    accounts = serving_accounts(options, endpoint, model)
    best = min(realtime_finish(options, a, model)[0] for a in accounts)
    gpu = local_gpu(options, model)
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
