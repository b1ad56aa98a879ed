"""Size-aware batching: a group below the account's minimum, or too small to pay for its batch's
overhead, goes by the next-cheapest route (flex where it exists) instead of waiting to fill."""

from __future__ import annotations

from pathlib import Path

import pytest

from routing.decide.cost import PriceTable, parse_prices
from routing.decide.flush import batch_pays
from routing.decide.options import RouteOptions
from routing.decide.route import choose_route, choose_routes
from routing.models import Endpoint, Prepared, Route

ROOT = Path(__file__).resolve().parent.parent
NOW = 1_000_000.0


@pytest.fixture(scope="module")
def table() -> PriceTable:
    return parse_prices((ROOT / "config" / "prices.toml").read_text())


def _req(model: str = "gpt-5-mini", deadline_s: float = 86400.0) -> Prepared:
    return Prepared(
        tenant="t",
        custom_id=None,
        lane="bulk",
        deadline=NOW + deadline_s,
        endpoint=Endpoint.CHAT,
        model=model,
        body={"model": model, "messages": [{"role": "user", "content": "x" * 400}]},
        metadata={},
        callback=None,
        max_attempts=3,
        created_at=NOW,
    )


def _options(table: PriceTable, **extra: object) -> RouteOptions:
    return RouteOptions(
        batch_turnaround_s={"openai": 3600.0},
        prices=table,
        flex_models={"openai": frozenset({"gpt-5-mini"})},
        flex_latency_s={"openai": 600.0},
        **extra,  # type: ignore[arg-type]
    )


def test_batch_pays_rules() -> None:
    assert batch_pays(5, min_lines=100) == (
        False,
        "too small: 5 lines, below the account's minimum of 100",
    )
    assert batch_pays(100, min_lines=100)[0]
    assert not batch_pays(10, saving_usd_per_line=0.001, overhead_usd=0.05)[0]
    assert batch_pays(50, saving_usd_per_line=0.001, overhead_usd=0.05)[0]
    assert batch_pays(1, saving_usd_per_line=None, overhead_usd=0.05)[0]


def test_below_the_minimum_goes_flex_instead_of_waiting(table: PriceTable) -> None:
    """With flex dearer than batch (40 % off against 50 %), a big enough group batches and a
    small one goes flex; at equal prices flex wins anyway, being faster."""
    dearer = parse_prices(
        (ROOT / "config" / "prices.toml")
        .read_text()
        .replace("flex_discount = 0.5          # flex", "flex_discount = 0.4          # flex", 1)
    )
    options = _options(dearer, batch_min_lines={"openai": 100})
    assert choose_route(_req(), NOW, _options(table), pending=100).route is Route.FLEX
    small = choose_route(_req(), NOW, options, pending=10)
    assert small.route is Route.FLEX
    batch = next(c for c in small.candidates if c.route is Route.BATCH)
    assert not batch.fits and "below the account's minimum of 100" in batch.why
    # enough of them in one claim, or already waiting in the group: the batch pays
    assert choose_route(_req(), NOW, options, pending=100).route is Route.BATCH
    waiting = options.model_copy(
        update={"batch_waiting": {f"openai|{Endpoint.CHAT.value}|gpt-5-mini": 99}}
    )
    assert choose_route(_req(), NOW, waiting, pending=1).route is Route.BATCH


def test_a_claim_counts_its_own_lines_toward_the_group(table: PriceTable) -> None:
    options = _options(table, batch_min_lines={"openai": 20})
    few = choose_routes({f"r{i}": _req("gpt-4o-mini") for i in range(5)}, NOW, options)
    many = choose_routes({f"r{i}": _req("gpt-4o-mini") for i in range(25)}, NOW, options)
    assert {d.route for d in few.values()} == {Route.REALTIME}
    assert {d.route for d in many.values()} == {Route.BATCH}


def test_below_the_break_even_size_goes_by_the_next_cheapest(table: PriceTable) -> None:
    """A batch whose lines' saving over flex does not cover its overhead is not made; without
    flex (gpt-4o-mini) the next-cheapest is realtime."""
    priced = parse_prices(
        (ROOT / "config" / "prices.toml")
        .read_text()
        .replace("[providers.openai]\n", "[providers.openai]\nbatch_overhead_usd = 0.01\n", 1)
    )
    options = _options(priced)
    # gpt-4o-mini: batch saves about half of a ~$0.0002 call per line, far below $0.01
    no_flex = choose_route(_req("gpt-4o-mini"), NOW, options, pending=3)
    assert no_flex.route is Route.REALTIME
    assert "below the batch's overhead" in next(
        c.why for c in no_flex.candidates if c.route is Route.BATCH
    )
    # flex is priced at batch rates: a batch saves nothing over it, so flex it is
    assert choose_route(_req(), NOW, options, pending=500).route is Route.FLEX
    # without the overhead the same claim batches
    assert choose_route(_req("gpt-4o-mini"), NOW, _options(table), pending=3).route is Route.BATCH
