"""The observation store and the decision log against a real Redis, and ``mixbatch explain``.

Recording is bounded and idempotent per batch, a snapshot reads everything back in the shape
the estimates take, a flushed store falls back to the priors, a dead Redis never fails the task
that records, and ``explain`` prints what the aggregator decided (or one clear error line).
"""

from __future__ import annotations

import json
import time

import pytest
import redis

from routing.decide.estimates import TurnaroundObs
from routing.decide.options import RouteOptions
from routing.decide.route import Decision, choose_route
from routing.models import Request, Route, prepare
from routing.states import State
from routing.store.lanes import LaneStore
from routing.store.observations import DecisionStore, ObservationStore
from tests.test_cli import Invoke, assert_clean_error, base_env, invoke

__all__ = ["base_env", "invoke"]

CHAT = "/v1/chat/completions"
KEY = f"openai|{CHAT}|gpt-4o-mini"


@pytest.fixture
def obs(redis_url: str, namespace: str) -> ObservationStore:
    return ObservationStore(
        redis.Redis.from_url(redis_url), namespace=namespace, url=redis_url, max_per_key=5
    )


def test_batches_are_recorded_once_bounded_and_read_back(obs: ObservationStore) -> None:
    now = time.time()
    for i in range(8):
        obs.batch_started("openai", CHAT, "gpt-4o-mini", batch_key=f"b{i}", size=10 + i, at=now)
        assert obs.record_batch(
            "openai",
            CHAT,
            "gpt-4o-mini",
            turnaround_s=60.0 + i,
            size=10 + i,
            at=now,
            batch_key=f"b{i}",
        )
    assert not obs.record_batch(
        "openai", CHAT, "gpt-4o-mini", turnaround_s=1.0, size=1, at=now, batch_key="b7"
    ), "a batch seen twice (two pollers) is recorded once"
    seen = obs.snapshot(now)
    got = seen.batch[KEY]
    assert [o.seconds for o in got] == [67.0, 66.0, 65.0, 64.0, 63.0], "newest 5 kept"
    assert all(isinstance(o, TurnaroundObs) and not o.censored for o in got)
    assert not seen.inflight, "ended batches are no longer running"


def test_running_batches_are_censored_at_their_age(obs: ObservationStore) -> None:
    now = time.time()
    obs.batch_started("openai", CHAT, "gpt-4o-mini", batch_key="slow", size=50, at=now - 3600)
    seen = obs.snapshot(now)
    (running,) = seen.inflight[KEY]
    assert running.censored and running.size == 50
    assert running.seconds == pytest.approx(3600, abs=1)
    obs.record_batch(
        "openai",
        CHAT,
        "gpt-4o-mini",
        turnaround_s=3700,
        size=50,
        at=now,
        censored=True,
        batch_key="slow",
    )
    seen = obs.snapshot(now)
    assert not seen.inflight and seen.batch[KEY][0].censored


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_bad_turnaround_is_ignored_not_raised(obs: ObservationStore, bad: float) -> None:
    assert not obs.record_batch("openai", CHAT, "m", turnaround_s=bad, size=1, at=time.time())
    assert not obs.snapshot().batch


def test_realtime_latency_and_rate_limit_headroom(obs: ObservationStore) -> None:
    now = time.time()
    obs.record_realtime(
        "openai",
        "gpt-4o-mini",
        latency_s=0.8,
        at=now,
        rate_limit={"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "30s"},
    )
    obs.record_realtime(
        "anthropic", "claude-haiku-4-5", latency_s=None, at=now, rate_limit={"retry-after": "9"},
        limited=True,
    )  # fmt: skip
    seen = obs.snapshot(now)
    assert [o.seconds for o in seen.realtime["openai|gpt-4o-mini"]] == [0.8]
    assert "anthropic|claude-haiku-4-5" not in seen.realtime, "a 429 has no latency"
    assert seen.headroom["openai|gpt-4o-mini"].reset_at == pytest.approx(now + 30)
    assert seen.headroom["anthropic|claude-haiku-4-5"].remaining_requests == 0


def test_gpu_reports_with_aliases(obs: ObservationStore) -> None:
    """What the GPU worker calls after each micro-batch (and on a heartbeat)."""
    now = time.time()
    obs.record_gpu(
        "sentence-transformers/all-MiniLM-L6-v2",
        texts_per_s=900.0,
        queue_wait_s=0.05,
        at=now,
        aliases=["all-MiniLM-L6-v2"],
    )
    obs.record_gpu("sentence-transformers/all-MiniLM-L6-v2", texts_per_s=None, queue_wait_s=None)
    seen = obs.snapshot(now)
    reports = seen.gpu["sentence-transformers/all-MiniLM-L6-v2"]
    assert [(r.texts_per_s, r.queue_wait_s) for r in reports] == [(None, None), (900.0, 0.05)]
    assert seen.gpu_aliases == {"all-MiniLM-L6-v2": "sentence-transformers/all-MiniLM-L6-v2"}
    opts = obs.learned(RouteOptions(local_models=frozenset({"all-MiniLM-L6-v2"})), now)
    assert opts.gpu["all-MiniLM-L6-v2"].texts_per_s == 900.0


def test_flushed_store_falls_back_to_priors(
    obs: ObservationStore, redis_url: str, namespace: str
) -> None:
    now = time.time()
    for i in range(5):
        obs.record_batch(
            "openai", CHAT, "gpt-4o-mini", turnaround_s=30, size=5, at=now, batch_key=f"k{i}"
        )
    base = RouteOptions(batch_turnaround_s={"openai": 7200.0})
    assert obs.learned(base, now, refresh_s=0).batch_estimates[KEY].source == "observed"
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{namespace}:*"))
    client.delete(*keys)  # what FLUSHDB does to our keys
    after = obs.learned(base, now + 1, refresh_s=0)
    assert after.batch_estimates == {} and after.realtime_estimates == {}
    req = Request(lane="standard", endpoint=CHAT, body={"model": "gpt-4o-mini", "messages": []})
    from tests.test_route_choice import CONFIG

    d = choose_route(prepare(req, CONFIG, now), now, after)
    assert d.route is Route.REALTIME and "prior" in d.candidates[0].estimate
    assert obs.clear() == 0


def test_learned_options_are_reused_until_refresh(obs: ObservationStore) -> None:
    base = RouteOptions(batch_turnaround_s={"openai": 7200.0})
    now = time.time()
    first = obs.learned(base, now, refresh_s=5)
    obs.record_batch("openai", CHAT, "m", turnaround_s=30, size=5, at=now)
    assert obs.learned(base, now + 1, refresh_s=5) is first
    assert obs.learned(base, now + 6, refresh_s=5) is not first


def test_recording_into_a_dead_redis_never_raises() -> None:
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    client = redis.Redis(
        host="127.0.0.1", port=1, socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0)
    )
    dead = ObservationStore(client, url="redis://dead")
    assert not dead.record_batch("openai", CHAT, "m", turnaround_s=1, size=1, at=0)
    dead.record_realtime("openai", "m", latency_s=1.0, at=0, rate_limit={"retry-after": "1"})
    dead.record_gpu("m", texts_per_s=1.0, queue_wait_s=0.0)
    dead.batch_started("openai", CHAT, "m", batch_key="x", size=1, at=0)


# -- decisions and explain ------------------------------------------------------------------------


def submit(store: LaneStore, lane: str = "standard") -> str:
    from tests.test_route_choice import CONFIG

    now = time.time()
    req = Request(lane=lane, endpoint=CHAT, body={"model": "gpt-4o-mini", "messages": []})
    [ticket] = store.submit_many([prepare(req, CONFIG, now)], CONFIG, now=now)
    return ticket.id


def decide_for(store: LaneStore, rid: str) -> None:
    from tests.test_route_choice import options

    req = store.prepared(rid)
    decisions = DecisionStore(store.redis, store.keys, url=store.url)
    decisions.save_many({rid: choose_route(req, time.time(), options())})


def test_decision_is_kept_in_the_request_hash(store: LaneStore) -> None:
    rid = submit(store)
    decisions = DecisionStore(store.redis, store.keys, url=store.url)
    assert decisions.explain(rid).decision is None
    decide_for(store, rid)
    decide_for(store, rid)
    found = decisions.explain(rid)
    assert found.decision is not None and found.decision.route is Route.REALTIME
    assert found.decisions == 2 and found.state == State.QUEUED.value
    assert store.status(rid).state is State.QUEUED, "the extra fields do not disturb status"


def test_decision_of_a_vanished_request_is_not_written(store: LaneStore) -> None:
    from routing.errors import NotFound

    rid = f"standard.{'0' * 26}"
    DecisionStore(store.redis, store.keys).save_many({rid: choose_route_for_nothing()})
    assert not store.redis.exists(store.keys.request(rid)), "no hash resurrected"
    with pytest.raises(NotFound):
        DecisionStore(store.redis, store.keys).explain(rid)


def choose_route_for_nothing() -> Decision:
    return Decision(route=Route.REALTIME, provider="openai", reason="test")


def test_explain_prints_candidates_costs_and_reason(invoke: Invoke, store: LaneStore) -> None:
    rid = submit(store)
    decide_for(store, rid)
    result = invoke("explain", rid)
    assert result.exit_code == 0, result.output
    out = result.stdout
    for fragment in (rid, "batch", "realtime", "openai", "prior", "reason:", "cheapest that fits"):
        assert fragment in out, (fragment, out)
    assert "$0.0000" in out


def test_explain_json(invoke: Invoke, store: LaneStore) -> None:
    rid = submit(store)
    decide_for(store, rid)
    result = invoke("explain", rid, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["id"] == rid and data["decision"]["route"] == "realtime"
    routes = {c["route"] for c in data["decision"]["candidates"]}
    assert routes == {"batch", "realtime"}
    assert all("expected_cost_usd" in c and "fits" in c for c in data["decision"]["candidates"])


def test_explain_of_a_request_not_routed_yet(invoke: Invoke, store: LaneStore) -> None:
    rid = submit(store)
    result = invoke("explain", rid)
    assert result.exit_code == 0 and "not routed yet" in result.stdout


@pytest.mark.parametrize(
    ("rid", "code", "fragment"),
    [
        (f"standard.{'0' * 26}", 1, "no request with id"),
        ("not-an-id", 2, "not a mixbatch request id"),
    ],
)
def test_explain_unknown_id_is_one_clear_error(
    invoke: Invoke, store: LaneStore, rid: str, code: int, fragment: str
) -> None:
    assert_clean_error(invoke("explain", rid), code, fragment)
