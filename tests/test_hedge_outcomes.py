"""Hedge success learned in the service: each hedged request's outcome is judged from its own
hash (met its deadline or not) and kept per batch account and model, and the aggregator's
learned options carry ``hedge_miss_p``.

On a real Redis: every kind of outcome judged the way ``judge_hedge`` says, each once, the
pending set capped, every key with a TTL. End to end, with real workers: a batch the sandbox
leaves stuck in finalizing is hedged to realtime, the hedges are recorded as met, and the
learned options the aggregator uses show a miss probability below the prior.
"""

from __future__ import annotations

import json
import time

import pytest

from config.settings import reset_settings
from routing.decide.estimates import EstimateRule
from routing.decide.expected import HedgeObs, hedge_miss_rate, judge_hedge
from routing.decide.options import RouteOptions
from routing.models import Claimed, ErrorInfo, Request, ServiceConfig, StoredResult, prepare
from routing.states import State
from routing.store.hedges import HedgeStore
from routing.store.lanes import LaneStore
from tasks import runtime
from tasks.cli.stack import LocalStack
from tests.test_batch_route import batch_items, results_of, stack, submit
from tests.test_e2e import db_url, wait_for
from tests.test_lua_keys import Recorder, check_calls, recorder

__all__ = ["db_url", "recorder", "stack"]

MODEL = "gpt-4o-mini"
NAME = f"openai|{MODEL}"


def claimed(store: LaneStore, cfg: ServiceConfig, n: int, now: float) -> list[Claimed]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    reqs = [
        Request(lane="standard", endpoint="/v1/chat/completions", body=body, deadline=now + 100)
        for _ in range(n)
    ]
    store.submit_many([prepare(r, cfg, now) for r in reqs], cfg)
    claims = list(store.claim("standard", n, lease_s=600, now=now))
    assert len(claims) == n
    return claims


def failed(retryable: bool) -> StoredResult:
    code = "rate_limited" if retryable else "invalid_request"
    status = 429 if retryable else 400
    return StoredResult(
        status_code=status,
        error=ErrorInfo(code=code, message="x", retryable=retryable, status_code=status),
    )


def judge(
    outcome: str | None, finished_at: float | None, *, now: float = 50.0, retryable: bool = False
) -> object:
    return judge_hedge(
        outcome=outcome, finished_at=finished_at, deadline=100.0, retryable=retryable, now=now
    )


def test_judge_hedge_reads_each_outcome() -> None:
    assert judge("done", 90.0) == HedgeObs(90.0, True)
    assert judge("done", 120.0) == HedgeObs(120.0, False)
    assert judge("expired", 100.0) == HedgeObs(100.0, False)
    assert judge("failed", 60.0) == "forget", "a 400 would have failed on any route"
    assert judge("failed", 60.0, retryable=True) == HedgeObs(60.0, False)
    assert judge("cancelled", 60.0) == "forget"
    assert judge(None, None) == "wait"
    assert judge(None, None, now=150.0) == HedgeObs(100.0, False), "running past its deadline"


def test_every_outcome_is_judged_once_from_the_request_hash(
    store: LaneStore, service_config: ServiceConfig
) -> None:
    now = float(int(time.time()))
    met, late, limited, bad, cancelled, running, gone = claimed(store, service_config, 7, now)
    hedges = HedgeStore.of(store)
    hedges.hedged("openai", MODEL, [(c.id, c.request.deadline) for c in (met, late)], now)
    rest = (limited, bad, cancelled, running, gone)
    hedges.hedged("openai", MODEL, [(c.id, c.request.deadline) for c in rest], now)
    ok = StoredResult(status_code=200, body={"ok": True})
    assert store.finish(met.id, met.token, State.DONE, ok, now=now + 10)
    assert store.finish(late.id, late.token, State.DONE, ok, now=now + 200)
    assert store.finish(limited.id, limited.token, State.FAILED, failed(True), now=now + 20)
    assert store.finish(bad.id, bad.token, State.FAILED, failed(False), now=now + 20)
    assert store.cancel(cancelled.id, now=now + 5) is State.CANCELLED
    store.redis.delete(store.keys.request(gone.id))

    assert hedges.resolve(now + 50) == 3
    seen = hedges.snapshot()[NAME]
    assert sorted(seen) == sorted(
        [HedgeObs(now + 10, True), HedgeObs(now + 200, False), HedgeObs(now + 20, False)]
    )
    pending = store.redis.zrange(store.keys.hedges("pending"), 0, -1)
    assert [p.decode() for p in pending] == [running.id], "only the running one waits"
    assert hedges.resolve(now + 50) == 0, "judged once"

    assert hedges.resolve(now + 150) == 1, "still running past its deadline: missed"
    assert HedgeObs(now + 100, False) in hedges.snapshot()[NAME]
    assert not store.redis.exists(store.keys.hedges("pending"), store.keys.hedges("from"))
    for key in store.redis.scan_iter(match=f"{store.keys.ns}:{{hedges}}:*"):
        assert store.redis.ttl(key) > 0, key


def test_a_verdict_is_recorded_once_however_many_resolvers_apply_it(
    store: LaneStore, service_config: ServiceConfig
) -> None:
    now = float(int(time.time()))
    (one,) = claimed(store, service_config, 1, now)
    hedges = HedgeStore.of(store)
    hedges.hedged("openai", MODEL, [(one.id, one.request.deadline)], now)
    k = store.keys
    keys = [k.hedges("pending"), k.hedges("from"), k.hedges("index"), k.hedge_outcomes(NAME)]
    args = [500, 3600, one.id, 1, json.dumps([now, True]), NAME]
    assert store.scripts["hedge_resolve"](keys=keys, args=args) == 1
    assert store.scripts["hedge_resolve"](keys=keys, args=args) == 0
    assert store.redis.llen(k.hedge_outcomes(NAME)) == 1


def test_the_hedge_scripts_touch_only_their_keys_in_one_slot(
    store: LaneStore, service_config: ServiceConfig, recorder: Recorder
) -> None:
    now = float(int(time.time()))
    done, running = claimed(store, service_config, 2, now)
    capped = HedgeStore.of(store, pending_max=1)  # the cap's eviction, under MONITOR too
    capped.hedged("openai", MODEL, [("standard.gone1", now + 1), ("standard.gone2", now + 2)], now)
    hedges = HedgeStore.of(store)
    hedges.hedged("openai", MODEL, [(c.id, c.request.deadline) for c in (done, running)], now)
    ok = StoredResult(status_code=200, body={"ok": True})
    assert store.finish(done.id, done.token, State.DONE, ok, now=now + 1)
    assert hedges.resolve(now + 2) == 1
    seen = check_calls(recorder.stop())
    assert {"hedge_mark", "hedge_resolve"} <= set(seen), seen


def test_pending_hedges_are_capped_earliest_deadline_first(store: LaneStore) -> None:
    hedges = HedgeStore.of(store, pending_max=3)
    hedges.hedged("openai", MODEL, [(f"standard.r{i}", 1000.0 + i) for i in range(5)], 1.0)
    pending = store.redis.zrange(store.keys.hedges("pending"), 0, -1)
    assert [p.decode() for p in pending] == ["standard.r2", "standard.r3", "standard.r4"]
    assert store.redis.hlen(store.keys.hedges("from")) == 3


def test_learned_options_carry_the_miss_rate_per_account_and_model(
    store: LaneStore, service_config: ServiceConfig
) -> None:
    now = float(int(time.time()))
    items = claimed(store, service_config, 4, now)
    hedges = HedgeStore.of(store)
    hedges.hedged("openai", MODEL, [(c.id, c.request.deadline) for c in items], now)
    ok = StoredResult(status_code=200, body={"ok": True})
    for i, c in enumerate(items):
        assert store.finish(c.id, c.token, State.DONE, ok, now=now + (10 if i else 300))
    base = RouteOptions(batch_turnaround_s={"openai": 3600.0})
    learned = hedges.learned(base, now + 400)
    rule = EstimateRule(base.quantile, base.min_samples, base.half_life_s)
    want = hedge_miss_rate(
        hedges.snapshot()[NAME], now + 400, prior=base.hedge_miss_prior, rule=rule
    )
    assert learned.hedge_miss_p[NAME] == pytest.approx(want)
    assert learned.hedge_miss_p["openai|*"] == pytest.approx(want)
    assert learned.hedge_miss_p[NAME] > base.hedge_miss_prior, "one in four missed"
    assert hedges.learned(base, now + 401) is learned, "re-read only every refresh"


# -- end to end ---------------------------------------------------------------------------------


@pytest.mark.timeout(240)
@pytest.mark.knobs(batch_turnaround_s=1.0, batch_stuck_finalizing=True)
@pytest.mark.env(
    MIXBATCH_REALTIME_ESTIMATE_S="5", MIXBATCH_HEDGE_MARGIN_S="80", MIXBATCH_ROUTE_REFRESH_S="1"
)
def test_a_late_batch_is_hedged_and_the_learned_options_carry_its_success(
    stack: LocalStack, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sandbox leaves the batches in finalizing: every request is hedged to realtime."""
    ids = submit(db_url, batch_items(6, deadline="100s"))
    results = results_of(db_url, ids)
    assert all(r.status is State.DONE and not r.missed_deadline for r in results.values())
    st = stack.store()
    try:
        hedges = HedgeStore.of(st)

        def judged() -> int:
            return sum(len(v) for v in hedges.snapshot().values())

        wait_for(lambda: judged() >= len(ids), 60, "every hedge judged by the aggregator")
        seen = hedges.snapshot()
    finally:
        st.close()
    assert all(o.met for obs in seen.values() for o in obs), seen
    monkeypatch.setenv("MIXBATCH_REDIS_URL", db_url)
    monkeypatch.setenv("MIXBATCH_NAMESPACE", "e2e")
    reset_settings()
    runtime.reset()
    try:
        from tasks.explain import learned_options

        learned = learned_options(time.time())
    finally:
        runtime.reset()
        reset_settings()
    for name in seen:
        assert learned.hedge_miss_p[name] < learned.hedge_miss_prior, (name, learned.hedge_miss_p)
