"""RabbitMQ as Celery's broker (``MIXBATCH_BROKER_URL=amqp://...``), the lanes in Redis.

A node of our own is started from Debian's ``rabbitmq-server`` on free ports (``.ci/run``
installs it). The end-to-end run and the worker-kill run pass on it; the second one also
purges every service queue mid-run, so the broker *loses* messages, and still every request is
answered and delivered exactly once: durability is the lane store's, the broker only wakes
workers (the sweeper reclaims what a lost message held).
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from config.queues import SERVICE_QUEUES
from routing.sandbox import Knobs
from tasks.cli.stack import LocalStack
from tests.servers import RUN_N, RabbitNode, run_workload, start_stack

pytestmark = pytest.mark.timeout(300)


def _stack(tmp_path: Path, redis_url: str, rabbit: RabbitNode, knobs: Knobs) -> LocalStack:
    return start_stack(
        tmp_path / "stack", redis_url, counts_url=redis_url, knobs=knobs,
        env={"MIXBATCH_BROKER_URL": rabbit.url}, namespace=f"rmq{uuid.uuid4().hex[:6]}",
    )  # fmt: skip


def test_end_to_end_on_rabbitmq(tmp_path: Path, redis_url: str, rabbit: RabbitNode) -> None:
    knobs = Knobs(latency_ms=5, rate_429=0.05, retry_after_s=0.1, seed=3, batch_turnaround_s=1.0)
    stack = _stack(tmp_path, redis_url, rabbit, knobs)
    try:
        run_workload(stack, redis_url, n=RUN_N, counts_url=redis_url)
    finally:
        stack.stop()


def test_worker_killed_and_messages_lost_on_rabbitmq(
    tmp_path: Path, redis_url: str, rabbit: RabbitNode
) -> None:
    stack = _stack(tmp_path, redis_url, rabbit, Knobs(latency_ms=300, batch_turnaround_s=1.0))

    def kill_and_purge() -> None:
        stack.kill("w1")
        for queue in SERVICE_QUEUES:
            done = rabbit.ctl("purge_queue", queue)
            assert done.returncode == 0, done.stderr.decode()

    try:
        run_workload(
            stack, redis_url, n=RUN_N, counts_url=redis_url, during=kill_and_purge,
            after_fraction=0.2, exactly_once=False,
        )  # fmt: skip
    finally:
        stack.stop()
