"""``choose_routes`` decides once per class of identical inputs (issue 16): on any claim its
decisions equal deciding every request on its own, as the rule did before. Pure, no Redis."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from routing.decide.cost import parse_prices
from routing.decide.lanes import parse_lanes
from routing.decide.options import RouteOptions
from routing.decide.route import Decision, _tier_warning, choose_routes, decide_one, request_costs
from routing.models import Prepared, Request, ServiceConfig, prepare

ROOT = Path(__file__).resolve().parent.parent
NOW = 1_000_000.0
CONFIG = ServiceConfig(lanes=parse_lanes((ROOT / "config" / "lanes.toml").read_text()))
PRICES = parse_prices((ROOT / "config" / "prices.toml").read_text(), source="prices.toml")
CHAT = "/v1/chat/completions"
EMBED = "/v1/embeddings"
#: priced chat, an unpriced chat model, a local embedding model, a provider embedding model
MODELS = [(CHAT, "gpt-4o-mini"), (CHAT, "no-such-model"), (EMBED, "all-MiniLM-L6-v2")]
MODELS += [(EMBED, "text-embedding-3-small")]


def one_by_one(request: Prepared, options: RouteOptions, pending: int) -> Decision:
    """The rule without the class memo: this request's own prices and its own ``decide``."""
    costs, warnings = request_costs(request, options)  # no memo: priced alone
    decision = decide_one(request, NOW, options, costs, warnings, pending)
    note = _tier_warning(request, decision)
    if note is not None:
        decision.warnings.append(note)
    return decision


@st.composite
def claims(draw: st.DrawFn) -> dict[str, Prepared]:
    """A claim of up to 30 requests from few lanes, models, deadlines and body sizes, so that
    classes repeat and also differ in one input at a time."""
    out: dict[str, Prepared] = {}
    for i in range(draw(st.integers(1, 30))):
        endpoint, model = draw(st.sampled_from(MODELS))
        words = draw(st.sampled_from([1, 1, 40, 400, 4000]))
        text = " ".join(["ticket"] * words)
        body: dict[str, Any]
        if endpoint == EMBED:
            body = {"model": model, "input": text}
        else:
            body = {"model": model, "max_tokens": draw(st.sampled_from([16, 16, 2048])),
                    "messages": [{"role": "user", "content": text}]}  # fmt: skip
            tier = draw(st.sampled_from([None, None, "flex", "priority"]))
            if tier is not None:
                body["service_tier"] = tier
        deadline = draw(st.sampled_from(["90s", "20m", "1h", "6h", "1h", "3000.5s"]))
        lane = draw(st.sampled_from(["bulk", "bulk", "standard", "urgent"]))
        req = Request(lane=lane, endpoint=endpoint, body=body, deadline=deadline)
        out[f"r{i}"] = prepare(req, CONFIG, NOW)
    return out


options_st = st.builds(
    RouteOptions,
    batch_turnaround_s=st.sampled_from([{"openai": 1800.0}, {"openai": 7200.0, "anthropic": 60.0}]),
    prices=st.sampled_from([PRICES, None]),
    batch_overhead_s=st.sampled_from([0.0, 62.0]),
    local_models=st.sampled_from([frozenset(), frozenset({"all-MiniLM-L6-v2"})]),
    flex_models=st.sampled_from([{}, {"openai": frozenset({"gpt-4o-mini"})}]),
    priority_models=st.sampled_from([{}, {"openai": frozenset({"gpt-4o-mini"})}]),
    priority_lanes=st.sampled_from([frozenset(), frozenset({"urgent"})]),
    batch_min_lines=st.sampled_from([{}, {"openai": 3}, {"openai": 12}]),
    batch_waiting=st.sampled_from([{}, {f"openai|{CHAT}|gpt-4o-mini": 5}]),
)


@settings(max_examples=150, deadline=None)
@given(claim=claims(), options=options_st)
def test_memoized_choice_equals_one_by_one(
    claim: dict[str, Prepared], options: RouteOptions
) -> None:
    chosen = choose_routes(claim, NOW, options)
    pending: dict[tuple[str, str], int] = {}
    for r in claim.values():
        pending[(r.endpoint.value, r.model)] = pending.get((r.endpoint.value, r.model), 0) + 1
    for rid, r in claim.items():
        alone = one_by_one(r, options, pending[(r.endpoint.value, r.model)])
        assert chosen[rid].model_dump() == alone.model_dump(), rid


def test_classes_share_a_decision_and_a_tier_note_is_its_own() -> None:
    """Twenty identical requests: one ``Decision``; one of them asking for a tier the model has
    nowhere gets its own copy with the note, and the shared one stays without it."""
    body = {
        "model": "gpt-4o-mini",
        "max_tokens": 16,
        "messages": [{"role": "user", "content": "hi"}],
    }
    claim = {
        f"r{i}": prepare(Request(lane="bulk", endpoint=CHAT, body=body), CONFIG, NOW)
        for i in range(20)
    }
    asks = {**body, "service_tier": "priority"}
    claim["odd"] = prepare(Request(lane="bulk", endpoint=CHAT, body=asks), CONFIG, NOW)
    options = RouteOptions(batch_turnaround_s={"openai": 1800.0}, prices=PRICES)
    chosen = choose_routes(claim, NOW, options)
    assert len({id(chosen[f"r{i}"]) for i in range(20)}) == 1
    assert chosen["r0"].warnings == []
    assert any("service_tier 'priority'" in w for w in chosen["odd"].warnings)
    assert chosen["odd"].route == chosen["r0"].route
