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
batch route (0.5 for OpenAI and Anthropic); it applies to every token class, cache reads
included, which the providers do not promise (reference §5 marks stacking as unconfirmed).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, Field

from routing.decide.tables import TableFile
from routing.models import Endpoint, Route

__all__ = [
    "CostEstimate",
    "ModelPrice",
    "PriceTable",
    "TokenUsage",
    "actual_cost",
    "estimate_cost",
    "estimate_tokens",
    "parse_prices",
    "saved_vs_realtime",
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


class ModelPrice(BaseModel):
    """List prices of one model at one provider account, USD per million tokens."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    input_usd_per_mtok: float = Field(ge=0)
    output_usd_per_mtok: float = Field(default=0.0, ge=0)
    cached_input_usd_per_mtok: float | None = Field(default=None, ge=0)
    cache_write_usd_per_mtok: float | None = Field(default=None, ge=0)
    batch_discount: float = Field(default=0.0, ge=0, lt=1)


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
            base = _SNAPSHOT.sub("", model)
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
        provider.only(("batch_discount", "models"))
        default = {"batch_discount": provider.fields.get("batch_discount", 0.0)}
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


def _route_factor(price: ModelPrice, route: Route) -> float:
    return 1.0 - price.batch_discount if route == Route.BATCH else 1.0


def _usd(price: ModelPrice, usage: TokenUsage, route: Route) -> float:
    cached = price.cached_input_usd_per_mtok
    write = price.cache_write_usd_per_mtok
    if cached is None:
        cached = price.input_usd_per_mtok
    if write is None:
        write = price.input_usd_per_mtok
    per_mtok = (
        usage.input * price.input_usd_per_mtok
        + usage.cached_input * cached
        + usage.cache_write * write
        + usage.output * price.output_usd_per_mtok
    )
    return per_mtok / 1_000_000 * _route_factor(price, route)


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


def usage_tokens(usage: Mapping[str, Any]) -> TokenUsage:
    """A provider's ``usage`` object as billed token classes, whichever API produced it.

    OpenAI chat and embeddings report ``prompt_tokens``/``completion_tokens``, with cache hits
    inside ``prompt_tokens``. The Responses API and OpenAI batch objects report
    ``input_tokens``/``output_tokens``, cache hits again inside. Anthropic reports
    ``input_tokens`` *without* its cache reads and writes, which come in their own fields.
    """
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
