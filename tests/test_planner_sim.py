"""The planner simulation at a reduced size: its invariants, and that it measures what it claims.

The full-size figures (1,000,000 requests) are in docs/benchmarks.md; here 20,000 requests
through all five policies must keep every request (answered, delivered exactly once, later
answers ignored and counted), count misses per lane, and rank the policies sensibly.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from benchmarks.planner_sim import (
    LANES,
    POLICIES,
    Config,
    Sim,
    check_invariants,
    main,
    make_traffic,
    run_all,
)

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
    assert planner["wasted_usd"] > 0, "a hedged request's batch line is still paid for"


def test_policies_rank_as_expected(reports: dict[str, dict[str, Any]]) -> None:
    cost = {p: r["cost_usd"] for p, r in reports.items()}
    assert cost["all-batch"] < cost["oracle"] <= cost["planner"] < cost["all-realtime"]
    assert cost["planner"] < cost["static"], "learning beats the static priors"
    for policy in ("planner", "static", "oracle", "all-realtime"):
        misses = reports[policy]["miss_rate"]
        assert misses["urgent"] < 0.001 and misses["standard"] < 0.001, policy
    assert reports["planner"]["gpu_requests"] > 0 and reports["static"]["gpu_requests"] == 0
    assert reports["all-realtime"]["batches"] == 0 and reports["all-batch"]["realtime_calls"] == 0


def test_a_second_answer_is_ignored_and_counted() -> None:
    sim = Sim("all-realtime", make_traffic(10, 1), Config(n=10))
    sim.deliver(3, 5.0, 1)
    sim.deliver(3, 6.0, 2)
    assert sim.deliveries[3] == 1 and sim.answers[3] == 2 and sim.delivered_at[3] == 5.0
    assert sim.counts["late_answers"] == 1


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
