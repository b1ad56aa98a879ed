"""The cost model: the price file, token estimates, estimated and actual costs. All pure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from routing.decide.cost import (
    DEFAULT_OUTPUT_TOKENS,
    IMAGE_TOKENS,
    MESSAGE_OVERHEAD_TOKENS,
    ModelPrice,
    PriceTable,
    TokenUsage,
    actual_cost,
    estimate_cost,
    estimate_tokens,
    parse_prices,
    saved_vs_realtime,
    usage_tokens,
)
from routing.errors import ConfigError
from routing.models import Endpoint, Route

PRICES_FILE = Path(__file__).resolve().parent.parent / "config" / "prices.toml"
M = MESSAGE_OVERHEAD_TOKENS

TABLE = PriceTable(
    prices={
        "openai": {
            "chat": ModelPrice(
                input_usd_per_mtok=2.0,
                output_usd_per_mtok=8.0,
                cached_input_usd_per_mtok=0.5,
                batch_discount=0.5,
            ),
            "emb": ModelPrice(input_usd_per_mtok=0.1, batch_discount=0.5),
        },
        "anthropic": {
            "claude": ModelPrice(
                input_usd_per_mtok=3.0,
                output_usd_per_mtok=15.0,
                cached_input_usd_per_mtok=0.3,
                cache_write_usd_per_mtok=3.75,
                batch_discount=0.5,
            )
        },
        "local": {"chat": ModelPrice(input_usd_per_mtok=0.01, output_usd_per_mtok=0.01)},
    },
    source="test-prices.toml",
)


# -- the price file ------------------------------------------------------------------------------


def test_shipped_price_file() -> None:
    table = parse_prices(PRICES_FILE.read_text(), source=str(PRICES_FILE))
    for provider, model in [
        ("openai", "gpt-4o-mini"),
        ("openai", "gpt-4o"),
        ("openai", "text-embedding-3-small"),
        ("openai", "text-embedding-3-large"),
        ("anthropic", "claude-haiku-4-5"),
        ("anthropic", "claude-sonnet-4-5"),
        ("anthropic", "claude-3-5-haiku-latest"),
    ]:
        price = table.lookup(provider, model)
        assert price is not None, (provider, model)
        assert price.batch_discount == 0.5
        assert price.input_usd_per_mtok > 0
    emb = table.lookup("openai", "text-embedding-3-small")
    assert emb is not None and emb.output_usd_per_mtok == 0


GOOD = """\
[providers.openai]
batch_discount = 0.5

[providers.openai.models."gpt-x"]
input_usd_per_mtok = 1.0
output_usd_per_mtok = 4.0

[providers.openai.models."gpt-y"]
input_usd_per_mtok = 1.0
batch_discount = 0.25

[providers.local.models.mini]
input_usd_per_mtok = 0.01
"""


def test_parse_prices_with_defaults_and_overrides() -> None:
    table = parse_prices(GOOD, "p.toml")
    assert table.source == "p.toml"
    assert table.lookup("openai", "gpt-x") == ModelPrice(
        input_usd_per_mtok=1.0, output_usd_per_mtok=4.0, batch_discount=0.5
    )
    y = table.lookup("openai", "gpt-y")
    assert y is not None and y.batch_discount == 0.25
    mini = table.lookup("local", "mini")
    assert mini is not None and mini.batch_discount == 0.0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("[providers", "p.toml: not valid TOML", id="not-toml"),
        pytest.param("[lanes.x]\n", "needs at least one [providers.NAME]", id="no-providers"),
        pytest.param("providers = 3\n", "needs at least one [providers.NAME]", id="not-a-table"),
        pytest.param(
            "[providers]\nopenai = 1\n",
            "p.toml, line 2 ([providers.openai]): must be a table",
            id="provider-not-table",
        ),
        pytest.param(
            "\n[providers.openai]\ndiscount = 0.5\n",
            "p.toml, line 2 ([providers.openai]): unknown key 'discount'",
            id="unknown-provider-key",
        ),
        pytest.param(
            '[providers.openai]\n\n[providers.openai.models."m"]\ninput_usd_per_mtok = -1\n',
            "p.toml, line 3 ([providers.openai.models.m]): input_usd_per_mtok:",
            id="negative-price",
        ),
        pytest.param(
            "[providers.openai.models.m]\ninput_usd_per_mtok = 1\ninput_price = 2\n",
            "line 1 ([providers.openai.models.m]): input_price: Extra inputs",
            id="unknown-model-key",
        ),
        pytest.param(
            "[providers.openai.models.m]\noutput_usd_per_mtok = 1\n",
            "input_usd_per_mtok: Field required",
            id="missing-input",
        ),
        pytest.param(
            "[providers.openai]\nbatch_discount = 1.0\n[providers.openai.models.m]\n"
            "input_usd_per_mtok = 1\n",
            "line 3 ([providers.openai.models.m]): batch_discount:",
            id="discount-of-one",
        ),
        pytest.param(
            "[providers.openai]\nmodels = 3\n", "models must be a table", id="models-not-table"
        ),
    ],
)
def test_parse_prices_errors_name_the_line(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_prices(text, "p.toml")
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("provider", "model", "found"),
    [
        ("openai", "chat", True),
        ("openai", "chat-2024-07-18", True),
        ("openai", "chat-20240718", True),
        ("openai", "chat-latest", True),
        ("openai", "chat-mini", False),
        ("openai", "claude", False),
        ("nobody", "chat", False),
    ],
)
def test_lookup_falls_back_from_snapshots(provider: str, model: str, found: bool) -> None:
    assert (TABLE.lookup(provider, model) is not None) is found


# -- token estimates -----------------------------------------------------------------------------

CHAT, EMB, RESP, MSG = Endpoint.CHAT, Endpoint.EMBEDDINGS, Endpoint.RESPONSES, Endpoint.MESSAGES


@pytest.mark.parametrize(
    ("endpoint", "body", "expected"),
    [
        pytest.param(
            CHAT, {"messages": [{"role": "user", "content": "x" * 40}]}, (M + 10, 256), id="chat"
        ),
        pytest.param(
            CHAT,
            {"messages": [{"role": "user", "content": "x" * 41}], "max_tokens": 20, "n": 3},
            (M + 11, 60),
            id="chat-n",
        ),
        pytest.param(
            "/v1/chat/completions",
            {"messages": [], "max_tokens": 20, "max_completion_tokens": 30},
            (0, 30),
            id="max-completion-first",
        ),
        pytest.param(
            CHAT,
            {
                "messages": [
                    {"role": "system", "content": "y" * 8},
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "x" * 8},
                            {"type": "image_url", "image_url": {"url": "https://e/x.png"}},
                        ],
                    },
                ]
            },
            (2 * M + 2 + 2 + IMAGE_TOKENS, DEFAULT_OUTPUT_TOKENS),
            id="parts-and-image",
        ),
        pytest.param(
            CHAT,
            {"messages": [], "tools": [{"type": "function", "function": {"name": "f"}}]},
            (12, 256),
            id="tools",
        ),
        pytest.param(EMB, {"input": "x" * 9}, (3, 0), id="embedding"),
        pytest.param(EMB, {"input": ["x" * 4, "y" * 8]}, (3, 0), id="embeddings"),
        pytest.param(EMB, {"input": [1, 2, 3, 4, 5]}, (5, 0), id="token-array"),
        pytest.param(EMB, {"input": [[1, 2], [3, 4, 5]]}, (5, 0), id="token-arrays"),
        pytest.param(RESP, {"input": "x" * 12}, (3, 256), id="responses-text"),
        pytest.param(
            RESP,
            {
                "instructions": "i" * 4,
                "input": [{"role": "user", "content": [{"type": "input_text", "text": "x" * 4}]}],
                "max_output_tokens": 50,
            },
            (1 + M + 1, 50),
            id="responses-items",
        ),
        pytest.param(
            MSG,
            {
                "system": "s" * 16,
                "messages": [{"role": "user", "content": "x" * 4}],
                "max_tokens": 64,
            },
            (4 + M + 1, 64),
            id="messages",
        ),
        pytest.param(MSG, {"messages": "oops", "max_tokens": True}, (0, 256), id="garbage"),
    ],
)
def test_estimate_tokens(
    endpoint: Endpoint | str, body: dict[str, Any], expected: tuple[int, int]
) -> None:
    assert estimate_tokens(endpoint, body) == expected


# -- estimated cost ------------------------------------------------------------------------------

CHAT_BODY = {
    "messages": [{"role": "user", "content": "x" * (4 * (1_000_000 - M))}],
    "max_tokens": 500_000,
}


@pytest.mark.parametrize(
    ("provider", "model", "route", "usd"),
    [
        ("openai", "chat", Route.REALTIME, 2.0 + 4.0),
        ("openai", "chat", Route.BATCH, (2.0 + 4.0) / 2),
        ("local", "chat", Route.GPU, 0.01 + 0.005),
        ("local", "chat", Route.BATCH, 0.01 + 0.005),
    ],
)
def test_estimate_cost(provider: str, model: str, route: Route, usd: float) -> None:
    estimate = estimate_cost(TABLE, provider, model, CHAT, CHAT_BODY, route)
    assert estimate.known and estimate.warning is None
    assert (estimate.input_tokens, estimate.output_tokens) == (1_000_000, 500_000)
    assert estimate.usd == pytest.approx(usd)
    assert estimate.route is route


def test_unknown_model_still_estimates_with_a_warning() -> None:
    estimate = estimate_cost(TABLE, "openai", "gpt-9", CHAT, CHAT_BODY, Route.BATCH)
    assert not estimate.known
    assert estimate.usd == 0.0
    assert estimate.input_tokens == 1_000_000
    assert estimate.warning is not None
    assert "'gpt-9'" in estimate.warning and "test-prices.toml" in estimate.warning


# -- actual cost ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("usage", "tokens"),
    [
        pytest.param(
            {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120},
            TokenUsage(input=100, output=20),
            id="chat",
        ),
        pytest.param(
            {
                "prompt_tokens": 100,
                "completion_tokens": 20,
                "prompt_tokens_details": {"cached_tokens": 60},
            },
            TokenUsage(input=40, cached_input=60, output=20),
            id="chat-cached",
        ),
        pytest.param({"prompt_tokens": 7, "total_tokens": 7}, TokenUsage(input=7), id="embeddings"),
        pytest.param(
            {
                "input_tokens": 50,
                "output_tokens": 10,
                "input_tokens_details": {"cached_tokens": 20},
                "output_tokens_details": {"reasoning_tokens": 4},
            },
            TokenUsage(input=30, cached_input=20, output=10),
            id="responses",
        ),
        pytest.param(
            {
                "input_tokens": 50,
                "output_tokens": 10,
                "cache_creation_input_tokens": 200,
                "cache_read_input_tokens": 300,
            },
            TokenUsage(input=50, cached_input=300, cache_write=200, output=10),
            id="anthropic",
        ),
        pytest.param(
            {"input_tokens": 5, "output_tokens": 1, "cache_read_input_tokens": None},
            TokenUsage(input=5, output=1),
            id="anthropic-nulls",
        ),
        pytest.param({}, TokenUsage(), id="empty"),
        pytest.param(
            {"prompt_tokens": "many", "completion_tokens": -3}, TokenUsage(), id="garbage"
        ),
    ],
)
def test_usage_tokens(usage: dict[str, Any], tokens: TokenUsage) -> None:
    assert usage_tokens(usage) == tokens


@pytest.mark.parametrize(
    ("provider", "model", "usage", "route", "usd"),
    [
        (
            "openai",
            "chat",
            {"prompt_tokens": 1_000_000, "completion_tokens": 1_000_000},
            Route.REALTIME,
            10.0,
        ),
        (
            "openai",
            "chat-2024-07-18",
            {"prompt_tokens": 1_000_000, "completion_tokens": 1_000_000},
            Route.BATCH,
            5.0,
        ),
        (
            "openai",
            "chat",
            {"prompt_tokens": 2_000_000, "prompt_tokens_details": {"cached_tokens": 1_000_000}},
            Route.REALTIME,
            2.5,
        ),
        ("openai", "emb", {"prompt_tokens": 10_000_000}, Route.BATCH, 0.5),
        (
            "anthropic",
            "claude",
            {
                "input_tokens": 1_000_000,
                "output_tokens": 1_000_000,
                "cache_read_input_tokens": 1_000_000,
                "cache_creation_input_tokens": 1_000_000,
            },
            Route.REALTIME,
            3.0 + 15.0 + 0.3 + 3.75,
        ),
        ("openai", "unknown", {"prompt_tokens": 1_000_000}, Route.REALTIME, 0.0),
    ],
)
def test_actual_cost(
    provider: str, model: str, usage: dict[str, Any], route: Route, usd: float
) -> None:
    assert actual_cost(TABLE, provider, model, usage, route) == pytest.approx(usd)


def test_cache_prices_default_to_the_input_price() -> None:
    table = PriceTable(prices={"p": {"m": ModelPrice(input_usd_per_mtok=1.0)}})
    usage = {"input_tokens": 1_000_000, "cache_read_input_tokens": 1_000_000}
    assert actual_cost(table, "p", "m", usage, Route.REALTIME) == pytest.approx(2.0)


@pytest.mark.parametrize(
    ("provider", "route", "realtime_provider", "saved"),
    [
        ("openai", Route.BATCH, None, 5.0),
        ("openai", Route.REALTIME, None, 0.0),
        ("local", Route.GPU, "openai", 10.0 - 0.02),
        ("local", Route.GPU, "anthropic", 0.0),
        ("nobody", Route.BATCH, None, 0.0),
    ],
)
def test_saved_vs_realtime(
    provider: str, route: Route, realtime_provider: str | None, saved: float
) -> None:
    usage = {"prompt_tokens": 1_000_000, "completion_tokens": 1_000_000}
    got = saved_vs_realtime(
        TABLE, provider, "chat", usage, route, realtime_provider=realtime_provider
    )
    assert got == pytest.approx(saved)
