"""Every provider's usage shape priced, and Bedrock below its minimum record count.

Gemini reports ``usageMetadata`` (cached content inside ``promptTokenCount``, thinking billed as
output), Bedrock's Converse shape camelCase ``inputTokens``, Mistral OpenAI's ``prompt_tokens``.
End to end, one stack for the module: Gemini requests answered realtime and by Batch Mode are
priced from the ``usageMetadata`` of their answers, through to ``mixbatch costs --json``; and a
handful of bulk Bedrock requests, far below ``min_records = 100``, are answered by the
next-cheapest route (realtime at the anthropic account, which prices the same model here)
instead of waiting, with no Bedrock job created and no realtime call tried at Bedrock, which has
no synchronous endpoint.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from config.settings import reset_settings
from routing.client import Client
from routing.decide.cost import (
    PriceTable,
    TokenUsage,
    actual_cost,
    parse_prices,
    usage_of,
    usage_tokens,
)
from routing.decide.options import RouteOptions
from routing.decide.route import Decision, decide
from routing.models import Endpoint, Result, Route
from routing.providers.capabilities import parse_providers, tier_options
from routing.sandbox import Knobs
from routing.sandbox.batch_gemini import expected_gemini_reply
from routing.states import State
from tasks.cli.main import cli
from tasks.cli.stack import LocalStack
from tests.test_e2e import ROOT, _db_url
from tests.test_native_e2e import native_stack, providers_file

pytest.importorskip("boto3")

GEMINI = "gemini-2.5-flash"
BEDROCK = "anthropic.claude-3-5-haiku-20241022-v1:0"
#: A model only the bedrock account prices here: no other route serves it.
BEDROCK_ONLY = "anthropic.claude-3-haiku-20240307-v1:0"
ACCOUNTS = ("openai", "anthropic", "gemini", "bedrock", "mistral")
NOW = 1_000_000.0


@pytest.fixture(scope="module")
def table() -> PriceTable:
    return parse_prices((ROOT / "config" / "prices.toml").read_text())


# -- usage shapes ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("usage", "tokens"),
    [
        # Gemini: cached content inside the prompt count, tool-use prompt beside it, thoughts out
        (
            {
                "promptTokenCount": 1000,
                "cachedContentTokenCount": 400,
                "toolUsePromptTokenCount": 50,
                "candidatesTokenCount": 200,
                "thoughtsTokenCount": 300,
                "totalTokenCount": 1550,
            },
            TokenUsage(input=650, cached_input=400, output=500),
        ),
        ({"promptTokenCount": 7}, TokenUsage(input=7)),  # an embedding: no candidates
        # Bedrock Converse: cache reads and writes beside the input, as Anthropic's
        (
            {
                "inputTokens": 100,
                "outputTokens": 20,
                "cacheReadInputTokens": 30,
                "cacheWriteInputTokens": 10,
                "totalTokens": 160,
            },
            TokenUsage(input=100, cached_input=30, cache_write=10, output=20),
        ),
        # Mistral: OpenAI's chat spelling
        (
            {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17},
            TokenUsage(input=12, output=5),
        ),
    ],
)
def test_usage_shapes(usage: dict[str, Any], tokens: TokenUsage) -> None:
    assert usage_tokens(usage) == tokens


def test_usage_of_reads_usage_or_usage_metadata() -> None:
    meta = {"promptTokenCount": 3, "candidatesTokenCount": 4}
    assert usage_of({"candidates": [], "usageMetadata": meta}) == meta
    assert usage_of({"usage": {"input_tokens": 1}}) == {"input_tokens": 1}
    assert usage_of({"embedding": {"values": [0.1]}}) is None
    assert usage_of(None) is None


def test_gemini_batch_prices_cached_tokens_as_outside(table: PriceTable) -> None:
    """1M uncached, 1M cached, 1M output (0.5M of it thinking) in Gemini's own fields."""
    usage = {
        "promptTokenCount": 2_000_000,
        "cachedContentTokenCount": 1_000_000,
        "candidatesTokenCount": 500_000,
        "thoughtsTokenCount": 500_000,
    }
    batch = actual_cost(table, "gemini", GEMINI, usage, Route.BATCH)
    assert batch == pytest.approx(0.30 / 2 + 0.03 + 2.50 / 2)
    assert actual_cost(table, "gemini", GEMINI, usage, Route.REALTIME) == pytest.approx(
        0.30 + 0.03 + 2.50
    )


# -- an account without a synchronous endpoint -----------------------------------------------


def test_a_batch_only_account_has_no_synchronous_candidates(table: PriceTable) -> None:
    """Bedrock (``realtime = false``) below its minimum: the batch does not fit and the
    request goes to the other account serving the model, never realtime at Bedrock."""
    text = (ROOT / "config" / "providers.toml").read_text()
    caps = parse_providers(text, env={"AWS_ACCESS_KEY_ID": "AKIA"})
    tiers = tier_options(caps, ("bedrock", "anthropic"))
    assert tiers["batch_only"] == frozenset({"bedrock"})
    options = RouteOptions(
        batch_turnaround_s={"bedrock": 3600.0, "anthropic": 3600.0},
        accounts={Endpoint.MESSAGES.value: ("bedrock", "anthropic")},
        prices=_both_price_bedrock(table),
        **tiers,
    )
    costs = {
        (Route.BATCH, "bedrock"): 0.001,
        (Route.REALTIME, "bedrock"): 0.002,
        (Route.BATCH, "anthropic"): 0.001,
        (Route.REALTIME, "anthropic"): 0.002,
    }

    def made_by(deadline_s: float) -> Decision:
        return decide(
            endpoint=Endpoint.MESSAGES.value,
            model=BEDROCK,
            deadline=NOW + deadline_s,
            now=NOW,
            options=options,
            costs=costs,
            pending=5,
        )

    made = made_by(86400)
    assert {(c.route, c.provider) for c in made.candidates} == {
        (Route.BATCH, "bedrock"),
        (Route.BATCH, "anthropic"),
        (Route.REALTIME, "anthropic"),
    }
    assert (made.route, made.provider) == (Route.BATCH, "anthropic")
    bedrock = next(c for c in made.candidates if c.provider == "bedrock")
    assert not bedrock.fits and "below the account's minimum of 100" in bedrock.why
    # a deadline no batch meets: realtime, at the account that has it
    soon = made_by(120)
    assert (soon.route, soon.provider) == (Route.REALTIME, "anthropic")


def _both_price_bedrock(table: PriceTable) -> PriceTable:
    """The table with the anthropic account pricing Bedrock's model name as Bedrock does, as
    an operator does to give those requests a second account."""
    prices = {name: dict(models) for name, models in table.prices.items()}
    prices["anthropic"][BEDROCK] = prices["bedrock"][BEDROCK]
    return table.model_copy(update={"prices": prices})


# -- end to end ------------------------------------------------------------------------------


def _prices_file(path: Path) -> Path:
    """The shipped table, with anthropic pricing BEDROCK as bedrock does and bedrock alone
    pricing BEDROCK_ONLY."""
    text = (ROOT / "config" / "prices.toml").read_text()
    entry = f'[providers.bedrock.models."{BEDROCK}"]'
    rows = text[text.index(entry) :].split("\n\n", 1)[0]
    second = rows.replace("providers.bedrock.", "providers.anthropic.")
    only = rows.replace(BEDROCK, BEDROCK_ONLY)
    path.write_text(f"{text}\n{second}\n\n{only}\n")
    return path


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[LocalStack]:
    tmp = tmp_path_factory.mktemp("usage")

    def env(base: str) -> dict[str, str]:
        # Bedrock keeps its minimum of 100 (providers_file lowers it for the other module);
        # anthropic is realtime only here, so the next-cheapest route is a synchronous one
        providers = providers_file(tmp / "providers.toml", base)
        text = providers.read_text().replace("min_records = 1 ", "min_records = 100 ")
        anthropic = 'api_key_env = "ANTHROPIC_API_KEY"\nalways_listed = true\nbatch = '
        assert f"{anthropic}true" in text
        providers.write_text(text.replace(f"{anthropic}true", f"{anthropic}false"))
        return {
            "MIXBATCH_PROVIDERS": json.dumps(ACCOUNTS),
            "MIXBATCH_PROVIDERS_FILE": str(providers),
            "MIXBATCH_PRICES_FILE": str(_prices_file(tmp / "prices.toml")),
            "MIXBATCH_BATCH_TURNAROUND_S": json.dumps(dict.fromkeys(ACCOUNTS, 5)),
            "MIXBATCH_ROUTE_ACCOUNTS": json.dumps({"/v1/messages": ["bedrock", "anthropic"]}),
        }

    knobs = Knobs(batch_turnaround_s=1.0, bedrock_min_records=100)
    with native_stack(tmp, _db_url(redis_url, 13), knobs, env) as s:
        yield s


def _run(stack: LocalStack, tenant: str, lane: str, items: list[dict[str, Any]]) -> list[Result]:
    with Client(stack.url, namespace="e2e", tenant=tenant) as client:
        tickets = client.submit_many([{"lane": lane, **item} for item in items])
        return [client.result(t.id, timeout=120) for t in tickets]


def _costs(stack: LocalStack) -> dict[str, Any]:
    reset_settings()
    try:
        out = CliRunner().invoke(
            cli,
            ["costs", "--json"],
            env={"MIXBATCH_REDIS_URL": stack.url, "MIXBATCH_NAMESPACE": "e2e"},
        )
    finally:
        reset_settings()
    assert out.exit_code == 0, out.output
    data: dict[str, Any] = json.loads(out.output)
    return data


def _gemini(stack: LocalStack, tenant: str, lane: str, route: Route, table: PriceTable) -> None:
    bodies = [
        {"contents": [{"role": "user", "parts": [{"text": f"{tenant} {i} " + "x" * 40 * i}]}]}
        for i in range(4)
    ]
    endpoint = Endpoint.GENERATE_CONTENT.value
    results = _run(
        stack, tenant, lane, [{"endpoint": endpoint, "model": GEMINI, "body": b} for b in bodies]
    )
    want = 0.0
    for body, result in zip(bodies, results, strict=True):
        assert result.status is State.DONE and result.route is route, result
        assert result.body is not None
        text = result.body["candidates"][0]["content"]["parts"][0]["text"]
        assert text == expected_gemini_reply(body, GEMINI)
        meta = result.body["usageMetadata"]
        assert result.usage == meta
        usd = actual_cost(table, "gemini", GEMINI, meta, route)
        assert usd > 0 and result.cost_usd == pytest.approx(usd)
        want += usd
    spent = _costs(stack)["tenant"][tenant]
    assert spent["count"] == len(bodies) and spent["cost"] == pytest.approx(want)


@pytest.mark.timeout(180)
def test_gemini_realtime_priced_from_usage_metadata(stack: LocalStack, table: PriceTable) -> None:
    _gemini(stack, "gemini-rt", "urgent", Route.REALTIME, table)


@pytest.mark.timeout(180)
def test_gemini_batch_priced_from_usage_metadata(stack: LocalStack, table: PriceTable) -> None:
    _gemini(stack, "gemini-batch", "bulk", Route.BATCH, table)


@pytest.mark.timeout(180)
def test_bedrock_below_its_minimum_goes_by_the_next_cheapest_route(stack: LocalStack) -> None:
    assert stack.sandbox is not None
    bodies = [
        {"max_tokens": 16, "messages": [{"role": "user", "content": f"few {i}?"}]} for i in range(5)
    ]
    endpoint = Endpoint.MESSAGES.value
    results = _run(
        stack,
        "bedrock",
        "bulk",
        [{"endpoint": endpoint, "model": BEDROCK, "body": b} for b in bodies],
    )
    for result in results:
        assert result.status is State.DONE, result
        assert (result.route, result.provider) == (Route.REALTIME, "anthropic"), result
    calls = stack.sandbox.stats()["calls_by_endpoint"]
    assert not any(path.startswith("/bedrock") for path in calls), calls


@pytest.mark.timeout(180)
def test_bedrock_below_its_minimum_with_no_other_route_fails_naming_it(stack: LocalStack) -> None:
    """No other account serves the model: the batch is the only candidate, the job is not
    created, and the requests fail with an error naming min_records, rather than wait."""
    assert stack.sandbox is not None
    items = [
        {
            "endpoint": Endpoint.MESSAGES.value,
            "model": BEDROCK_ONLY,
            "body": {"max_tokens": 16, "messages": [{"role": "user", "content": f"alone {i}?"}]},
        }
        for i in range(2)
    ]
    results = _run(stack, "bedrock-only", "bulk", items)
    for result in results:
        assert result.status is State.FAILED and result.error is not None, result
        assert result.error.code == "batch_rejected" and "min_records" in result.error.message
    calls = stack.sandbox.stats()["calls_by_endpoint"]
    assert not any(path.startswith("/bedrock") for path in calls), calls
