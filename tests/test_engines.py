"""The route engines' steps driven directly: a real Redis (conftest's ``store``), the sandbox
provider over loopback for realtime, the real local model for the local route, and a clock the
test moves. No Celery worker: each step is called with the handles a task would pass."""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from config.settings import reset_settings
from gpu_worker.engine import ErrorBody, LocalAnswer
from gpu_worker.registry import Registry
from routing.decide.backoff import RetryPolicy, backoff_s
from routing.decide.cost import PriceTable, parse_prices
from routing.decide.options import RouteOptions
from routing.engine.aggregate import chunks, lane_ranks, record_decisions, route_claimed
from routing.engine.claims import start_claimed
from routing.engine.deliver import run_deliveries
from routing.engine.local import report, run_local, warm
from routing.engine.realtime import Realtime, run_all, run_one
from routing.engine.sweep import REDELIVER_GRACE_S, sweep
from routing.models import (
    Claimed,
    LaneSpec,
    Request,
    Route,
    ServiceConfig,
    prepare,
)
from routing.providers import ProviderAccount, RealtimeAdapter, adapter_for
from routing.sandbox import Knobs
from routing.sandbox.server import SandboxServer
from routing.sinks import SinkContext, sink_for
from routing.sinks.table import SinkTable, StreamTarget
from routing.states import State
from routing.store.lanes import LaneStore
from routing.store.ledger import totals
from routing.store.observations import DecisionStore, ObservationStore
from routing.store.semaphore import RedisSemaphore
from tasks import runtime
from tasks.cli.demo import LOCAL_MODEL
from tasks.gpu import answer
from tests.test_sinks_webhook import finished, sink_settings

ROOT = Path(__file__).resolve().parent.parent
PRICES = parse_prices((ROOT / "config" / "prices.toml").read_text())
POLICY = RetryPolicy(max_tries=4, base_s=0.5, cap_s=30.0, jitter=0.0)


class Clock:
    """Wall and elapsed time that move only when the test (or a retry wait) moves them."""

    def __init__(self, start: float) -> None:
        self.now = start
        self.elapsed = 0.0
        self.slept: list[float] = []

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.elapsed

    def sleep(self, seconds: float, /) -> None:
        self.slept.append(seconds)
        self.now += seconds
        self.elapsed += seconds


@pytest.fixture(scope="module")
def sandbox() -> Iterator[SandboxServer]:
    with SandboxServer() as server:
        yield server


@pytest.fixture
def clock() -> Clock:
    return Clock(time.time())


@pytest.fixture
def adapter(sandbox: SandboxServer) -> Iterator[RealtimeAdapter]:
    sandbox.configure(**Knobs().model_dump())
    sandbox.reset()
    account = ProviderAccount(
        name="openai",
        kind="openai",
        base_url=sandbox.openai_base_url,
        api_key=SecretStr("sk-engines-test"),
        max_concurrency=1,
    )
    with adapter_for(account) as a:
        yield a


@pytest.fixture
def observations(store: LaneStore) -> ObservationStore:
    return ObservationStore(store.redis, namespace=store.keys.ns, url=store.url)


@pytest.fixture
def rt(
    store: LaneStore, adapter: RealtimeAdapter, observations: ObservationStore, clock: Clock
) -> Realtime:
    return Realtime(
        store=store,
        adapter=adapter,
        observations=observations,
        policy=POLICY,
        prices=PRICES,
        clock=clock,
    )


def chat(tag: str, **extra: Any) -> Request:
    """A chat request whose body is unique, so the sandbox's ``fail_first`` counts it alone."""
    body = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": f"{tag} {uuid.uuid4()}"}],
    }
    return Request(endpoint="/v1/chat/completions", body=body, **extra)


def claimed(
    store: LaneStore, config: ServiceConfig, now: float, *requests: Request, lease_s: float = 60
) -> list[Claimed]:
    tickets = store.submit_many([prepare(r, config, now) for r in requests], config, now=now)
    lanes = {t.lane for t in tickets}
    return [
        c
        for lane in sorted(lanes)
        for c in store.claim(lane, len(tickets), lease_s=lease_s, now=now)
    ]


@dataclasses.dataclass
class Work:
    """Requests submitted, claimed and started on a route, as an aggregator and a task would."""

    store: LaneStore
    config: ServiceConfig
    clock: Clock

    def start(self, *requests: Request, route: Route = Route.REALTIME) -> list[Claimed]:
        items = claimed(self.store, self.config, self.clock.now, *requests)
        pairs = [[c.id, c.token] for c in items]
        return start_claimed(self.store, pairs, route=route, lease_s=60, now=self.clock.now)


@pytest.fixture
def work(store: LaneStore, service_config: ServiceConfig, clock: Clock) -> Work:
    return Work(store, service_config, clock)


# -- realtime ---------------------------------------------------------------------------------


def test_realtime_answer_is_stored_priced_counted_and_observed(
    rt: Realtime, work: Work, store: LaneStore, clock: Clock
) -> None:
    [c] = work.start(chat("ok"))
    assert run_all(rt, [c], budget_s=10, lease_s=60, concurrency=4) == [c.id]
    result = store.result(c.id)
    assert result is not None and result.status is State.DONE and result.route is Route.REALTIME
    assert result.body is not None and result.body["object"] == "chat.completion"
    assert result.cost_usd is not None and result.cost_usd > 0
    ledger = totals(store)
    assert ledger["route"]["realtime"]["count"] == 1
    assert ledger["route"]["realtime"]["cost"] == pytest.approx(result.cost_usd)
    [latency] = rt.observations.snapshot(clock.now).realtime["openai|gpt-4o-mini"]
    assert latency.at == pytest.approx(clock.now, abs=1e-3)


def test_a_429_requeues_after_retry_after_and_marks_no_headroom(
    rt: Realtime, sandbox: SandboxServer, work: Work, store: LaneStore, clock: Clock
) -> None:
    sandbox.configure(fail_first=1, fail_first_status=429, retry_after_s=7)
    one_try = dataclasses.replace(rt, policy=POLICY.model_copy(update={"max_tries": 1}))
    [c] = work.start(chat("429"))
    assert run_one(one_try, c, budget_s=10) is State.QUEUED
    assert store.redis.zscore(store.keys.delayed("standard"), c.id) == pytest.approx(clock.now + 7)
    status = store.status(c.id)
    assert status.error is not None and status.error.code == "rate_limited"
    assert status.error.status_code == 429 and status.error.retryable
    assert "openai|gpt-4o-mini" in rt.observations.snapshot(clock.now).headroom


def test_a_5xx_is_retried_within_the_budget_on_the_clock(
    rt: Realtime, sandbox: SandboxServer, work: Work, clock: Clock
) -> None:
    sandbox.configure(fail_first=2, fail_first_status=500)
    [c] = work.start(chat("500"))
    assert run_one(rt, c, budget_s=10) is State.DONE
    assert clock.slept == [0.5, 1.0], "the shared backoff, waited on the injected clock"


def test_a_4xx_fails_at_once_keeping_the_providers_error(
    rt: Realtime, sandbox: SandboxServer, work: Work, store: LaneStore
) -> None:
    sandbox.configure(fail_first=1, fail_first_status=400)
    [c] = work.start(chat("400"))
    assert run_all(rt, [c], budget_s=10, lease_s=60, concurrency=1) == [c.id]
    result = store.result(c.id)
    assert result is not None and result.status is State.FAILED
    assert result.error is not None and result.error.code == "ProviderError"
    assert result.error.status_code == 400 and not result.error.retryable
    assert totals(store) == {}, "a failure costs nothing"


def test_a_full_semaphore_requeues_with_the_backoff(
    rt: Realtime, work: Work, store: LaneStore, clock: Clock
) -> None:
    [c] = work.start(chat("busy"))
    other = RedisSemaphore(store.redis, store.keys.semaphore("openai", "gpt-4o-mini"), 1)
    with other.hold(timeout_s=1):
        assert run_one(rt, c, budget_s=0.2) is State.QUEUED
    status = store.status(c.id)
    assert status.error is not None and status.error.code == "SemaphoreBusy"
    ready_at = clock.now + backoff_s(status.attempts, POLICY)
    assert store.redis.zscore(store.keys.delayed("standard"), c.id) == pytest.approx(ready_at)


def test_a_message_whose_lease_was_lost_starts_nothing(
    store: LaneStore, service_config: ServiceConfig, clock: Clock
) -> None:
    [c] = claimed(store, service_config, clock.now, chat("lost"))
    for pair in ([c.id, "not-the-token"], ["standard.01GONE", c.token]):
        assert start_claimed(store, [pair], route=Route.REALTIME, lease_s=60, now=clock.now) == []
    assert store.status(c.id).state is State.CLAIMED


# -- local ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models() -> Registry:
    return Registry.from_file(ROOT / "config" / "models.toml", "cpu")


def test_local_answers_and_an_unknown_model_in_one_batch(
    models: Registry, work: Work, store: LaneStore, observations: ObservationStore, clock: Clock
) -> None:
    good = Request(endpoint="/v1/embeddings", body={"model": "all-MiniLM-L6-v2", "input": "hi"})
    bad = Request(endpoint="/v1/embeddings", body={"model": "no-such-model", "input": "hi"})
    items = work.start(good, bad, route=Route.GPU)
    assert warm(models) == [LOCAL_MODEL]
    outcome = run_local(store, items, functools.partial(answer, models), clock.time, lease_s=60)
    assert sorted(outcome.finished) == sorted(c.id for c in items) and outcome.requeued == 0
    by_model = {c.request.model: store.result(c.id) for c in items}
    ok, failed = by_model["all-MiniLM-L6-v2"], by_model["no-such-model"]
    assert ok is not None and ok.status is State.DONE and ok.route is Route.GPU
    assert ok.body is not None and len(ok.body["data"][0]["embedding"]) == 384
    assert failed is not None and failed.status is State.FAILED
    assert failed.error is not None and failed.error.status_code == 404
    report(observations, models)
    seen = observations.snapshot(clock.now)
    assert LOCAL_MODEL in seen.gpu and seen.gpu_aliases == {"all-MiniLM-L6-v2": LOCAL_MODEL}


def test_a_local_5xx_goes_back_to_its_lane(work: Work, store: LaneStore, clock: Clock) -> None:
    """Out of memory on a batch that cannot be split further: the same request may fit later."""

    def out_of_memory(items: Sequence[Claimed]) -> list[LocalAnswer]:
        error = ErrorBody(code="out_of_memory", message="CUDA out of memory")
        return [LocalAnswer(c.id, 503, None, error) for c in items]

    req = Request(endpoint="/v1/embeddings", body={"model": LOCAL_MODEL, "input": "x"})
    [c] = work.start(req, route=Route.GPU)
    outcome = run_local(store, [c], out_of_memory, clock.time, lease_s=60)
    assert outcome.finished == [] and outcome.requeued == 1
    status = store.status(c.id)
    assert status.state is State.QUEUED
    assert status.error is not None and status.error.code == "out_of_memory"


# -- deliver ----------------------------------------------------------------------------------


def test_deliveries_of_many_in_one_step(
    store: LaneStore, service_config: ServiceConfig, clock: Clock
) -> None:
    key = f"answers:{uuid.uuid4().hex[:8]}"
    to_stream = finished(store, service_config, clock.now, {"sink": "answers"})
    no_callback = finished(store, service_config, clock.now, None)
    held = finished(store, service_config, clock.now, {"sink": "answers"})
    assert store.claim_delivery(held, lease_s=30, now=clock.now + 1) == 1  # another worker
    context = SinkContext(
        sink_settings(),
        sinks=SinkTable([StreamTarget(name="answers", key=key)]),
        redis=store.redis,
        namespace=store.keys.ns,
    )
    try:
        outcomes = run_deliveries(
            store,
            [to_stream, no_callback, held],
            sinks=lambda spec: sink_for(spec, context),
            max_attempts=3,
            lease_s=30,
            now=clock.now + 2,
        )
    finally:
        context.close()
    assert {rid: o.status for rid, o in outcomes.items()} == {
        to_stream: "delivered",
        no_callback: "delivered",
    }
    assert store.redis.xlen(key) == 1
    store.redis.delete(key)


# -- sweep ------------------------------------------------------------------------------------


def test_sweep_requeues_expires_redelivers_and_beats(store: LaneStore, clock: Clock) -> None:
    config = ServiceConfig(
        lanes=(
            LaneSpec(name="standard", deadline_s=3600),
            LaneSpec(name="soon", deadline_s=60, on_deadline="expire"),
        )
    )
    store.publish_config(config)
    t0 = clock.now
    [leased] = claimed(store, config, t0, chat("lease"), lease_s=10)
    [overdue] = store.submit_many(
        [prepare(chat("late", lane="soon"), config, t0 - 120)], config, now=t0 - 120
    )
    done = finished(store, config, t0, None)
    sent: list[str] = []
    report = sweep(store, config.lanes, t0 + 20, sent.extend)
    assert report == {"requeued": 1, "failed": 0, "expired": 1, "redelivered": 1}
    assert store.status(leased.id).state is State.QUEUED
    assert store.status(overdue.id).state is State.EXPIRED
    assert sent == [done]
    assert store.last_beat() == t0 + 20
    assert sweep(store, config.lanes, t0 + 21, sent.extend)["requeued"] == 0
    assert REDELIVER_GRACE_S < 20


# -- aggregate --------------------------------------------------------------------------------


def test_routes_are_grouped_and_a_missing_price_is_logged_once(
    store: LaneStore,
    service_config: ServiceConfig,
    clock: Clock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    unpriced = [
        Request(body={"model": "gpt-9-unpriced", "messages": [{"role": "user", "content": str(i)}]})
        for i in range(3)
    ]
    items = claimed(store, service_config, clock.now, *unpriced, chat("priced"))
    chosen, groups = route_claimed(items, clock.now, RouteOptions(prices=PRICES))
    assert sum(len(g) for g in groups.values()) == 4
    assert {key[2] for key in groups} == {"gpt-9-unpriced", "gpt-4o-mini"}
    decisions = DecisionStore(store.redis, store.keys, url=store.url)
    warned: set[str] = set()
    with caplog.at_level(logging.WARNING, logger="routing.engine.aggregate"):
        record_decisions(decisions, chosen, warned)
        record_decisions(decisions, chosen, warned)
    assert [r.message for r in caplog.records].count(
        "no price for a model; routed on deadline alone"
    ) == 1
    assert warned == {"gpt-9-unpriced"}
    explained = decisions.explain(items[0].id)
    assert explained.decision is not None
    assert chunks([1, 2, 3, 4, 5], 2) == [[1, 2], [3, 4], [5]]
    assert lane_ranks(service_config.by_priority()) == {"urgent": 0, "standard": 3, "bulk": 6}


# -- the process's handles ---------------------------------------------------------------------


@pytest.fixture
def settings_env(store: LaneStore, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("MIXBATCH_NAMESPACE", store.keys.ns)
    reset_settings()
    runtime.reset()
    yield
    runtime.reset()
    reset_settings()


@pytest.mark.usefixtures("settings_env")
def test_handles_are_built_once_and_dropped_by_reset_and_fork() -> None:
    from celery import signals

    first = runtime.store()
    assert runtime.store() is first and runtime.registry().redis is first.redis
    assert runtime.observations() is runtime.observations()
    signals.worker_process_init.send(sender=None)
    after_fork = runtime.store()
    assert after_fork is not first, "a forked child builds its own connections"
    assert first.redis.ping(), "the parent's connections are not closed by the child"
    runtime.reset()
    assert runtime.store() is not after_fork


@pytest.mark.usefixtures("settings_env")
def test_route_options_read_the_declared_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MIXBATCH_ROUTE_QUANTILE", "0.9")
    monkeypatch.setenv("MIXBATCH_ROUTE_MIN_SAMPLES", "7")
    reset_settings()
    runtime.reset()
    options = runtime.route_options()
    assert options.quantile == 0.9 and options.min_samples == 7
    assert LOCAL_MODEL in options.local_models and "all-MiniLM-L6-v2" in options.local_models
    assert isinstance(options.prices, PriceTable)
