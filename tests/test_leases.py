"""Realtime calls never outlive their lease: a running worker renews it, only a dead one loses it.

Real Redis, the sandbox over loopback (its latency knob makes a call slower than the lease, its
stats count the calls the provider was paid for), real time, and a rival beside the worker that
sweeps and runs whatever the sweep hands back, as the rest of the service would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from routing.engine.claims import Heartbeat, start_claimed
from routing.engine.realtime import Realtime, run_all, run_one
from routing.engine.sweep import sweep
from routing.faults import FAULT_EXIT_CODE
from routing.models import Claimed, Request, Route, ServiceConfig, prepare
from routing.providers import adapter_for
from routing.sandbox.server import SandboxServer
from routing.states import State
from routing.store.lanes import LaneStore
from routing.store.semaphore import RedisSemaphore
from tests.test_engines import adapter, chat, observations, rt, sandbox

__all__ = ["adapter", "observations", "rt", "sandbox"]

ROOT = Path(__file__).resolve().parent.parent
LEASE_S = 1.0
CHAT = "/v1/chat/completions"


@pytest.fixture
def clock() -> ModuleType:
    """The real clock for ``rt``: leases, sweeps and the call all run in real time."""
    return time


def claimed(
    store: LaneStore, config: ServiceConfig, *requests: Request, lease_s: float = LEASE_S
) -> list[Claimed]:
    """Submitted and claimed under a lease of ``lease_s``, as the aggregator does."""
    now = time.time()
    store.submit_many([prepare(r, config, now) for r in requests], config, now=now)
    return store.claim("standard", len(requests), lease_s=lease_s, now=now)


def started(store: LaneStore, config: ServiceConfig, *requests: Request) -> list[Claimed]:
    """Claimed and started under a lease of ``LEASE_S``, as aggregator and task do."""
    pairs = [[c.id, c.token] for c in claimed(store, config, *requests)]
    return start_claimed(store, pairs, route=Route.REALTIME, lease_s=LEASE_S, now=time.time())


@contextlib.contextmanager
def rival(rt: Realtime, config: ServiceConfig) -> Iterator[None]:
    """Another worker: sweeps every 0.1 s, and runs at once whatever the sweep put back in the
    lane (a semaphore wide enough that it never waits for the worker's slot)."""
    stop = threading.Event()
    wide = rt.adapter.account.model_copy(update={"max_concurrency": 4})

    def loop(other: Realtime) -> None:
        while not stop.wait(0.1):
            now = time.time()
            sweep(rt.store, config.lanes, now, lambda ids: None)
            for c in rt.store.claim("standard", 10, lease_s=LEASE_S, now=now):
                pair = [[c.id, c.token]]
                again = start_claimed(
                    rt.store, pair, route=Route.REALTIME, lease_s=LEASE_S, now=now
                )
                run_all(other, again, budget_s=10, lease_s=LEASE_S, concurrency=1)

    with adapter_for(wide) as adapter:
        thread = threading.Thread(
            target=loop, args=[dataclasses.replace(rt, adapter=adapter)], name="rival"
        )
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(30)


def chat_calls(sandbox: SandboxServer) -> int:
    return int(sandbox.stats()["calls_by_endpoint"].get(CHAT, 0))


def test_a_call_slower_than_the_lease_is_neither_requeued_nor_paid_twice(
    rt: Realtime, sandbox: SandboxServer, store: LaneStore, service_config: ServiceConfig
) -> None:
    sandbox.configure(latency_ms=3000)  # three leases long
    [c] = started(store, service_config, chat("slow"))
    with rival(rt, service_config):
        finished = run_all(rt, [c], budget_s=10, lease_s=LEASE_S, concurrency=1)
    assert chat_calls(sandbox) == 1, "the provider was called (and paid) twice"
    assert finished == [c.id], "the worker's own finish was refused: its lease was taken"
    status = store.status(c.id)
    assert status.state is State.DONE and status.error is None


def test_a_slow_call_uses_up_no_attempt(
    rt: Realtime, sandbox: SandboxServer, store: LaneStore, service_config: ServiceConfig
) -> None:
    """One attempt allowed: an expiry under a live worker would fail the request outright."""
    sandbox.configure(latency_ms=2500)
    [c] = started(store, service_config, chat("one try", max_attempts=1))
    with rival(rt, service_config):
        outcome = run_one_with_heartbeat(rt, c)
    assert outcome is State.DONE, "the lease ran out under a live worker and took the attempt"
    status = store.status(c.id)
    assert (status.state, status.attempts, status.error) == (State.DONE, 1, None)


def run_one_with_heartbeat(rt: Realtime, c: Claimed, budget_s: float = 10) -> State | None:
    """``run_all``'s heartbeat around one request, to read its outcome."""
    with Heartbeat(rt.store, [c], lease_s=LEASE_S, now=rt.clock.time):
        return run_one(rt, c, budget_s)


def test_the_slot_wait_and_the_call_share_one_budget(
    rt: Realtime, sandbox: SandboxServer, store: LaneStore, service_config: ServiceConfig
) -> None:
    """2 s waiting for the only slot leave 2 s of a 4 s budget: a 3 s call no longer fits."""
    sandbox.configure(latency_ms=3000)
    [c] = started(store, service_config, chat("queued for a slot"))
    slot = RedisSemaphore(store.redis, store.keys.semaphore("openai", "gpt-4o-mini"), 1)
    token = slot.try_acquire()
    assert token is not None
    releaser = threading.Timer(2.0, slot.release, args=[token])
    releaser.start()
    try:
        state = run_one_with_heartbeat(rt, c, budget_s=4)
    finally:
        releaser.join()
    status = store.status(c.id)
    assert state is State.QUEUED, f"the call ran past the budget to {state}"
    assert status.error is not None and status.error.code == "ProviderTimeout"
    assert status.error.retryable


WORKER = """
import sys, time
import redis
from pydantic import SecretStr
from routing.decide.backoff import RetryPolicy
from routing.decide.cost import parse_prices
from routing.engine.claims import start_claimed
from routing.engine.realtime import Realtime, run_all
from routing.models import Claimed, Route
from routing.providers import ProviderAccount, adapter_for
from routing.store.lanes import LaneStore
from routing.store.observations import ObservationStore

url, ns, base_url, raw = sys.argv[1:5]
store = LaneStore(redis.Redis.from_url(url), namespace=ns, url=url)
account = ProviderAccount(
    name="openai", kind="openai", base_url=base_url, api_key=SecretStr("sk-x"), max_concurrency=4
)
with adapter_for(account) as adapter:
    rt = Realtime(store=store, adapter=adapter, policy=RetryPolicy(max_tries=1),
                  observations=ObservationStore(store.redis, namespace=ns, url=url),
                  prices=parse_prices(open("config/prices.toml").read()), clock=time)
    c, lease_s = Claimed.model_validate_json(raw), float(sys.argv[5])
    started = start_claimed(store, [[c.id, c.token]], route=Route.REALTIME, lease_s=lease_s,
                            now=time.time())
    run_all(rt, started, budget_s=10, lease_s=lease_s, concurrency=1)
"""


def test_a_worker_killed_mid_call_loses_its_lease_and_another_answers_once(
    rt: Realtime,
    sandbox: SandboxServer,
    store: LaneStore,
    service_config: ServiceConfig,
    tmp_path: Path,
) -> None:
    """The rival sweeps all along: the doomed worker's lease holds while it runs (its call is
    slower than the lease), and runs out only once the worker is dead."""
    sandbox.configure(latency_ms=2000)
    config = service_config
    [c] = claimed(store, config, chat("killed"), lease_s=60)  # waits for a worker
    faults = {"MIXBATCH_FAULT_POINTS": "realtime", "MIXBATCH_FAULT_ONCE_DIR": str(tmp_path)}
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIXBATCH_FAULT")}
    argv = [store.url, store.keys.ns, sandbox.openai_base_url, c.model_dump_json(), str(LEASE_S)]
    with rival(rt, config):
        worker = subprocess.run(
            [sys.executable, "-c", WORKER, *argv],
            cwd=ROOT,
            env={**env, **faults},
            capture_output=True,
            timeout=60,
        )
        assert worker.returncode == FAULT_EXIT_CODE, worker.stderr.decode()[-2000:]
        assert chat_calls(sandbox) == 1, "the rival called while the worker still held the lease"
        sandbox.configure(latency_ms=0)
        deadline = time.monotonic() + 30
        while store.status(c.id).state is not State.DONE and time.monotonic() < deadline:
            time.sleep(0.1)
    status = store.status(c.id)
    assert status.state is State.DONE, status
    assert status.attempts == 2, "the killed attempt counts"
    assert chat_calls(sandbox) == 2, "called again once, by the rival"
    counts = store.redis.hgetall(store.keys.counts("standard"))
    assert int(counts[b"route:realtime:done"]) == 1, "answered once"


# -- the renewal itself -----------------------------------------------------------------------


def lease_of(store: LaneStore, c: Claimed) -> tuple[float, float | None]:
    """The request's ``lease_until`` and its score in the lane's leases (what the sweep reads)."""
    until = float(store.redis.hget(store.keys.request(c.id), "lease_until") or 0)
    return until, store.redis.zscore(store.keys.leases(c.request.lane), c.id)


def test_renewal_is_token_checked_only_extends_and_ends_with_the_request(
    store: LaneStore, service_config: ServiceConfig
) -> None:
    [c] = started(store, service_config, chat("renew"))
    now = time.time()
    assert store.renew_many([(c.id, "not-the-token")], lease_s=60, now=now) == [False]
    assert lease_of(store, c)[0] < now + 2, "a stranger's renewal changed nothing"
    assert store.renew_many([(c.id, c.token)], lease_s=60, now=now) == [True]
    assert lease_of(store, c) == (now + 60, now + 60)
    assert store.renew_many([(c.id, c.token)], lease_s=1, now=now) == [True]
    assert lease_of(store, c) == (now + 60, now + 60), "a renewal never shortens a lease"
    assert store.cancel(c.id) is State.CANCELLED
    assert store.renew_many([(c.id, c.token)], lease_s=60, now=now + 1) == [False]
    assert lease_of(store, c)[1] is None, "a finished request is in no lease set again"


def heartbeats() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "mixbatch-lease-heartbeat"]


def test_the_heartbeat_renews_while_its_block_runs_and_stops_with_it(
    store: LaneStore, service_config: ServiceConfig
) -> None:
    [c] = started(store, service_config, chat("beat"))
    before, _ = lease_of(store, c)
    with Heartbeat(store, [c], lease_s=LEASE_S):
        time.sleep(3 * LEASE_S)
        assert len(heartbeats()) == 1
        during, _ = lease_of(store, c)
    assert during > before + LEASE_S, "renewed while running"
    assert heartbeats() == [], "the thread ends with its block"
    time.sleep(LEASE_S / 2)
    assert lease_of(store, c)[0] == during, "nothing renews once the block is left"


def test_a_stuck_worker_stops_renewing_after_its_limit(
    store: LaneStore, service_config: ServiceConfig
) -> None:
    """A block still running past ``max_hold_s`` is stuck: its leases run out like a dead one's."""
    [c] = started(store, service_config, chat("stuck"))
    with Heartbeat(store, [c], lease_s=LEASE_S, max_hold_s=0.5):
        time.sleep(1.0)
        assert heartbeats() == [], "the heartbeat gave up"
        stopped, _ = lease_of(store, c)
        time.sleep(LEASE_S)
        assert lease_of(store, c)[0] == stopped
