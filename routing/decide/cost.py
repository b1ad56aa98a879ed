"""The cost model: what a request should cost on each route, and what it did cost. Pure.

Route choice compares routes by price, and the service reports what batching saved, so prices
are data (``config/prices.toml``, parsed by ``parse_prices``) and every function here takes the
table as an argument. A model without a price still routes: its estimate says ``known=False``
with a warning, and costs it as zero, rather than failing a request over bookkeeping.

Token counts before the call are estimates without a tokenizer (about four characters a token,
the usual rule of thumb for English), and the expected output is the request's own output cap
(``max_tokens`` and kin) or a default, so estimates lean high. Costs after the call come from
the provider's ``usage`` and are exact up to the table's prices.

Prices are USD per million tokens. ``batch_discount`` is the fraction taken off on the provider
batch route (0.5 for OpenAI and Anthropic); ``flex_discount`` the fraction off at the flex tier
(default: the batch discount, as OpenAI prices flex at batch rates); ``priority_markup`` the
fraction added at the priority tier. How the batch (and flex) discount meets a cache hit is
each account's ``cache_stacking`` rule, because providers differ (reference §4b):

* ``stack``: a cached token gets both discounts (Anthropic, Fireworks, OpenAI);
* ``best``: no stacking, a cached token costs the lower of its cache price and its batch price
  (Vertex, Groq);
* ``cached_as_outside``: a cached token inside a batch costs what it costs outside (Gemini API).

``bills_failed_lines`` says whether the provider bills a line or call that failed (none of the
listed ones does; an expired OpenAI batch's *finished* lines are answers and are billed).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field

from routing.decide.tables import TableFile
from routing.models import Endpoint, Route

__all__ = [
    "CostEstimate",
    "ModelPrice",
    "PriceTable",
    "TokenUsage",
    "actual_cost",
    "base_model",
    "estimate_cost",
    "estimate_tokens",
    "failed_cost",
    "parse_prices",
    "route_factor",
    "saved_vs_realtime",
    "usage_of",
    "usage_tokens",
]

CHARS_PER_TOKEN: Final = 4
MESSAGE_OVERHEAD_TOKENS: Final = 4
"""Role markers and separators each chat message costs beyond its text."""
IMAGE_TOKENS: Final = 765
"""An image part, priced as OpenAI prices one 1024x1024 image at high detail."""
DEFAULT_OUTPUT_TOKENS: Final = 256
"""Expected output of a text request that sets no output cap."""

_TEXT_PARTS: Final = frozenset({"text", "input_text", "output_text"})
_IMAGE_PARTS: Final = frozenset({"image", "image_url", "input_image"})
_SNAPSHOT = re.compile(r"-(?:\d{4}-\d{2}-\d{2}|\d{8}|latest)$")
#: Discounted routes: where ``cache_stacking`` decides what a cache hit costs.
_DISCOUNTED: Final = frozenset({Route.BATCH, Route.FLEX})
#: Fields a ``[providers.NAME]`` table may set as the default of each of its models.
_PROVIDER_DEFAULTS: Final = (
    "batch_discount",
    "flex_discount",
    "priority_markup",
    "cache_stacking",
    "bills_failed_lines",
    "batch_overhead_usd",
)

CacheStacking = Literal["stack", "best", "cached_as_outside"]


def base_model(model: str) -> str:
    """``model`` without a dated snapshot or ``-latest`` suffix (``gpt-5-mini-2025-08-07``)."""
    return _SNAPSHOT.sub("", model)


class ModelPrice(BaseModel):
    """List prices of one model at one provider account, USD per million tokens."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    input_usd_per_mtok: float = Field(ge=0)
    output_usd_per_mtok: float = Field(default=0.0, ge=0)
    cached_input_usd_per_mtok: float | None = Field(default=None, ge=0)
    cache_write_usd_per_mtok: float | None = Field(default=None, ge=0)
    batch_discount: float = Field(default=0.0, ge=0, lt=1)
    #: Fraction off at the flex tier; None: the batch discount (flex at batch rates).
    flex_discount: float | None = Field(default=None, ge=0, lt=1)
    #: Fraction added at the priority tier (1.0: double the list price).
    priority_markup: float = Field(default=0.0, ge=0)
    cache_stacking: CacheStacking = "stack"
    bills_failed_lines: bool = False
    #: What one provider batch costs beyond its tokens (storage, a job fee): the size below
    #: which a batch does not pay for itself (``routing.decide.flush.batch_pays``).
    batch_overhead_usd: float = Field(default=0.0, ge=0)


class PriceTable(BaseModel):
    """Prices by provider account, then model; ``source`` names the file for messages."""

    model_config = ConfigDict(frozen=True)

    prices: dict[str, dict[str, ModelPrice]]
    source: str = "prices.toml"

    def lookup(self, provider: str, model: str) -> ModelPrice | None:
        """The model's price, falling back from a dated snapshot or ``-latest`` alias to its base.

        Providers answer with snapshot names (``gpt-4o-mini-2024-07-18``) and callers write
        aliases (``claude-3-5-haiku-latest``); one table entry should price all of them.
        """
        models = self.prices.get(provider)
        if models is None:
            return None
        found = models.get(model)
        if found is None:
            base = base_model(model)
            found = models.get(base) if base != model else None
        return found


class TokenUsage(BaseModel):
    """Tokens by how they are billed. ``input`` excludes ``cached_input`` and ``cache_write``."""

    model_config = ConfigDict(frozen=True)

    input: int = 0
    cached_input: int = 0
    cache_write: int = 0
    output: int = 0


class CostEstimate(BaseModel):
    """The expected cost of one request on one route, with the token counts it came from."""

    model_config = ConfigDict(frozen=True)

    usd: float
    input_tokens: int
    output_tokens: int
    route: Route
    known: bool
    warning: str | None = None


def parse_prices(text: str, source: str = "prices.toml") -> PriceTable:
    """A price table from TOML; every error names the file, the line and the field.

    Shape::

        [providers.openai]
        batch_discount = 0.5                     # the provider's default for its models

        [providers.openai.models."gpt-4o-mini"]
        input_usd_per_mtok = 0.15
        output_usd_per_mtok = 0.60
    """
    prices: dict[str, dict[str, ModelPrice]] = {}
    for provider in TableFile(text, source).tables("providers", "providers.NAME"):
        provider.only((*_PROVIDER_DEFAULTS, "models"))
        default: dict[str, Any] = {
            k: provider.fields[k] for k in _PROVIDER_DEFAULTS if k in provider.fields
        }
        prices[provider.name] = {
            model.name: model.build(ModelPrice, {**default, **model.fields})
            for model in provider.tables("models")
        }
    return PriceTable(prices=prices, source=source)


def _tokens_of_chars(chars: int) -> int:
    return math.ceil(chars / CHARS_PER_TOKEN)


def _content_tokens(content: object) -> int:
    """Tokens of a message's content: a string, or a list of text and image parts."""
    if isinstance(content, str):
        return _tokens_of_chars(len(content))
    if not isinstance(content, list):
        return 0
    tokens = 0
    for part in content:
        if isinstance(part, str):
            tokens += _tokens_of_chars(len(part))
        elif isinstance(part, Mapping):
            kind = part.get("type")
            if kind in _TEXT_PARTS and isinstance(part.get("text"), str):
                tokens += _tokens_of_chars(len(part["text"]))
            elif kind in _IMAGE_PARTS:
                tokens += IMAGE_TOKENS
            elif "content" in part:
                tokens += _content_tokens(part["content"])
            elif isinstance(part.get("output"), str):
                tokens += _tokens_of_chars(len(part["output"]))
    return tokens


def _messages_tokens(messages: object) -> int:
    if not isinstance(messages, list):
        return 0
    return sum(
        MESSAGE_OVERHEAD_TOKENS + _content_tokens(m.get("content"))
        for m in messages
        if isinstance(m, Mapping)
    )


def _tools_tokens(body: Mapping[str, Any]) -> int:
    """Tool schemas are sent as part of the prompt; count their JSON."""
    tools = body.get("tools")
    if not tools:
        return 0
    return _tokens_of_chars(len(json.dumps(tools, separators=(",", ":"))))


def _embedding_tokens(given: object) -> int:
    if isinstance(given, str):
        return _tokens_of_chars(len(given))
    if isinstance(given, list):
        if given and all(isinstance(t, int) for t in given):
            return len(given)
        return sum(_embedding_tokens(item) for item in given)
    return 0


def _output_cap(body: Mapping[str, Any], *keys: str) -> int:
    for key in keys:
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return DEFAULT_OUTPUT_TOKENS


def estimate_tokens(endpoint: Endpoint | str, body: Mapping[str, Any]) -> tuple[int, int]:
    """(input tokens, expected output tokens) of a request, without a tokenizer.

    Output is the request's own cap (``max_completion_tokens``, ``max_tokens``,
    ``max_output_tokens``) times ``n`` for chat, else ``DEFAULT_OUTPUT_TOKENS``; embeddings
    have none. A cap is a ceiling, so costs estimated from it err on the high side.
    """
    endpoint = Endpoint(endpoint)
    if endpoint is Endpoint.EMBEDDINGS:
        return _embedding_tokens(body.get("input")), 0
    if endpoint is Endpoint.CHAT:
        n = body.get("n", 1)
        choices = n if isinstance(n, int) and not isinstance(n, bool) and n >= 1 else 1
        prompt = _messages_tokens(body.get("messages")) + _tools_tokens(body)
        return prompt, choices * _output_cap(body, "max_completion_tokens", "max_tokens")
    if endpoint is Endpoint.RESPONSES:
        given = body.get("input")
        prompt = _content_tokens(body.get("instructions")) + _tools_tokens(body)
        if isinstance(given, str):
            prompt += _tokens_of_chars(len(given))
        elif isinstance(given, list):
            prompt += sum(MESSAGE_OVERHEAD_TOKENS + _content_tokens([item]) for item in given)
        return prompt, _output_cap(body, "max_output_tokens")
    prompt = _content_tokens(body.get("system")) + _messages_tokens(body.get("messages"))
    return prompt + _tools_tokens(body), _output_cap(body, "max_tokens")


def route_factor(price: ModelPrice, route: Route) -> float:
    """What a route multiplies list prices by: the batch or flex discount, the priority markup."""
    route = Route(route)
    if route is Route.BATCH:
        return 1.0 - price.batch_discount
    if route is Route.FLEX:
        off = price.batch_discount if price.flex_discount is None else price.flex_discount
        return 1.0 - off
    if route is Route.PRIORITY:
        return 1.0 + price.priority_markup
    return 1.0


def _cached_rate(price: ModelPrice, route: Route, factor: float) -> float:
    """USD per million cache hits on ``route``, by the account's ``cache_stacking`` rule."""
    cached = price.cached_input_usd_per_mtok
    if cached is None:
        cached = price.input_usd_per_mtok
    if route not in _DISCOUNTED or price.cache_stacking == "stack":
        return cached * factor
    if price.cache_stacking == "best":
        return min(cached, price.input_usd_per_mtok * factor)
    return cached


def _usd(price: ModelPrice, usage: TokenUsage, route: Route) -> float:
    route = Route(route)
    factor = route_factor(price, route)
    write = price.cache_write_usd_per_mtok
    if write is None:
        write = price.input_usd_per_mtok
    per_mtok = (
        usage.input * price.input_usd_per_mtok
        + usage.cache_write * write
        + usage.output * price.output_usd_per_mtok
    ) * factor + usage.cached_input * _cached_rate(price, route, factor)
    return per_mtok / 1_000_000


def _unknown(table: PriceTable, provider: str, model: str) -> str:
    return (
        f"no price for model {model!r} at provider {provider!r} in {table.source}; "
        'costed as 0 (add a [providers.PROVIDER.models."MODEL"] entry)'
    )


def estimate_cost(
    table: PriceTable,
    provider: str,
    model: str,
    endpoint: Endpoint | str,
    body: Mapping[str, Any],
    route: Route,
) -> CostEstimate:
    """The expected cost of a request on ``route``; an unpriced model gives ``known=False``."""
    input_tokens, output_tokens = estimate_tokens(endpoint, body)
    price = table.lookup(provider, model)
    if price is None:
        return CostEstimate(
            usd=0.0,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            route=route,
            known=False,
            warning=_unknown(table, provider, model),
        )
    usage = TokenUsage(input=input_tokens, output=output_tokens)
    return CostEstimate(
        usd=_usd(price, usage, route),
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        route=route,
        known=True,
    )


def _int(mapping: object, key: str) -> int:
    if not isinstance(mapping, Mapping):
        return 0
    value = mapping.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def usage_of(body: object) -> dict[str, Any] | None:
    """The usage object of a provider's answer: ``usage`` (OpenAI, Anthropic, Bedrock, Mistral)
    or Gemini's ``usageMetadata``; None when the answer reports none."""
    if not isinstance(body, Mapping):
        return None
    for key in ("usage", "usageMetadata"):
        found = body.get(key)
        if isinstance(found, dict) and found:
            return found
    return None


def usage_tokens(usage: Mapping[str, Any]) -> TokenUsage:
    """A provider's ``usage`` object as billed token classes, whichever API produced it.

    OpenAI chat and embeddings (and Mistral) report ``prompt_tokens``/``completion_tokens``,
    with cache hits inside ``prompt_tokens``. The Responses API and OpenAI batch objects report
    ``input_tokens``/``output_tokens``, cache hits again inside. Anthropic (Claude on Bedrock
    too) reports ``input_tokens`` *without* its cache reads and writes, which come in their own
    fields; Bedrock's Converse shape spells the same in camelCase (``inputTokens``,
    ``cacheReadInputTokens``). Gemini's ``usageMetadata`` counts cached content inside
    ``promptTokenCount`` (tool-use prompts beside it) and bills thinking as output.
    """
    if "promptTokenCount" in usage or "candidatesTokenCount" in usage:
        prompt = _int(usage, "promptTokenCount") + _int(usage, "toolUsePromptTokenCount")
        cached = min(prompt, _int(usage, "cachedContentTokenCount"))
        output = _int(usage, "candidatesTokenCount") + _int(usage, "thoughtsTokenCount")
        return TokenUsage(input=prompt - cached, cached_input=cached, output=output)
    if "inputTokens" in usage or "outputTokens" in usage:
        return TokenUsage(
            input=_int(usage, "inputTokens"),
            cached_input=_int(usage, "cacheReadInputTokens"),
            cache_write=_int(usage, "cacheWriteInputTokens"),
            output=_int(usage, "outputTokens"),
        )
    if "prompt_tokens" in usage:
        prompt = _int(usage, "prompt_tokens")
        cached = min(prompt, _int(usage.get("prompt_tokens_details"), "cached_tokens"))
        return TokenUsage(
            input=prompt - cached, cached_input=cached, output=_int(usage, "completion_tokens")
        )
    given = _int(usage, "input_tokens")
    output = _int(usage, "output_tokens")
    if "cache_read_input_tokens" in usage or "cache_creation_input_tokens" in usage:
        return TokenUsage(
            input=given,
            cached_input=_int(usage, "cache_read_input_tokens"),
            cache_write=_int(usage, "cache_creation_input_tokens"),
            output=output,
        )
    cached = min(given, _int(usage.get("input_tokens_details"), "cached_tokens"))
    return TokenUsage(input=given - cached, cached_input=cached, output=output)


def actual_cost(
    table: PriceTable, provider: str, model: str, usage: Mapping[str, Any], route: Route
) -> float:
    """USD a finished request cost, from the provider's ``usage``; 0.0 for an unpriced model.

    Zero rather than an error because the answer is already paid for and must still be
    delivered; ``table.lookup`` tells a caller that wants to flag the gap.
    """
    price = table.lookup(provider, model)
    if price is None:
        return 0.0
    return _usd(price, usage_tokens(usage), route)


def failed_cost(
    table: PriceTable, provider: str, model: str, usage: Mapping[str, Any] | None, route: Route
) -> float:
    """USD a failed call or batch line cost: 0 unless the account bills failed work
    (``bills_failed_lines``) and the provider reported its usage."""
    price = table.lookup(provider, model)
    if price is None or not price.bills_failed_lines or not usage:
        return 0.0
    return _usd(price, usage_tokens(usage), route)


def saved_vs_realtime(
    table: PriceTable,
    provider: str,
    model: str,
    usage: Mapping[str, Any],
    route: Route,
    *,
    realtime_provider: str | None = None,
) -> float:
    """USD saved by running on ``route`` instead of realtime, for the same usage.

    ``realtime_provider`` prices the realtime alternative at another account, for the GPU route
    whose own entry is the hardware's amortised price. Zero when either side is unpriced.
    """
    other = realtime_provider or provider
    if table.lookup(provider, model) is None or table.lookup(other, model) is None:
        return 0.0
    realtime = actual_cost(table, other, model, usage, Route.REALTIME)
    return realtime - actual_cost(table, provider, model, usage, route)
