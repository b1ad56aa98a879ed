"""The cost model's tiers and discount stacking, from providers' ``usage`` to ``mixbatch costs``.

Each account's rule is in config/prices.toml: batch x cached stack at Anthropic, Fireworks and
OpenAI, not at Vertex or Groq (the lower of the two prices), and the Gemini API prices a cached
token inside a batch as outside it; flex is priced at batch rates (Groq: list price); priority at
its premium; failed lines are not billed where the provider does not bill them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from config.settings import reset_settings
from routing.decide.cost import PriceTable, actual_cost, failed_cost, parse_prices
from routing.engine.pricing import price
from routing.engine.realtime import answered_tier, with_tier
from routing.models import Endpoint, Prepared, Route
from routing.store.lanes import LaneStore
from routing.store.ledger import record_many
from tasks.cli.main import cli

ROOT = Path(__file__).resolve().parent.parent
M = 1_000_000

#: 1M uncached input, 1M cached input, 1M output, in each provider's own usage shape.
OPENAI_USAGE = {
    "prompt_tokens": 2 * M,
    "completion_tokens": M,
    "prompt_tokens_details": {"cached_tokens": M},
}
ANTHROPIC_USAGE = {"input_tokens": M, "cache_read_input_tokens": M, "output_tokens": M}


@pytest.fixture(scope="module")
def table() -> PriceTable:
    return parse_prices((ROOT / "config" / "prices.toml").read_text())


def _usd(
    table: PriceTable, provider: str, model: str, usage: dict[str, Any], route: Route
) -> float:
    return round(actual_cost(table, provider, model, usage, route), 9)


@pytest.mark.parametrize(
    ("provider", "model", "usage", "batch_usd"),
    [
        # stack: (1.25 + 0.125 + 10) / 2
        ("openai", "gpt-5", OPENAI_USAGE, (1.25 + 0.125 + 10.0) / 2),
        # stack: Anthropic's own usage fields, cache reads halved too
        ("anthropic", "claude-sonnet-4-5", ANTHROPIC_USAGE, (3.0 + 0.30 + 15.0) / 2),
        # stack: Fireworks' extra half off cached tokens on top of the batch half
        (
            "fireworks",
            "accounts/fireworks/models/llama-v3p1-8b-instruct",
            OPENAI_USAGE,
            (0.20 + 0.10 + 0.20) / 2,
        ),
        # best (no stacking): the cached token costs min(0.075, 0.15 / 2) = 0.075
        ("groq", "openai/gpt-oss-120b", OPENAI_USAGE, 0.15 / 2 + 0.075 + 0.60 / 2),
        # best at Vertex: min(0.03, 0.30 / 2) = 0.03, not 0.015
        ("vertex", "gemini-2.5-flash", OPENAI_USAGE, 0.30 / 2 + 0.03 + 2.50 / 2),
        # Gemini API: a cached token inside a batch costs what it costs outside
        ("gemini", "gemini-2.5-flash", OPENAI_USAGE, 0.30 / 2 + 0.03 + 2.50 / 2),
    ],
)
def test_batch_and_cache_discounts_stack_per_account(
    table: PriceTable, provider: str, model: str, usage: dict[str, Any], batch_usd: float
) -> None:
    assert _usd(table, provider, model, usage, Route.BATCH) == pytest.approx(batch_usd)


def test_rules_differ_on_the_same_cached_usage() -> None:
    """One model, one usage, three rules: only the rule changes the cached tokens' price."""
    base = """
[providers.{name}]
batch_discount = 0.5
cache_stacking = "{rule}"
[providers.{name}.models."m"]
input_usd_per_mtok = 1.0
cached_input_usd_per_mtok = 0.1
output_usd_per_mtok = 0.0
"""
    text = "".join(
        base.format(name=rule.replace("_", "-"), rule=rule)
        for rule in ("stack", "best", "cached_as_outside")
    )
    table = parse_prices(text)
    cached_only = {"prompt_tokens": M, "prompt_tokens_details": {"cached_tokens": M}}
    got = {p: _usd(table, p, "m", cached_only, Route.BATCH) for p in table.prices}
    assert got == pytest.approx({"stack": 0.05, "best": 0.1, "cached-as-outside": 0.1})
    table2 = parse_prices(
        text.replace("cached_input_usd_per_mtok = 0.1", "cached_input_usd_per_mtok = 0.9")
    )
    got2 = {p: _usd(table2, p, "m", cached_only, Route.BATCH) for p in table2.prices}
    assert got2 == pytest.approx({"stack": 0.45, "best": 0.5, "cached-as-outside": 0.9})


def test_flex_is_priced_at_batch_rates_with_caching(table: PriceTable) -> None:
    for model in ("gpt-5", "gpt-5-mini", "o3", "o4-mini"):
        flex = _usd(table, "openai", model, OPENAI_USAGE, Route.FLEX)
        assert flex == _usd(table, "openai", model, OPENAI_USAGE, Route.BATCH)
        assert flex == pytest.approx(_usd(table, "openai", model, OPENAI_USAGE, Route.REALTIME) / 2)
    # Groq's flex costs the standard price; Gemini's half
    groq = ("groq", "openai/gpt-oss-120b", OPENAI_USAGE)
    assert _usd(table, *groq, Route.FLEX) == _usd(table, *groq, Route.REALTIME)
    gemini = ("gemini", "gemini-2.5-flash", {"prompt_tokens": M, "completion_tokens": M})
    assert _usd(table, *gemini, Route.FLEX) == pytest.approx(
        _usd(table, *gemini, Route.REALTIME) / 2
    )


def test_priority_costs_its_premium(table: PriceTable) -> None:
    usage = {"prompt_tokens": M, "completion_tokens": M}
    assert _usd(table, "openai", "gpt-5", usage, Route.PRIORITY) == pytest.approx(2.50 + 20.0)
    assert _usd(table, "openai", "o3", usage, Route.PRIORITY) == pytest.approx(3.50 + 14.0)


def test_failed_lines_are_not_billed_unless_the_provider_bills_them(table: PriceTable) -> None:
    assert failed_cost(table, "openai", "gpt-5", OPENAI_USAGE, Route.BATCH) == 0.0
    billing = parse_prices(
        '[providers.x]\nbills_failed_lines = true\n[providers.x.models."m"]\ninput_usd_per_mtok = 1.0\n'
    )
    assert failed_cost(billing, "x", "m", {"prompt_tokens": M}, Route.REALTIME) == 1.0
    assert failed_cost(billing, "x", "m", None, Route.REALTIME) == 0.0


def test_an_unknown_stacking_rule_names_the_line() -> None:
    with pytest.raises(Exception, match="cache_stacking"):
        parse_prices(
            '[providers.x]\ncache_stacking = "sometimes"\n[providers.x.models."m"]\ninput_usd_per_mtok = 1.0\n'
        )


def test_the_price_follows_the_tier_the_provider_echoes() -> None:
    assert answered_tier({"service_tier": "flex"}, Route.FLEX) == ("flex", Route.FLEX)
    # asked flex, answered at the standard tier: priced as standard
    assert answered_tier({"service_tier": "default"}, Route.FLEX) == ("default", Route.REALTIME)
    assert answered_tier({"usage": {"service_tier": "priority"}}, Route.REALTIME) == (
        "priority",
        Route.PRIORITY,
    )
    assert answered_tier({}, Route.FLEX) == ("flex", Route.FLEX)
    assert answered_tier({}, Route.REALTIME) == ("default", Route.REALTIME)


def test_the_route_sets_the_tier_sent() -> None:
    body = {"model": "gpt-4o-mini", "service_tier": "flex"}
    assert "service_tier" not in with_tier(body, Route.REALTIME)
    assert with_tier(body, Route.FLEX)["service_tier"] == "flex"
    assert with_tier(body, Route.PRIORITY)["service_tier"] == "priority"
    assert (
        with_tier({"model": "m", "service_tier": "auto"}, Route.REALTIME)["service_tier"] == "auto"
    )


def _request(provider_model: str, endpoint: Endpoint) -> Prepared:
    return Prepared(
        tenant="t",
        custom_id=None,
        lane="standard",
        deadline=1e9 + 3600,
        endpoint=endpoint,
        model=provider_model,
        body={"model": provider_model, "messages": [{"role": "user", "content": "hi"}]},
        metadata={},
        callback=None,
        max_attempts=3,
        created_at=1e9,
    )


def test_each_rule_from_usage_through_to_mixbatch_costs(
    table: PriceTable, store: LaneStore, redis_url: str, namespace: str
) -> None:
    """Finished requests priced from their usage fields, added to the ledger under the tier that
    answered, read back by ``mixbatch costs --json`` split by route."""
    cases: list[tuple[str, str, dict[str, Any], Route, Endpoint]] = [
        ("openai", "gpt-5", OPENAI_USAGE, Route.FLEX, Endpoint.CHAT),
        ("openai", "gpt-5", OPENAI_USAGE, Route.PRIORITY, Endpoint.CHAT),
        ("openai", "gpt-5", OPENAI_USAGE, Route.REALTIME, Endpoint.CHAT),
        ("anthropic", "claude-sonnet-4-5", ANTHROPIC_USAGE, Route.BATCH, Endpoint.MESSAGES),
        ("groq", "openai/gpt-oss-120b", OPENAI_USAGE, Route.BATCH, Endpoint.CHAT),
        ("gemini", "gemini-2.5-flash", OPENAI_USAGE, Route.BATCH, Endpoint.CHAT),
    ]
    entries = []
    expected: dict[str, float] = {}
    for provider, model, usage, route, endpoint in cases:
        cost = price(table, _request(model, endpoint), provider, route, usage)
        entries.append((_request(model, endpoint), route, cost))
        expected[route.value] = expected.get(route.value, 0.0) + cost.cost_usd
    record_many(store, entries)
    reset_settings()
    try:
        out = CliRunner().invoke(
            cli,
            ["costs", "--json"],
            env={"MIXBATCH_REDIS_URL": redis_url, "MIXBATCH_NAMESPACE": namespace},
        )
    finally:
        reset_settings()
    assert out.exit_code == 0, out.output
    by_route = json.loads(out.output)["route"]
    assert {r: v["cost"] for r, v in by_route.items()} == pytest.approx(expected)
    # the rules, visible in the totals: flex half of standard, priority double (gpt-5)
    assert by_route["flex"]["cost"] == pytest.approx(by_route["realtime"]["cost"] / 2)
    assert by_route["priority"]["cost"] == pytest.approx(by_route["realtime"]["cost"] * 2)
    batch = (3.0 + 0.30 + 15.0) / 2 + (0.075 + 0.075 + 0.30) + (0.15 + 0.03 + 1.25)
    assert by_route["batch"]["cost"] == pytest.approx(batch)
    assert by_route["flex"]["saved"] > 0 > by_route["priority"]["saved"]
