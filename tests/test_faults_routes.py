"""Fault points of the realtime, local and delivery steps: a real worker dies there, another
finishes, and every request is answered once and applied once by its receiver.

Each case starts a real Celery worker with ``MIXBATCH_FAULT_POINTS=<point>`` and a once-dir, so
it ``os._exit``s (no ack, no ``finally``: a SIGKILL or an OOM kill) at that step, the first time
any process reaches it. Its pool is solo, so the whole worker goes, not one pool child. A second
worker, started after the first is dead, finishes the work. What is checked:

- every request ended DONE once: the lane's ``route:<route>:done`` counter, which each finish
  bumps, equals the number of requests (a second finish would be refused, or counted);
- realtime and local: each request was sent to its receiver once (tests/callback_app.py's
  ``e2e.record`` counts what arrives) and applied once (one row per request id);
- delivery: the one delivery in flight when the worker died is sent again (delivery is
  at-least-once), and the receiver, the Flask integration's callback task keyed on the request
  id, applies every request once: a database trigger counts the writes;
- realtime: the provider was called at most twice per request.
"""

from __future__ import annotations

import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from routing.client import Client
from routing.contrib.answers import Target
from routing.faults import FAULT_EXIT_CODE
from routing.models import Route
from routing.sandbox import Knobs
from routing.states import State
from tasks.cli.demo import LOCAL_MODEL
from tasks.cli.stack import LocalStack
from tests.callback_app import STORE_ANSWER, received_key
from tests.test_deliver import answers_db
from tests.test_e2e import (
    CALLBACK,
    ROOT,
    db_url,
    delivered,
    make_stack,
    payloads,
    start_callbacks,
    wait_for,
)

__all__ = ["answers_db", "db_url"]

N = 4
CHAT = "/v1/chat/completions"
QUEUE = CALLBACK["queue"]


def faults(point: str, once: Path) -> dict[str, str]:
    once.mkdir(exist_ok=True)
    return {"MIXBATCH_FAULT_POINTS": point, "MIXBATCH_FAULT_ONCE_DIR": str(once)}


def chats(n: int) -> list[dict[str, Any]]:
    """Urgent chat requests: the route rule sends them to realtime."""
    return [
        {
            "lane": "urgent",
            "endpoint": CHAT,
            "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"q {i}"}]},
            "callback": CALLBACK,
        }
        for i in range(n)
    ]


def embeddings(n: int) -> list[dict[str, Any]]:
    """Embeddings of the local model: the route rule sends them to the gpu worker."""
    return [
        {
            "lane": "standard",
            "endpoint": "/v1/embeddings",
            "body": {"model": LOCAL_MODEL, "input": f"document {i} about printers"},
            "callback": CALLBACK,
        }
        for i in range(n)
    ]


def died_at_fault(stack: LocalStack, name: str, timeout_s: float) -> None:
    """Wait for the doomed worker to exit, and check it died at its fault point."""
    proc = stack.procs[name]
    try:
        code = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{name} never reached its fault point") from None
    assert code == FAULT_EXIT_CODE, f"{name} exited with {code}: see {stack.log_dir}/{name}.log"
    del stack.procs[name]  # dead: the stack must not wait on it or stop it


def finished_once(stack: LocalStack, ids: list[str], lane: str, route: Route) -> None:
    """Every request DONE on ``route``, each finished once, and delivered."""
    with Client(stack.url, namespace=stack.namespace) as client:
        results = [client.result(i, timeout=120) for i in ids]
        assert all(r.status is State.DONE and r.route is route for r in results), results
        wait_for(
            lambda: all(client.status(i).state is State.DELIVERED for i in ids),
            60,
            "every request marked delivered",
        )
    st = stack.store()
    try:
        counts = st.redis.hgetall(st.keys.counts(lane))
    finally:
        st.close()
    assert int(counts[f"route:{route.value}:done".encode()]) == len(ids), "a request finished twice"


def applied_once(url: str, ids: list[str]) -> None:
    """Each request was sent once, and applied (one row per request id) once."""
    wait_for(lambda: set(ids) <= set(delivered(url)), 90, "every request delivered")
    time.sleep(3)  # a few sweeps more: a duplicate would show up now
    applied = payloads(url)
    assert set(applied) == set(ids) and all(applied[i]["id"] == i for i in ids)
    assert all(applied[i]["status"] == State.DONE.value for i in ids)
    sent = delivered(url)
    assert set(sent) == set(ids)
    assert all(n == 1 for n in sent.values()), sent


def submit(url: str, items: list[dict[str, Any]]) -> list[str]:
    with Client(url, namespace="e2e") as client:
        return [t.id for t in client.submit_many(items)]


def doomed_then_rescued(
    stack: LocalStack,
    point: str,
    once: Path,
    items: list[dict[str, Any]],
    receiver: dict[str, str] | None = None,
) -> list[str]:
    """A solo worker that dies at ``point`` takes ``items``; once it is dead, a rescuer (no
    faults) is started. The requests' ids. ``receiver``: the callback worker's extra env."""
    stack.start_worker("doomed", concurrency=1, pool="solo", env=faults(point, once))
    stack.start_worker(
        "callbacks", queues=[QUEUE], concurrency=2, app="tests.callback_app", cwd=ROOT, env=receiver
    )
    stack.start_beat()
    stack.wait_workers(["doomed", "callbacks"])
    ids = submit(stack.url, items)
    died_at_fault(stack, "doomed", 90)
    stack.start_worker("rescuer", concurrency=2)
    stack.wait_workers(["rescuer"])
    return ids


@pytest.mark.timeout(300)
def test_realtime_worker_killed_mid_call(tmp_path: Path, db_url: str) -> None:
    """Answered by the provider, dead before storing it: the lease runs out, the call runs
    again elsewhere (paid twice at most), and the request is answered once."""
    stack = make_stack(tmp_path, db_url, Knobs(latency_ms=200), MIXBATCH_LEASE_S="3")
    try:
        ids = doomed_then_rescued(stack, "realtime", tmp_path / "once", chats(N))
        finished_once(stack, ids, "urgent", Route.REALTIME)
        applied_once(db_url, ids)
        calls = stack.sandbox.stats()["calls_by_endpoint"][CHAT]
        assert N < calls <= 2 * N, f"{calls} provider calls for {N} requests, one killed mid-call"
    finally:
        stack.stop()


@pytest.mark.timeout(420)
def test_gpu_worker_killed_between_answer_and_store(tmp_path: Path, db_url: str) -> None:
    """The micro-batch was answered, the worker died before storing it: the batch runs again on
    the next gpu worker, and each request is answered and delivered once."""
    stack = make_stack(tmp_path, db_url, Knobs(), MIXBATCH_LEASE_S="4", MIXBATCH_GPU_CHUNK="16")
    try:
        stack.start_worker("worker", concurrency=2)
        stack.start_gpu_worker("gpu", env=faults("local", tmp_path / "once"))
        start_callbacks(stack)
        stack.start_beat()
        stack.wait_workers(["worker", "gpu", "callbacks"], timeout_s=180)
        ids = submit(db_url, embeddings(N))
        died_at_fault(stack, "gpu", 120)
        stack.start_gpu_worker("gpu2")
        stack.wait_workers(["gpu2"], timeout_s=180)
        finished_once(stack, ids, "standard", Route.GPU)
        applied_once(db_url, ids)
    finally:
        stack.stop()


@pytest.mark.timeout(300)
def test_worker_killed_between_sink_write_and_delivered_mark(
    tmp_path: Path, db_url: str, answers_db: tuple[Path, Callable[[str], Any]]
) -> None:
    """The sink wrote, the worker died before marking it delivered: the sweeper sends it again
    once its delivery lease runs out. The receiver is the Flask integration's callback task (the
    documented exactly-once receiver, keyed on the request id): sent N + 1 times, applied N."""
    path, query = answers_db  # one row to fill (docs 1), and a trigger counting writes
    with sqlite3.connect(path) as conn:
        conn.executemany("INSERT INTO docs (id) VALUES (?)", [(pk,) for pk in range(2, N + 1)])
    callback = {"kind": "celery", "task": STORE_ANSWER, "queue": QUEUE}
    items = [
        {**item, "callback": callback, "custom_id": Target("docs", str(pk), "answer").custom_id}
        for pk, item in enumerate(chats(N), start=1)
    ]
    stack = make_stack(tmp_path, db_url, Knobs(), MIXBATCH_DELIVERY_LEASE_S="3")
    try:
        receiver = {"E2E_ANSWERS_DB": str(path)}
        ids = doomed_then_rescued(stack, "deliver", tmp_path / "once", items, receiver)
        finished_once(stack, ids, "urgent", Route.REALTIME)
        r = redis.Redis.from_url(db_url)
        try:
            handled = lambda: sum(int(n) for n in r.hvals(received_key("e2e", "handled")))  # noqa: E731
            wait_for(lambda: handled() >= N + 1, 60, "the resent delivery handled")
            time.sleep(3)  # a few sweeps more: another duplicate would show up now
            sent = {
                k.decode(): int(v) for k, v in r.hgetall(received_key("e2e", "received")).items()
            }
        finally:
            r.close()
        assert set(sent) == set(ids)
        assert sorted(sent.values()) == [1] * (N - 1) + [2], f"sent: {sent}"
        assert query("SELECT n FROM writes") == (N,), "each answer written once"
        with sqlite3.connect(path) as conn:
            rows = conn.execute("SELECT mixbatch_status, mixbatch_request_id FROM docs").fetchall()
        assert sorted(rows) == sorted(("done", rid) for rid in ids)
    finally:
        stack.stop()
