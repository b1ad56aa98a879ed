"""What a whole file of requests would cost, and when it would be answered, on each route: the
quote ``mixbatch estimate`` prints before anything is enqueued. Pure; no I/O.

The prices are the price table's (``routing.decide.cost``), the times the route options'
(``routing.decide.hedge``: the priors, or what the service has observed when the caller passed
learned options), and the route each request would take is the route rule's own
(``routing.decide.route.choose_route``), so the quote and the service agree. What a single
request's decision does not say, the quote adds for the file as a whole:

- a provider batch answers a group (account, endpoint, model) at once: its finish is the
  turnaround estimate at that group's size, plus the flush and poll overhead;
- realtime runs ``concurrency`` calls at a time per provider and model, so its finish is the
  latency estimate times the number of such rounds (plus a rate-limit wait already seen); the
  flex and priority tiers the same, at their own latency (flex's prior is slow) and price,
  quoted for the requests whose model has the tier (priority: only where opted in);
- the local GPU serves one model's texts at its estimated throughput after its queue wait.

Token counts come from the caller: a tokenizer's where one is available, else the estimate of
``routing.decide.cost`` (about four characters a token). ``prompt_texts`` splits a body into
the texts a tokenizer counts and the tokens it cannot see (per-message markers, images, token-id
inputs), the same walk ``cost.estimate_tokens`` makes, so either way the totals agree in kind.
``measure_error`` states how far the estimate was from a real tokenizer on a sample.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from routing.decide.cost import (
    CHARS_PER_TOKEN,
    IMAGE_TOKENS,
    MESSAGE_OVERHEAD_TOKENS,
    actual_cost,
    estimate_tokens,
)
from routing.decide.hedge import (
    batch_margin_s,
    batch_turnaround_s,
    local_gpu,
    realtime_finish,
    tier_finish,
)
from routing.decide.options import LOCAL_PROVIDER, RouteOptions, has_tier, serving_accounts
from routing.decide.route import choose_route
from routing.models import Endpoint, Prepared, Route

__all__ = [
    "Counted",
    "Quote",
    "RouteQuote",
    "TokenError",
    "estimate_count",
    "measure_error",
    "output_tokens",
    "prompt_texts",
    "quote",
]

#: The routes quoted, in the order they are listed.
_QUOTED = (Route.BATCH, Route.GPU, Route.FLEX, Route.REALTIME, Route.PRIORITY)
#: The routes a provider account serves (the GPU is ours).
_PROVIDER_ROUTES = (Route.BATCH, Route.FLEX, Route.REALTIME, Route.PRIORITY)
_TEXT_PARTS = frozenset({"text", "input_text", "output_text"})
_IMAGE_PARTS = frozenset({"image", "image_url", "input_image"})
_CAP_KEYS: dict[Endpoint, tuple[str, ...]] = {
    Endpoint.CHAT: ("max_completion_tokens", "max_tokens"),
    Endpoint.RESPONSES: ("max_output_tokens",),
    Endpoint.MESSAGES: ("max_tokens",),
}


class Counted(BaseModel):
    """One request's input tokens, and whether a tokenizer counted them."""

    model_config = ConfigDict(frozen=True)

    input_tokens: int = Field(ge=0)
    by: Literal["estimate", "tokenizer"]


class TokenError(BaseModel):
    """How far the character estimate was from a real tokenizer on a sample of texts."""

    reference: str
    """The tokenizer compared against (not necessarily the one the provider bills with)."""
    sample: int
    mean_abs_pct: float
    """Mean of |estimate - reference| / reference per text, in percent."""
    total_pct: float
    """(sum of estimates - sum of reference counts) / sum of reference counts, in percent."""


class RouteQuote(BaseModel):
    """The file on one route: what it costs and when its last answer is expected."""

    model_config = ConfigDict(ser_json_inf_nan="constants")

    requests: int
    """How many of the file's requests this route can serve."""
    usd: float | None
    """None when some of them are unpriced (``unpriced``); ``usd_priced`` is the rest."""
    usd_priced: float
    unpriced: int = 0
    finish_s: float
    """Seconds from now until the last of them is expected (``inf``: the route is down)."""
    fits: bool
    """Finish plus the route's safety margin is before the deadline."""
    basis: str


class Quote(BaseModel):
    model_config = ConfigDict(ser_json_inf_nan="constants")

    requests: int
    input_tokens: int
    output_tokens_cap: int | None
    """The sum of the output caps the bodies set (None: none sets one)."""
    capped: int
    """How many requests set an output cap."""
    output_tokens_expected: int
    """What the costs assume: each request's cap, or the default for those without one."""
    token_count: Literal["estimate", "tokenizer"]
    """"tokenizer" only when a tokenizer counted every request."""
    deadline_s: float
    """Seconds from now to the (earliest) deadline."""
    routes: dict[str, RouteQuote]
    plan: dict[str, int]
    """Requests per route as the route rule would send them now."""
    plan_usd: float | None
    warnings: list[str] = Field(default_factory=list)


def _content(content: object, texts: list[str]) -> int:
    """Collect a content's texts; return the tokens no text shows (images)."""
    if isinstance(content, str):
        texts.append(content)
        return 0
    if not isinstance(content, list):
        return 0
    fixed = 0
    for part in content:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, Mapping):
            kind = part.get("type")
            if kind in _TEXT_PARTS and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind in _IMAGE_PARTS:
                fixed += IMAGE_TOKENS
            elif "content" in part:
                fixed += _content(part["content"], texts)
            elif isinstance(part.get("output"), str):
                texts.append(part["output"])
    return fixed


def _messages(messages: object, texts: list[str]) -> int:
    if not isinstance(messages, list):
        return 0
    return sum(
        MESSAGE_OVERHEAD_TOKENS + _content(m.get("content"), texts)
        for m in messages
        if isinstance(m, Mapping)
    )


def _tools(body: Mapping[str, Any], texts: list[str]) -> None:
    if body.get("tools"):
        texts.append(json.dumps(body["tools"], separators=(",", ":")))


def _embedding_input(given: object, texts: list[str]) -> int:
    if isinstance(given, str):
        texts.append(given)
        return 0
    if isinstance(given, list):
        if given and all(isinstance(t, int) for t in given):
            return len(given)
        return sum(_embedding_input(item, texts) for item in given)
    return 0


def prompt_texts(endpoint: Endpoint | str, body: Mapping[str, Any]) -> tuple[list[str], int]:
    """The texts of a request's input, and the tokens it costs beyond them (message markers,
    images, inputs given as token ids)."""
    endpoint = Endpoint(endpoint)
    texts: list[str] = []
    if endpoint is Endpoint.EMBEDDINGS:
        return texts, _embedding_input(body.get("input"), texts)
    if endpoint is Endpoint.CHAT:
        fixed = _messages(body.get("messages"), texts)
    elif endpoint is Endpoint.RESPONSES:
        fixed = _content(body.get("instructions"), texts)
        given = body.get("input")
        if isinstance(given, str):
            texts.append(given)
        elif isinstance(given, list):
            fixed += sum(MESSAGE_OVERHEAD_TOKENS + _content([item], texts) for item in given)
    else:
        fixed = _content(body.get("system"), texts) + _messages(body.get("messages"), texts)
    _tools(body, texts)
    return texts, fixed


def estimate_count(texts: Sequence[str], fixed: int = 0) -> int:
    """The character estimate of ``texts`` (``cost.estimate_tokens``'s rule), plus ``fixed``."""
    return sum(math.ceil(len(t) / CHARS_PER_TOKEN) for t in texts) + fixed


def output_tokens(endpoint: Endpoint | str, body: Mapping[str, Any]) -> tuple[int, int | None]:
    """(expected output tokens as costs assume them, the body's own cap or None)."""
    endpoint = Endpoint(endpoint)
    expected = estimate_tokens(endpoint, body)[1]
    keys = _CAP_KEYS.get(endpoint, ())
    capped = any(
        isinstance(body.get(k), int) and not isinstance(body.get(k), bool) and body[k] >= 0
        for k in keys
    )
    return expected, (expected if capped else None)


def measure_error(texts: Sequence[str], reference: Callable[[str], int], name: str) -> TokenError:
    """The estimate against ``reference`` on ``texts`` (those with at least one token)."""
    pairs = [(estimate_count([t]), reference(t)) for t in texts]
    pairs = [(e, r) for e, r in pairs if r > 0]
    if not pairs:
        return TokenError(reference=name, sample=0, mean_abs_pct=0.0, total_pct=0.0)
    mean_abs = sum(abs(e - r) / r for e, r in pairs) / len(pairs)
    est, ref = sum(e for e, _ in pairs), sum(r for _, r in pairs)
    return TokenError(
        reference=name,
        sample=len(pairs),
        mean_abs_pct=round(100 * mean_abs, 1),
        total_pct=round(100 * (est - ref) / ref, 1),
    )


def _fmt(seconds: float) -> str:
    if math.isinf(seconds):
        return "never"
    return f"{seconds:.0f}s" if seconds < 7200 else f"{seconds / 3600:.1f}h"


class _Tally:
    """One route's running totals while the file is walked."""

    def __init__(self) -> None:
        self.requests = 0
        self.usd = 0.0
        self.unpriced = 0
        self.groups: dict[tuple[str, str, str], int] = {}

    def add(self, usd: float | None, group: tuple[str, str, str]) -> None:
        self.requests += 1
        if usd is None:
            self.unpriced += 1
        else:
            self.usd += usd
        self.groups[group] = self.groups.get(group, 0) + 1


def _provider_usd(
    options: RouteOptions, account: str, req: Prepared, usage: Mapping[str, int], route: Route
) -> float | None:
    table = options.prices
    if table is None or table.lookup(account, req.model) is None:
        return None
    return actual_cost(table, account, req.model, usage, route)


def _gpu_usd(options: RouteOptions, req: Prepared, usage: Mapping[str, int]) -> float:
    """The table's ``local`` price when it has one, else the hardware's hourly price at the
    estimated throughput: the same rule as ``route.decide``."""
    table = options.prices
    if table is not None and table.lookup(LOCAL_PROVIDER, req.model) is not None:
        return actual_cost(table, LOCAL_PROVIDER, req.model, usage, Route.GPU)
    gpu = local_gpu(options, req.model)
    return gpu.usd_per_request(options.gpu_usd_per_hour) if gpu is not None else 0.0


def _batch_finish(options: RouteOptions, tally: _Tally, slack: float) -> tuple[float, bool, str]:
    finish, fits, basis = 0.0, True, []
    for (account, endpoint, model), n in tally.groups.items():
        found = batch_turnaround_s(options, account, endpoint, model, size=n)
        if found is None:
            continue
        seconds, est = found
        total = seconds + options.batch_overhead_s
        finish = max(finish, total)
        fits = fits and total + batch_margin_s(options, endpoint, model) <= slack
        basis.append(f"{account} {model} x{n}: {_fmt(seconds)} ({est.describe()})")
    return finish, fits, "; ".join(basis)


def _realtime_finish(
    options: RouteOptions, tally: _Tally, slack: float, concurrency: int, route: Route
) -> tuple[float, bool, str]:
    """Rounds of ``concurrency`` calls at the route's latency: the standard tier's, or flex's
    or priority's own (``hedge.tier_finish``)."""
    finish, basis = 0.0, []
    for (account, _, model), n in tally.groups.items():
        if route is Route.REALTIME:
            seconds, est, wait = realtime_finish(options, account, model)
        else:
            seconds, est, wait = tier_finish(options, account, model, route)
        rounds = math.ceil(n / concurrency)
        total = (seconds - wait) * rounds + wait
        finish = max(finish, total)
        basis.append(f"{account} {model}: {rounds} x {_fmt(seconds - wait)} ({est.describe()})")
    return finish, finish + options.fast_margin_s <= slack, "; ".join(basis)


def _gpu_finish(options: RouteOptions, tally: _Tally, slack: float) -> tuple[float, bool, str]:
    finish, basis = 0.0, []
    for (_, _, model), n in tally.groups.items():
        gpu = local_gpu(options, model)
        if gpu is None:
            continue
        total = math.inf if gpu.stale else gpu.wait_s + n * gpu.service_s + options.gpu_overhead_s
        finish = max(finish, total)
        basis.append(f"{model} x{n} at {gpu.texts_per_s:g}/s ({gpu.describe()})")
    return finish, finish + options.fast_margin_s <= slack, "; ".join(basis)


def _cheapest(
    options: RouteOptions, req: Prepared, usage: Mapping[str, int], route: Route
) -> tuple[str, float | None]:
    """The account a route would use for ``req`` (the cheapest priced, else the first); none
    ("") where no account offers the route for this model."""
    accounts = serving_accounts(options, req.endpoint.value, req.model)
    if route is Route.BATCH:
        accounts = tuple(a for a in accounts if a in options.batch_turnaround_s)
    elif route is Route.REALTIME:
        accounts = tuple(a for a in accounts if a not in options.batch_only)
    else:
        accounts = tuple(a for a in accounts if has_tier(options, a, req.model, route, req.lane))
    costs = [(_provider_usd(options, a, req, usage, route), a) for a in accounts]
    priced = [(usd, a) for usd, a in costs if usd is not None]
    if priced:
        usd, account = min(priced)
        return account, usd
    return (accounts[0], None) if accounts else ("", None)


def quote(
    requests: Sequence[Prepared],
    counted: Sequence[Counted],
    options: RouteOptions,
    *,
    now: float,
    realtime_concurrency: int,
) -> Quote:
    """The quote of a file: per route its cost and expected finish, and the rule's plan."""
    tallies: dict[Route, _Tally] = {r: _Tally() for r in _QUOTED}
    plan: dict[str, int] = {}
    plan_usd: float | None = 0.0
    warnings: list[str] = []
    expected_out, cap_sum, capped = 0, 0, 0
    for req, count in zip(requests, counted, strict=True):
        expected, cap = output_tokens(req.endpoint, req.body)
        expected_out += expected
        if cap is not None:
            cap_sum, capped = cap_sum + cap, capped + 1
        usage = {"input_tokens": count.input_tokens, "output_tokens": expected}
        costs: dict[Route, float | None] = {}
        for route in _PROVIDER_ROUTES:
            account, usd = _cheapest(options, req, usage, route)
            if not account:
                continue
            costs[route] = usd
            tallies[route].add(usd, (account, req.endpoint.value, req.model))
            if usd is None and options.prices is not None:
                note = (
                    f"no price for model {req.model!r} at {account!r} in {options.prices.source}:"
                    " priced as unknown"
                )
                if note not in warnings:
                    warnings.append(note)
        if req.model in options.local_models:
            costs[Route.GPU] = _gpu_usd(options, req, usage)
            tallies[Route.GPU].add(
                costs[Route.GPU], (LOCAL_PROVIDER, req.endpoint.value, req.model)
            )
        chosen = choose_route(req, now, options).route
        plan[chosen.value] = plan.get(chosen.value, 0) + 1
        usd = costs.get(chosen)
        plan_usd = None if plan_usd is None or usd is None else plan_usd + usd
    slack = min((r.deadline for r in requests), default=now) - now
    routes: dict[str, RouteQuote] = {}
    for route, tally in tallies.items():
        if not tally.requests:
            continue
        if route is Route.BATCH:
            finish, fits, basis = _batch_finish(options, tally, slack)
        elif route is Route.GPU:
            finish, fits, basis = _gpu_finish(options, tally, slack)
        else:
            finish, fits, basis = _realtime_finish(
                options, tally, slack, realtime_concurrency, route
            )
        routes[route.value] = RouteQuote(
            requests=tally.requests,
            usd=None if tally.unpriced else tally.usd,
            usd_priced=tally.usd,
            unpriced=tally.unpriced,
            finish_s=finish,
            fits=fits,
            basis=basis,
        )
    return Quote(
        requests=len(requests),
        input_tokens=sum(c.input_tokens for c in counted),
        output_tokens_cap=cap_sum if capped else None,
        capped=capped,
        output_tokens_expected=expected_out,
        token_count="tokenizer"
        if counted and all(c.by == "tokenizer" for c in counted)
        else "estimate",
        deadline_s=slack,
        routes=routes,
        plan=plan,
        plan_usd=plan_usd,
        warnings=warnings,
    )
