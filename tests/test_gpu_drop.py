"""Requests cancelled or past their deadline are dropped before they reach the device.

The micro-batcher (real all-MiniLM-L6-v2 on the CPU) answers a request past its ``drop_after``
408 and a cancelled one 409 without running them, and none of their ids is in any batch that
ran; ``run_local`` hears from its lease heartbeat that a request was cancelled while the model
runs, and tells the runner, through a real Redis store and the real engine.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import math
import threading
import time
from collections.abc import Iterator, Sequence

import pytest
import torch

from gpu_worker.config import load_models
from gpu_worker.engine import BatchReport, Engine, LocalAnswer, LocalRequest
from gpu_worker.registry import Registry
from routing.engine.claims import start_claimed
from routing.engine.local import expire_after, run_local
from routing.models import Claimed, Request, Route, ServiceConfig, prepare
from routing.states import State
from routing.store.lanes import LaneStore

MODEL = "sentence-transformers/all-MiniLM-L6-v2"


class Ran:
    """What reached the device: every batch the engine ran, and a hook on the first one."""

    def __init__(self) -> None:
        self.batches: list[BatchReport] = []
        self.on_first: list[object] = []

    def __call__(self, report: BatchReport) -> None:
        self.batches.append(report)
        if len(self.batches) == 1:
            for hook in self.on_first:
                hook()  # type: ignore[operator]

    def ids(self) -> set[str]:
        return {rid for b in self.batches for rid in b.request_ids}


@pytest.fixture(scope="module")
def ran() -> Ran:
    return Ran()


@pytest.fixture(scope="module")
def engine(ran: Ran) -> Engine:
    spec = load_models()[MODEL].model_copy(update={"max_batch_size": 2})
    return Engine(spec, torch.device("cpu"), on_batch=ran, admit_chunk=64)


@pytest.fixture(autouse=True)
def fresh(ran: Ran) -> Iterator[None]:
    ran.batches.clear()
    ran.on_first.clear()
    yield


def texts(prefix: str, n: int, **extra: float) -> list[LocalRequest]:
    return [
        LocalRequest(
            f"{prefix}{i}",
            "/v1/embeddings",
            {"model": MODEL, "input": f"text number {i} of {prefix}"},
            "bulk",
            time.time() + 3600 + i,
            **extra,  # type: ignore[arg-type]
        )
        for i in range(n)
    ]


def test_a_request_past_its_drop_time_never_reaches_the_device(engine: Engine, ran: Ran) -> None:
    live = texts("live", 4)
    late = texts("late", 4, drop_after=time.time() - 1)
    answers = engine.run([*late[:2], *live, *late[2:]])
    by_id = {a.id: a for a in answers}
    for r in late:
        a = by_id[r.id]
        assert a.status_code == 408 and a.error is not None
        assert a.error["code"] == "deadline_exceeded" and not a.retryable
    assert all(by_id[r.id].ok for r in live)
    assert ran.ids() == {r.id for r in live}
    assert engine.stats()["dropped"] >= 4


def test_a_request_cancelled_while_it_waits_never_reaches_the_device(
    engine: Engine, ran: Ran
) -> None:
    """Batches of two: while the first runs, the last four are cancelled; they never run."""
    reqs = texts("c", 12)
    gone = [r.id for r in reqs[-4:]]
    dropped: list[int] = []
    ran.on_first.append(lambda: dropped.append(engine.cancel(gone)))
    answers = engine.run(reqs)
    assert dropped == [4]
    for a in answers:
        if a.id in gone:
            assert a.status_code == 409 and a.error is not None and a.error["code"] == "cancelled"
        else:
            assert a.ok
    assert not ran.ids() & set(gone) and len(ran.ids()) == 8
    assert engine.cancel(gone) == 0, "a request already answered is not dropped again"


def test_the_registry_drops_a_cancelled_request_of_a_model_not_yet_running() -> None:
    registry = Registry({MODEL: load_models()[MODEL]}, torch.device("cpu"))
    reqs = texts("g", 3)
    registry._waiting |= {r.id for r in reqs}  # a run in flight, its model not started yet
    registry.cancel([reqs[1].id])
    registry._waiting.clear()
    answers = registry.run(reqs)
    assert [a.ok for a in answers] == [True, False, True]
    assert answers[1].status_code == 409


def test_expire_after_follows_the_lanes_deadline_policy() -> None:
    assert expire_after(100.0, "expire") == 100.0
    assert math.isinf(expire_after(100.0, "run"))


def test_run_local_tells_the_runner_of_a_request_cancelled_while_the_model_runs(
    store: LaneStore, service_config: ServiceConfig, engine: Engine, ran: Ran
) -> None:
    """The lease heartbeat sees the cancel (the store refuses the renewal) and the engine drops
    the request before the device: a cancel by ``mixbatch cancel`` while a micro-batch runs."""
    now = time.time()
    body = {"model": MODEL, "input": "hello"}
    reqs = [Request(lane="bulk", endpoint="/v1/embeddings", body=body) for _ in range(10)]
    tickets = store.submit_many([prepare(r, service_config, now) for r in reqs], service_config)
    claims = store.claim("bulk", len(tickets), lease_s=60, now=now)
    started = start_claimed(
        store, [[c.id, c.token] for c in claims], route=Route.GPU, lease_s=60, now=now
    )
    assert len(started) == 10
    victim = started[-1].id
    heard: list[Sequence[str]] = []
    beat = threading.Event()

    def cancel(ids: Sequence[str]) -> None:
        heard.append(list(ids))
        engine.cancel(ids)
        beat.set()

    def first_batch() -> None:  # the first batch is on the device: cancel, wait for the beat
        assert store.cancel(victim) is State.CANCELLED
        assert beat.wait(10), "the heartbeat never reported the lost lease"

    ran.on_first.append(first_batch)

    def runner(items: Sequence[Claimed]) -> list[LocalAnswer]:
        return engine.run(
            [LocalRequest(c.id, "/v1/embeddings", c.request.body, "bulk") for c in items]
        )

    outcome = run_local(store, started, runner, time.time, lease_s=0.6, cancel=cancel)
    assert heard == [[victim]]
    assert victim not in ran.ids() and victim not in outcome.finished
    assert sorted(outcome.finished) == sorted(c.id for c in started if c.id != victim)
    result = store.result(victim)
    assert result is not None and result.status is State.CANCELLED
