"""The planner simulation at a reduced size: its invariants, and that it measures what it claims.

The full-size figures (1,000,000 requests) are in docs/benchmarks.md; here 20,000 requests
through all five policies must keep every request (answered, delivered exactly once by the
service's own state machine and token rule, refused answers counted), count misses per lane,
rank the policies sensibly, give every policy the same world draws, and keep the urgent and
standard lanes under 0.1 % misses in the rate-limited and flex-shedding worlds.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

import benchmarks.sim.batches
from benchmarks.planner_sim import (
    LANES,
    POLICIES,
    Config,
    Sim,
    World,
    check_invariants,
    main,
    make_traffic,
    run_all,
)
from benchmarks.sim.world import Traffic
from routing.decide import hedge
from routing.states import State

N = 20_000


@pytest.fixture(scope="module")
def reports() -> dict[str, dict[str, Any]]:
    return {r["policy"]: r for r in run_all(Config(n=N), POLICIES, jobs=1)}


@pytest.mark.parametrize("policy", POLICIES)
def test_no_request_lost_or_delivered_twice(
    reports: dict[str, dict[str, Any]], policy: str
) -> None:
    r = reports[policy]
    check_invariants(r)
    assert r["n"] == N and r["lost"] == 0 and r["delivered_twice"] == 0
    assert sum(r["lane_requests"].values()) == N
    assert sum(r["routes"].values()) == N


def test_misses_are_counted_per_lane(reports: dict[str, dict[str, Any]]) -> None:
    """Batching everything misses every urgent request and many standard ones; it is counted."""
    batch = reports["all-batch"]
    assert batch["miss_rate"]["urgent"] > 0.99
    assert batch["misses"]["standard"] > 0
    assert sum(batch["misses"].values()) == batch["late_counted"]
    for k in LANES:
        assert batch["miss_rate"][k] == batch["misses"][k] / batch["lane_requests"][k]


def test_hedged_requests_answer_once_and_late_answers_are_ignored(
    reports: dict[str, dict[str, Any]],
) -> None:
    planner = reports["planner"]
    assert planner["hedged"] > 0, "the day's incident makes some batches late"
    assert planner["answers"] == N + planner["late_answers"]
    assert 0 < planner["late_answers"] <= planner["hedged"], "only hedged requests answer late"
    assert planner["routes"]["flex"] > 0, "standard-lane chat goes flex where the model has it"
    assert planner["wasted_usd"] > 0, "a hedged request's batch line is still paid for"


def test_policies_rank_as_expected(reports: dict[str, dict[str, Any]]) -> None:
    cost = {p: r["cost_usd"] for p, r in reports.items()}
    assert cost["all-batch"] < cost["oracle"] < cost["all-realtime"]
    # the aims of issue 16 at the defaults: within 5 % of the oracle (which is no lower bound:
    # it flushes like the others), at least 40 % below all-realtime
    assert cost["planner"] <= 1.05 * cost["oracle"]
    assert cost["planner"] <= 0.60 * cost["all-realtime"]
    assert cost["planner"] < cost["static"], "learning beats the static priors"
    for policy in ("planner", "static", "oracle", "all-realtime"):
        misses = reports[policy]["miss_rate"]
        assert misses["urgent"] < 0.001 and misses["standard"] < 0.001, policy
    assert reports["planner"]["gpu_requests"] > 0 and reports["static"]["gpu_requests"] == 0
    assert reports["all-realtime"]["batches"] == 0 and reports["all-batch"]["realtime_calls"] == 0


def test_an_answer_under_a_stale_token_is_refused_as_the_store_refuses_it() -> None:
    """A hedged request's batch line answers under the claim it was staged with: refused and
    counted, and the request is delivered once, by the answer of its current claim."""
    sim = Sim("all-realtime", make_traffic(10, 1), Config(n=10))
    sim.to_batch(3, "openai", 0.0)
    staged = sim.token[3]
    assert sim.state[3] is State.SUBMITTED and sim.requeue(3, staged)
    sim.to_realtime(3, "openai", 1.0)
    assert sim.token[3] == staged + 1 and sim.state[3] is State.RUNNING
    sim.answer(3, staged, 5.0, 2)
    assert sim.deliveries[3] == 0 and sim.counts["late_answers"] == 1
    sim.answer(3, staged + 1, 6.0, 1)
    sim.answer(3, staged + 1, 7.0, 1)  # a repeated message changes nothing either
    assert sim.deliveries[3] == 1 and sim.answers[3] == 3 and sim.delivered_at[3] == 6.0
    assert sim.state[3] is State.DELIVERED and sim.counts["late_answers"] == 2
    assert not sim.requeue(3, staged + 1), "a delivered request never goes back to its lane"


def test_every_policy_sees_the_same_draws() -> None:
    """Common random numbers: a batch's turnaround depends on its account and minute, a call's
    latency on its request and attempt, never on what a policy drew before."""
    cfg = Config(n=1000)
    a, b = World(cfg), World(cfg)
    b.realtime(50.0, "openai", 2.0, 7, 1)  # b has drawn something a has not
    b.turnaround(10_000.0, "anthropic", 10)
    assert a.turnaround(10_000.0, "openai", 500) == b.turnaround(10_000.0, "openai", 500)
    assert a.turnaround(10_030.0, "openai", 500) == b.turnaround(10_030.0, "openai", 500)
    assert a.turnaround(10_030.0, "openai", 500) != a.turnaround(10_030.0, "openai", 500), (
        "the second batch of a minute has its own draw"
    )
    assert a.realtime(100.0, "openai", 2.0, 42, 1)[0] == b.realtime(100.0, "openai", 2.0, 42, 1)[0]
    assert a.flex(100.0, 42, 1) == b.flex(100.0, 42, 1) != a.flex(100.0, 42, 2)
    other = World(Config(n=1000, seed=8))
    assert other.turnaround(10_000.0, "openai", 500) != World(cfg).turnaround(
        10_000.0, "openai", 500
    )


def test_the_simulation_hedges_with_the_services_own_rule(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The poller asks ``routing.decide.hedge.should_hedge`` itself, for every member it hedges."""
    calls: list[bool] = []

    def spy(*args: Any, **kw: Any) -> bool:
        found = hedge.should_hedge(*args, **kw)
        calls.append(found)
        return found

    monkeypatch.setattr(benchmarks.sim.batches, "should_hedge", spy)
    r = Sim("planner", make_traffic(3000, 7), Config(n=3000)).run()
    assert calls.count(True) >= r["hedged"] > 0


def test_gpu_is_priced_per_busy_hour_and_always_on(reports: dict[str, dict[str, Any]]) -> None:
    planner = reports["planner"]
    assert 0 < planner["gpu_busy_hours"] < 24
    assert planner["gpu_always_on_usd"] == pytest.approx(2.0 * 24)
    assert planner["cost_usd_gpu_always_on"] == pytest.approx(
        planner["cost_usd"] - planner["cost_by_route"]["gpu"] + 48.0
    )
    assert reports["all-realtime"]["gpu_always_on_usd"] == 0.0


@pytest.mark.parametrize("world", ["rate-limited", "flex-shedding"])
def test_hard_worlds_keep_urgent_and_standard_misses_under_a_tenth_of_a_percent(world: str) -> None:
    r = run_all(Config(n=N, world=world), ["planner"])[0]
    assert r["world"] == world
    assert r["miss_rate"]["urgent"] < 0.001 and r["miss_rate"]["standard"] < 0.001, r["misses"]
    if world == "flex-shedding":
        assert r["flex_shed"] > 0 and r["routes"]["flex"] > 0


@pytest.mark.parametrize("seed", [7, 8, 9])
def test_no_urgent_miss_in_the_first_minutes_of_a_busy_day(seed: int) -> None:
    """The first 10 minutes of a 1M-request day, where the 1M runs missed 3 urgent requests per
    seed: flex latency learned from its first (fastest) answers looked like 40 s, so one-minute
    deadlines went to flex and took 2 to 5 minutes. A young latency sample no longer replaces
    the prior (``routing.decide.estimates.latency_estimate``)."""
    day = make_traffic(1_000_000, seed)
    k = int(day.arrival.searchsorted(600.0))
    first = Traffic(day.arrival[:k], day.lane[:k], day.tmpl[:k], day.deadline[:k])
    r = Sim("planner", first, Config(seed=seed)).run()
    check_invariants(r)
    assert r["routes"]["flex"] > 0  # flex is used, once it is known
    assert r["misses"] == {"urgent": 0, "standard": 0, "bulk": 0}


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("lost", 1, "never delivered"),
        ("delivered_twice", 1, "delivered twice"),
        ("late_answers", 5, "answers"),
    ],
)
def test_check_invariants_catches_a_broken_run(
    reports: dict[str, dict[str, Any]], field: str, value: int, message: str
) -> None:
    broken = {**reports["planner"], field: value}
    with pytest.raises(AssertionError, match=message):
        check_invariants(broken)


def test_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown policy 'cheapest'"):
        Sim("cheapest", make_traffic(10, 1), Config(n=10))


def test_command_line_prints_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--n", "2000", "--policies", "all-realtime,oracle", "--jobs", "1", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["policy"] for r in data["reports"]] == ["all-realtime", "oracle"]
    assert data["config"]["n"] == 2000
