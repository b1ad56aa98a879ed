"""The lane store behind Sentinel: one master, one replica, three sentinels, all real.

The master is SIGKILLed mid-run; the sentinels promote the replica, the store follows it, and
every request is answered and delivered: nothing is lost. A delivery in flight at the kill may
arrive twice (the dead master's last writes, a delivery mark, were not replicated): receivers
dedupe by request id (docs/scale-out.md). Before that, a submit whose replica does not
acknowledge it is refused rather than reported accepted.

Celery's broker here is a Redis of its own, as the callbacks' receipts must be: with the broker
on the same failing-over master, a callback message published just before the kill can vanish
with the master after its delivery was marked (docs/scale-out.md says so; the ``sentinel://``
broker the Sentinel store lends by default is checked in tests/test_urls.py).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from config.settings import reset_settings
from routing.client import AsyncClient, Client
from routing.errors import ConfigError, ReplicationTimeout
from routing.sandbox import Knobs
from routing.store.connect import connect
from tasks.cli.views import _health_once
from tests.servers import (
    RUN_N,
    RedisNode,
    SentinelGroup,
    free_ports,
    run_workload,
    start_stack,
)
from tests.test_e2e import _config

pytestmark = pytest.mark.timeout(300)

ITEM = {
    "lane": "urgent",
    "endpoint": "/v1/embeddings",
    "body": {"model": "text-embedding-3-small", "input": "hello"},
}


@pytest.fixture(scope="module")
def group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelGroup]:
    g = SentinelGroup(tmp_path_factory.mktemp("sentinel")).start()
    yield g
    g.stop()


def test_unknown_service_names_the_variable(group: SentinelGroup) -> None:
    with pytest.raises(ConfigError, match="MIXBATCH_REDIS_URL: unknown Sentinel service 'nope'"):
        connect(group.url.replace(f"/{group.service}/", "/nope/"))


def test_submit_unacknowledged_by_the_replica_is_refused(
    group: SentinelGroup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis acknowledges a write before any replica has it; with a replica connected, submit
    waits for it (``WAIT``), and a replica that does not answer in time makes the submit fail
    instead of returning a ticket the next master may never have seen."""
    monkeypatch.setenv("MIXBATCH_REDIS_WAIT_TIMEOUT_S", "0.5")
    monkeypatch.delenv("MIXBATCH_REDIS_MIN_REPLICAS", raising=False)
    with Client(group.url, namespace="wait", config=_config()) as client:
        assert client.submit(ITEM).id  # the replica acknowledges
        replica = group.replicas[0].proc
        assert replica is not None
        os.kill(replica.pid, signal.SIGSTOP)
        try:
            with pytest.raises(ReplicationTimeout, match="0 of the 1 replica"):
                client.submit({**ITEM, "custom_id": "unacked"})
        finally:
            os.kill(replica.pid, signal.SIGCONT)
        # resubmitting with the same custom_id is safe: one request, now acknowledged
        first = client.submit({**ITEM, "custom_id": "unacked"})
        again = client.submit({**ITEM, "custom_id": "unacked"})
        assert again.id == first.id


def test_async_submit_unacknowledged_by_the_replica_is_refused(
    group: SentinelGroup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AsyncClient follows the Sentinel service and waits for the replica like ``Client``."""
    monkeypatch.setenv("MIXBATCH_REDIS_WAIT_TIMEOUT_S", "0.5")
    monkeypatch.delenv("MIXBATCH_REDIS_MIN_REPLICAS", raising=False)
    replica = group.replicas[0].proc
    assert replica is not None

    async def session() -> None:
        async with AsyncClient(group.url, namespace="await", config=_config()) as mb:
            assert (await mb.submit(ITEM)).id
            os.kill(replica.pid, signal.SIGSTOP)
            try:
                with pytest.raises(ReplicationTimeout, match="0 of the 1 replica"):
                    await mb.submit({**ITEM, "custom_id": "unacked"})
            finally:
                os.kill(replica.pid, signal.SIGCONT)
            first = await mb.submit({**ITEM, "custom_id": "unacked"})
            assert (await mb.submit({**ITEM, "custom_id": "unacked"})).id == first.id

    asyncio.run(session())


def test_master_killed_the_service_follows_nothing_lost(
    group: SentinelGroup, tmp_path: Path
) -> None:
    counts = RedisNode(tmp_path / "counts", free_ports(1)[0]).start()
    env = {"MIXBATCH_BROKER_URL": counts.url}
    stack = start_stack(
        tmp_path / "stack", group.url, counts_url=counts.url, knobs=Knobs(latency_ms=5), env=env
    )
    try:
        first_master = group.master_port()

        def kill_master() -> None:
            group.master.kill()
            end = time.monotonic() + 30
            while group.master_port() == first_master:
                assert time.monotonic() < end, "no replica promoted"
                time.sleep(0.2)

        run_workload(
            stack, group.url, n=RUN_N, counts_url=counts.url, during=kill_master, exactly_once=False
        )
        assert group.master_port() == group.replicas[0].port
    finally:
        stack.stop()
        counts.stop()


def test_health_on_the_lent_sentinel_broker_passes_the_master_name(
    group: SentinelGroup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``mixbatch health`` on a Sentinel store with no broker of its own: Celery's broker is the
    ``sentinel://`` one the store lends, which kombu cannot use without the service's name.
    Without it the workers check reported "inspect failed: master_name is required"; with it
    the broadcast reaches the sentinels' master and, no worker running here, nobody answers."""
    monkeypatch.setenv("MIXBATCH_REDIS_URL", group.url)
    for name in ("MIXBATCH_BROKER_URL", "MIXBATCH_BROKER_MASTER_NAME"):
        monkeypatch.delenv(name, raising=False)
    reset_settings()
    try:
        health = _health_once(0.5)
    finally:
        reset_settings()
    checks = {c.name: c for c in health.checks}
    assert checks["redis"].ok, checks["redis"].detail
    assert checks["workers"].detail.startswith("no worker answered"), checks["workers"].detail
