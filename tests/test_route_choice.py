"""The route choice as tables: candidates, the cheapest that fits, the fastest when none does,
the GPU, missing prices, learned estimates, hedging and the group's wait. Pure, no Redis."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from routing.decide.cost import PriceTable, parse_prices
from routing.decide.estimates import GpuEstimate, GpuObs, LatencyObs, Observations, TurnaroundObs
from routing.decide.flush import should_flush
from routing.decide.hedge import (
    batch_margin_s,
    batch_turnaround_s,
    hedge_alternative_s,
    should_hedge,
)
from routing.decide.lanes import parse_lanes
from routing.decide.options import LOCAL_PROVIDER, RouteOptions, learn
from routing.decide.ratelimit import Headroom
from routing.decide.route import Decision, choose_route, decide, group_key, provider_for
from routing.errors import ConfigError
from routing.models import Endpoint, Prepared, Request, Route, ServiceConfig, prepare

ROOT = Path(__file__).resolve().parent.parent
NOW = 1_000_000.0
CONFIG = ServiceConfig(lanes=parse_lanes((ROOT / "config" / "lanes.toml").read_text()))
PRICES = parse_prices((ROOT / "config" / "prices.toml").read_text(), source="prices.toml")
LOCAL = "all-MiniLM-L6-v2"
CHAT = "/v1/chat/completions"
EMBED = "/v1/embeddings"


def request(
    lane: str = "standard",
    model: str = "gpt-4o-mini",
    endpoint: str = CHAT,
    deadline_s: float | None = None,
) -> Prepared:
    if endpoint == EMBED:
        body: dict[str, Any] = {"model": model, "input": "hello world"}
    else:
        body = {"model": model, "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}
        if endpoint == Endpoint.MESSAGES.value:
            body["model"] = model
    req = Request(lane=lane, endpoint=endpoint, body=body)
    if deadline_s is not None:
        req = req.model_copy(update={"deadline": f"{deadline_s}s"})
    return prepare(req, CONFIG, NOW)


def options(**kw: Any) -> RouteOptions:
    base: dict[str, Any] = {
        "batch_turnaround_s": {"openai": 7200.0, "anthropic": 3600.0},
        "prices": PRICES,
        "batch_overhead_s": 62.0,
    }
    return RouteOptions(**{**base, **kw})


def observed(seconds: float, n: int = 10) -> Observations:
    """n OpenAI chat batches of gpt-4o-mini that all took ``seconds``."""
    return Observations(
        batch={f"openai|{CHAT}|gpt-4o-mini": [TurnaroundObs(NOW, seconds, 100)] * n}
    )


# -- the static rule is still what RouteOptions() does ------------------------------------------


@pytest.mark.parametrize(
    ("lane", "turnaround", "route", "provider"),
    [
        ("bulk", {"openai": 7200.0}, Route.BATCH, "openai"),
        ("standard", {"openai": 7200.0}, Route.REALTIME, "openai"),
        ("standard", {"openai": 60.0}, Route.BATCH, "openai"),
        ("urgent", {"openai": 5.0}, Route.REALTIME, "openai"),
        ("bulk", {}, Route.REALTIME, "openai"),  # no batch route at all
    ],
)
def test_static_rule_without_prices_or_observations(
    lane: str, turnaround: dict[str, float], route: Route, provider: str
) -> None:
    d = choose_route(request(lane), NOW, RouteOptions(batch_turnaround_s=turnaround))
    assert (d.route, d.provider) == (route, provider)
    assert d.reason and not d.warnings
    assert group_key(request(lane), d) == (route.value, provider, "gpt-4o-mini")


@pytest.mark.parametrize(
    ("endpoint", "model", "provider"),
    [(CHAT, "gpt-4o-mini", "openai"), ("/v1/messages", "claude-haiku-4-5", "anthropic")],
)
def test_provider_for_endpoint(endpoint: str, model: str, provider: str) -> None:
    assert provider_for(request(model=model, endpoint=endpoint)) == provider


# -- candidates, costs and the rule ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("lane", "seen", "route", "rule"),
    [
        # the prior (2 h) does not fit a 1 h deadline: realtime, the only one that fits
        ("standard", None, Route.REALTIME, "cheapest that fits"),
        # observed fast: the batch fits and costs half
        ("standard", 30.0, Route.BATCH, "cheapest that fits"),
        # observed slow: back to realtime
        ("standard", 3 * 3600.0, Route.REALTIME, "cheapest that fits"),
        ("bulk", 3 * 3600.0, Route.BATCH, "cheapest that fits"),
        # a 1-minute deadline: only realtime fits
        ("urgent", 30.0, Route.REALTIME, "cheapest that fits"),
    ],
)
def test_cheapest_route_that_fits(lane: str, seen: float | None, route: Route, rule: str) -> None:
    opts = options() if seen is None else learn(options(), observed(seen), NOW)
    d = choose_route(request(lane), NOW, opts)
    assert d.route is route and rule in d.reason
    by_route = {c.route: c for c in d.candidates}
    assert set(by_route) == {Route.BATCH, Route.REALTIME}
    batch, rt = by_route[Route.BATCH], by_route[Route.REALTIME]
    assert batch.expected_cost_usd == pytest.approx(rt.expected_cost_usd / 2)  # type: ignore[operator]
    assert batch.fits is (route is Route.BATCH)
    assert d.quantile == 0.95 and d.deadline == request(lane).deadline and d.decided_at == NOW


def test_nothing_fits_takes_the_fastest() -> None:
    """A deadline 3 s away: neither the batch nor a 30 s realtime call fits; realtime is faster."""
    d = choose_route(request(deadline_s=3), NOW, options())
    assert d.route is Route.REALTIME
    assert "nothing fits" in d.reason
    assert not any(c.fits for c in d.candidates)


def test_rate_limit_wait_counts_against_realtime() -> None:
    """Realtime has no headroom for 10 min; the local GPU serves the model: it wins."""
    seen = Observations(
        headroom={f"openai|{LOCAL}": Headroom(at=NOW, remaining_requests=0, reset_at=NOW + 600)},
        gpu={LOCAL: [GpuObs(NOW, 500.0, 1.0)]},
    )
    opts = learn(options(local_models=frozenset({LOCAL}), gpu_usd_per_hour=100.0), seen, NOW)
    d = choose_route(request("urgent", LOCAL, EMBED), NOW, opts)
    rt = next(c for c in d.candidates if c.route is Route.REALTIME)
    assert rt.expected_finish_s >= 600 and not rt.fits and "rate-limit wait" in rt.why
    assert d.route is Route.GPU


# -- the GPU ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "local", "gpu", "lane", "route"),
    [
        # not served locally: no GPU candidate
        ("gpt-4o-mini", frozenset({LOCAL}), None, "urgent", Route.REALTIME),
        # served locally, priors: cheap and fast enough for an urgent request
        (LOCAL, frozenset({LOCAL}), None, "urgent", Route.GPU),
        # a deep queue (10 min wait): too slow for urgent, realtime is the one that fits
        (LOCAL, frozenset({LOCAL}), GpuEstimate(model=LOCAL, wait_s=600, texts_per_s=500), "urgent", Route.REALTIME),
        # the same queue is fine for bulk, and still the cheapest
        (LOCAL, frozenset({LOCAL}), GpuEstimate(model=LOCAL, wait_s=600, texts_per_s=500), "bulk", Route.GPU),
        # reports stopped (worker gone): never chosen while anything else can serve
        (LOCAL, frozenset({LOCAL}), GpuEstimate(model=LOCAL, wait_s=0, texts_per_s=500, stale=True, age_s=4000), "bulk", Route.BATCH),
    ],
)  # fmt: skip
def test_gpu_candidate(
    model: str, local: frozenset[str], gpu: GpuEstimate | None, lane: str, route: Route
) -> None:
    opts = options(local_models=local, gpu={LOCAL: gpu} if gpu else {})
    d = choose_route(request(lane, model, EMBED), NOW, opts)
    assert d.route is route, d.reason
    routes = {c.route for c in d.candidates}
    assert (Route.GPU in routes) is (model in local)
    if route is Route.GPU:
        assert d.provider == LOCAL_PROVIDER


def test_gpu_price_from_the_table_or_the_hardware() -> None:
    """The table's ``local`` entry prices the GPU; without one, the hourly price / throughput."""
    table = parse_prices(
        '[providers.local.models."all-MiniLM-L6-v2"]\ninput_usd_per_mtok = 1000.0\n'
        '[providers.openai.models."all-MiniLM-L6-v2"]\ninput_usd_per_mtok = 0.02\n'
    )
    gpu = {LOCAL: GpuEstimate(model=LOCAL, wait_s=0.1, texts_per_s=100.0)}
    priced = choose_route(
        request("urgent", LOCAL, EMBED),
        NOW,
        options(prices=table, local_models=frozenset({LOCAL}), gpu=gpu),
    )
    assert priced.route is Route.REALTIME, "the table says the GPU is dearer here"
    hourly = choose_route(
        request("urgent", LOCAL, EMBED),
        NOW,
        options(local_models=frozenset({LOCAL}), gpu=gpu, gpu_usd_per_hour=3.6),
    )
    c = next(c for c in hourly.candidates if c.route is Route.GPU)
    assert c.expected_cost_usd == pytest.approx(3.6 / 3600 / 100)


# -- bad input: a model without a price, a quantile outside (0, 1) ------------------------------


@pytest.mark.parametrize(
    ("lane", "route"),
    [("bulk", Route.BATCH), ("standard", Route.REALTIME), ("urgent", Route.REALTIME)],
)
def test_missing_price_routes_on_deadline_alone_with_a_warning(lane: str, route: Route) -> None:
    d = choose_route(request(lane, "gpt-9-unpriced"), NOW, options())
    assert d.route is route
    assert d.warnings and all("gpt-9-unpriced" in w for w in d.warnings)
    assert any("deadline alone" in w for w in d.warnings)
    assert all(c.expected_cost_usd is None for c in d.candidates)
    assert "no prices" in d.reason


@pytest.mark.parametrize("q", [0.0, 1.0, -0.5, 1.01, math.nan])
def test_quantile_outside_zero_one_is_refused(q: float) -> None:
    with pytest.raises(ValidationError, match="between 0 and 1"):
        RouteOptions(quantile=q)


def test_quantile_setting_names_its_variable() -> None:
    from config.settings import Settings
    from tasks.runtime import route_settings

    # model_construct skips the field's own bounds, as a quantile read from elsewhere would
    bad = Settings.model_construct(route_quantile=1.5)
    with pytest.raises(ConfigError, match="MIXBATCH_ROUTE_QUANTILE") as info:
        route_settings(bad)
    assert "1.5" in str(info.value)


def test_flushed_observations_fall_back_to_priors() -> None:
    opts = learn(options(), Observations(), NOW)
    d = choose_route(request("bulk"), NOW, opts)
    batch = next(c for c in d.candidates if c.route is Route.BATCH)
    assert batch.expected_finish_s == 7200.0 + 62.0 and "prior" in batch.estimate


# -- learned estimates: pooling, size, accounts ---------------------------------------------------


def test_a_new_model_borrows_its_accounts_estimate() -> None:
    """gpt-4o has no history, gpt-4o-mini does: the account's pooled estimate is used."""
    opts = learn(options(), observed(30.0), NOW)
    d = choose_route(request("standard", "gpt-4o"), NOW, opts)
    batch = next(c for c in d.candidates if c.route is Route.BATCH)
    assert batch.expected_finish_s == 30.0 + 62.0 and "observed" in batch.estimate
    assert d.route is Route.BATCH


def test_batch_turnaround_at_size() -> None:
    obs = [TurnaroundObs(NOW, 10.0 * n**0.5, n) for n in (10, 30, 100, 300, 1000) for _ in (1, 2)]
    seen = Observations(batch={f"openai|{CHAT}|gpt-4o-mini": obs})
    opts = learn(options(), seen, NOW)
    small = batch_turnaround_s(opts, "openai", CHAT, "gpt-4o-mini", 10)
    large = batch_turnaround_s(opts, "openai", CHAT, "gpt-4o-mini", 10_000)
    assert small is not None and large is not None and large[0] > 10 * small[0]
    assert batch_turnaround_s(opts, "groq", CHAT, "gpt-4o-mini") is None


def test_accounts_are_filtered_by_the_price_table() -> None:
    """Two accounts serve chat; only the one that prices the model is a candidate for it."""
    table = parse_prices(
        '[providers.openai.models."gpt-4o-mini"]\ninput_usd_per_mtok = 0.15\n'
        '[providers.together.models."llama"]\ninput_usd_per_mtok = 0.18\n'
    )
    opts = options(
        prices=table,
        accounts={CHAT: ("openai", "together")},
        batch_turnaround_s={"openai": 60.0, "together": 60.0},
    )
    mini = choose_route(request("bulk", "gpt-4o-mini"), NOW, opts)
    llama = choose_route(request("bulk", "llama"), NOW, opts)
    assert {c.provider for c in mini.candidates} == {"openai"}
    assert {c.provider for c in llama.candidates} == {"together"}
    assert llama.provider == "together"


def test_learn_pools_realtime_and_maps_gpu_aliases() -> None:
    seen = Observations(
        realtime={"openai|gpt-4o-mini": [LatencyObs(NOW - 60.0, 2.0)] * 10},
        gpu={"sentence-transformers/all-MiniLM-L6-v2": [GpuObs(NOW, 800.0, 0.2)]},
        gpu_aliases={LOCAL: "sentence-transformers/all-MiniLM-L6-v2"},
    )
    opts = learn(options(), seen, NOW)
    assert opts.realtime_estimates["openai|gpt-4o-mini"].seconds == 2.0
    assert opts.realtime_estimates["openai|*"].seconds == 2.0
    assert opts.gpu[LOCAL].texts_per_s == 800.0


# -- hedging and the group's wait -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("slack", "latency", "local", "hedge"),
    [
        (500.0, None, False, False),  # prior 30 s + 120 s margin: plenty of time
        (140.0, None, False, True),
        (140.0, 2.0, False, False),  # learned: realtime takes 2 s, so 122 s is enough
        (100.0, 2.0, False, True),
        (140.0, 60.0, True, False),  # realtime slow, but the GPU (about 3 s) serves the model
    ],
)
def test_should_hedge_uses_the_fastest_learned_alternative(
    slack: float, latency: float | None, local: bool, hedge: bool
) -> None:
    seen = Observations(
        realtime={}
        if latency is None
        else {f"openai|{LOCAL}": [LatencyObs(NOW - 60, latency)] * 10}
    )
    opts = learn(options(local_models=frozenset({LOCAL}) if local else frozenset()), seen, NOW)
    assert should_hedge(NOW + slack, NOW, opts, endpoint=EMBED, model=LOCAL) is hedge


def test_should_hedge_without_a_model_is_the_static_rule() -> None:
    opts = RouteOptions(realtime_estimate_s=5, hedge_margin_s=80)
    assert should_hedge(NOW + 84, NOW, opts) and not should_hedge(NOW + 86, NOW, opts)
    assert hedge_alternative_s(opts) == 5


def test_batch_margin_covers_the_hedge() -> None:
    """A batch is never chosen for a request the hedge would take away at once."""
    opts = options(margin_s=10.0, hedge_margin_s=120.0, realtime_estimate_s=30.0)
    assert batch_margin_s(opts, CHAT, "gpt-4o-mini") == 150.0
    learned = learn(opts, observed(1.0), NOW)
    assert choose_route(request(deadline_s=200), NOW, learned).route is Route.REALTIME
    d = choose_route(request(deadline_s=250), NOW, learned)
    assert d.route is Route.BATCH
    finish = NOW + d.candidates[0].expected_finish_s
    kw = {"endpoint": CHAT, "model": "gpt-4o-mini"}
    assert not should_hedge(NOW + 250, finish, learned, **kw), "not hedged before it is due"


@pytest.mark.parametrize(
    ("seen", "slack", "flush"),
    [
        (60.0, 3000.0, False),  # fast provider: a standard group can keep filling
        (3000.0, 3000.0, True),  # slow provider: waiting would risk the tightest deadline
    ],
)
def test_group_waits_only_while_its_tightest_deadline_allows(
    seen: float, slack: float, flush: bool
) -> None:
    opts = learn(options(), observed(seen), NOW)
    found = batch_turnaround_s(opts, "openai", CHAT, "gpt-4o-mini", 10)
    assert found is not None
    go, why = should_flush(
        1000,
        10,
        NOW + slack,
        NOW,
        target_bytes=10**9,
        turnaround_s=found[0] + opts.batch_overhead_s,
        margin_s=batch_margin_s(opts, CHAT, "gpt-4o-mini"),
        max_wait_s=300.0,
        windows_due=False,
        oldest_enqueued_at=NOW,
        wait_step_s=2.0,
    )
    assert go is flush
    assert why.startswith("deadline" if flush else "waiting")


# -- the decision as explain stores it ------------------------------------------------------------


def test_decision_round_trips_through_json_even_with_a_dead_gpu() -> None:
    opts = options(
        local_models=frozenset({LOCAL}),
        gpu={LOCAL: GpuEstimate(model=LOCAL, wait_s=0, texts_per_s=1, stale=True, age_s=1e4)},
    )
    d = choose_route(request("bulk", LOCAL, EMBED), NOW, opts)
    again = Decision.model_validate_json(d.model_dump_json())
    assert again == d
    assert math.isinf(next(c for c in again.candidates if c.route is Route.GPU).expected_finish_s)


def test_decide_over_plain_data_matches_choose_route() -> None:
    """The simulation calls ``decide`` with precomputed costs; it must agree with the service."""
    from routing.decide.route import request_costs

    req = request("standard")
    opts = learn(options(), observed(30.0), NOW)
    costs, warnings = request_costs(req, opts)
    plain = decide(
        endpoint=CHAT,
        model="gpt-4o-mini",
        deadline=req.deadline,
        now=NOW,
        options=opts,
        costs=costs,
        warnings=warnings,
    )
    assert plain == choose_route(req, NOW, opts)


def test_price_table_is_a_price_table() -> None:
    assert isinstance(options().prices, PriceTable)
