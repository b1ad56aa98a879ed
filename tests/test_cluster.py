"""The lane store on a real Redis Cluster: 3 masters, 3 replicas, from the ``redis-server`` binary.

Celery's Redis transport does not speak Cluster, so the broker is a plain Redis of its own
(``MIXBATCH_BROKER_URL``). Mixed requests go through two workers; one master is SIGKILLed mid-run
and its replica takes over; every request is answered and delivered exactly once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from routing.client import AsyncClient, Client, prepare_items
from routing.engine import batch as engine
from routing.engine.batch_handles import BatchHandles
from routing.errors import ReplicationTimeout, StoreUnavailable
from routing.keys import Keys
from routing.sandbox import Knobs
from routing.states import State
from routing.store.batches import BatchRegistry
from routing.store.connect import Replication, connect
from routing.store.lanes import LaneStore
from tasks.cli.stack import LocalStack
from tests.servers import (
    RUN_N,
    RedisCluster,
    RedisNode,
    free_ports,
    run_workload,
    start_stack,
    wait_until,
)
from tests.test_batch_engine import OPTIONS, SETTINGS
from tests.test_e2e import FAST, _config

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    c = RedisCluster(tmp_path_factory.mktemp("cluster")).start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisNode]:
    node = RedisNode(tmp_path_factory.mktemp("broker"), free_ports(1)[0]).start()
    yield node
    node.stop()


def test_store_on_the_cluster_spans_every_master(cluster: RedisCluster) -> None:
    """Submit into every lane, claim, finish and read back through the cluster client; the
    lanes land on more than one master, so this is no single node in disguise."""
    config = _config()
    with Client(cluster.url, namespace="unit", config=config) as client:
        assert client.store.cluster
        client.store.publish_config(config)
        items = [
            {"lane": lane, "endpoint": "/v1/embeddings", "custom_id": f"{lane}-{i}",
             "body": {"model": "text-embedding-3-small", "input": f"{lane} {i}"}}
            for lane in ("urgent", "standard", "bulk") for i in range(5)
        ]  # fmt: skip
        tickets = client.submit_many(items)
        again = client.submit_many(items)
        assert [t.id for t in again] == [t.id for t in tickets]
        assert all(t.duplicate for t in again)
        store = client.store
        claimed = store.claim("urgent", 10, lease_s=30)
        assert len(claimed) == 5
        assert all(client.status(t.id).state is State.CLAIMED for t in tickets[:5])
    keys = Keys("unit")
    masters = {cluster.master_of(keys.queue(lane)).port for lane in ("urgent", "standard", "bulk")}
    masters.add(cluster.master_of(keys.config()).port)
    assert len(masters) > 1, "the test's keys should span masters"


def test_cluster_url_with_no_reachable_node_names_the_variable(cluster: RedisCluster) -> None:
    dead = free_ports(2, bus=True)
    with pytest.raises(Exception) as info:
        connect(f"redis+cluster://127.0.0.1:{dead[0]},127.0.0.1:{dead[1]}/")
    assert "MIXBATCH_REDIS_URL" in str(info.value)
    assert "no node of the Redis Cluster" in str(info.value)


def test_submit_waits_for_the_slot_owners_replica(cluster: RedisCluster) -> None:
    """``WAIT`` goes to the master holding the lane's slot: asking for more replicas than
    that shard has refuses the submit, asking for the one it has accepts it."""
    config = _config()
    store = LaneStore.from_url(cluster.url, namespace="wait")
    try:
        store.publish_config(config)
        item = {"lane": "urgent", "endpoint": "/v1/embeddings",
                "body": {"model": "text-embedding-3-small", "input": "x"}}  # fmt: skip
        prepared = prepare_items([item], config, "default", time.time())
        store.replication = Replication(min_replicas=1, timeout_s=2)
        assert store.submit_one(prepared[0], config).id
        store.replication = Replication(min_replicas=2, timeout_s=0.3)
        with pytest.raises(ReplicationTimeout, match="1 of the 2 replica"):
            store.submit_one(prepared[0], config)
    finally:
        store.close()


def test_master_killed_mid_run_everything_delivered_once(
    cluster: RedisCluster, broker: RedisNode, tmp_path: Path
) -> None:
    stack = start_stack(
        tmp_path / "stack", cluster.url, counts_url=broker.url,
        knobs=Knobs(latency_ms=5, seed=5, batch_turnaround_s=1.0),
        env={"MIXBATCH_BROKER_URL": broker.url},
    )  # fmt: skip
    try:
        victim = cluster.master_of(Keys("e2e").queue("standard"))

        def kill_master() -> None:
            victim.kill()
            wait_until(
                lambda: cluster.master_of(Keys("e2e").queue("standard")) is not victim,
                30,
                "a replica promoted",
            )

        run_workload(
            stack, cluster.url, n=RUN_N, counts_url=broker.url, during=kill_master,
            exactly_once=False,
        )  # fmt: skip
        assert victim.proc is not None and victim.proc.poll() is not None
    finally:
        stack.stop()


def test_async_client_on_the_cluster(
    cluster: RedisCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AsyncClient reserves a custom_id and creates its request in two steps on a cluster (one
    script over both slots is refused: CROSSSLOT), answers a repeat with the first ticket, and
    waits for the lane master's replica as the sync client does."""
    config = _config()
    store = LaneStore.from_url(cluster.url, namespace="async")
    store.publish_config(config)
    items = [
        {"lane": lane, "endpoint": "/v1/embeddings", "custom_id": f"a-{lane}-{i}",
         "body": {"model": "text-embedding-3-small", "input": f"{lane} {i}"}}
        for lane in ("urgent", "bulk") for i in range(3)
    ]  # fmt: skip
    monkeypatch.setenv("MIXBATCH_REDIS_MIN_REPLICAS", "1")

    async def session() -> None:
        async with AsyncClient(cluster.url, namespace="async") as mb:
            one = await mb.submit(items[0])
            again = await mb.submit(items[0])
            assert (again.id, again.duplicate) == (one.id, True)
            many = await mb.submit_many([*items, {**items[0], "custom_id": None}])
            assert [t.duplicate for t in many] == [True] + [False] * 6
            assert many[0].id == one.id
            assert (await mb.status(many[3].id)).state is State.QUEUED
        monkeypatch.setenv("MIXBATCH_REDIS_MIN_REPLICAS", "2")
        monkeypatch.setenv("MIXBATCH_REDIS_WAIT_TIMEOUT_S", "0.3")
        async with AsyncClient(cluster.url, namespace="async") as mb:
            with pytest.raises(ReplicationTimeout, match="1 of the 2 replica"):
                await mb.submit({**items[0], "custom_id": "unacked"})

    try:
        asyncio.run(session())
        assert len(store.claim("bulk", 10, lease_s=30)) == 3
    finally:
        store.close()


def test_beat_on_the_cluster_with_redbeat(
    cluster: RedisCluster, broker: RedisNode, tmp_path: Path
) -> None:
    """A real ``celery beat`` with RedBeat on the cluster store (Celery on a Redis broker):
    its schedule and lock live in the cluster (one hash tag, one slot), so beats on several
    hosts fire each entry once, and a scheduled mixbatch task (the sweep) fires and runs."""
    ns = "beat"
    env = {**FAST, "MIXBATCH_BROKER_URL": broker.url, "MIXBATCH_BEAT_SCHEDULER": "redbeat"}
    stack = LocalStack(tmp_path / "beat", redis_url=cluster.url, namespace=ns, env=env)
    store = LaneStore.from_url(cluster.url, namespace=ns)
    try:
        stack.start()
        stack.publish(_config())
        stack.start_worker("beatw", concurrency=1)
        stack.start_beat()
        wait_until(lambda: store.last_beat("sweep") is not None, 60, "a sweep fired by RedBeat")
        prefix = f"{{{ns}:redbeat}}:"
        assert store.redis.exists(f"{prefix}:lock"), "RedBeat holds its lock in the cluster"
        assert store.redis.exists(f"{prefix}:schedule")
    finally:
        stack.stop()
        store.close()


class _DownMidPoll(BatchRegistry):
    """A registry whose node dies between listing the due batches and reading one of them."""

    rescheduled: list[str]

    def due(self, now: float, limit: int = 100) -> list[str]:
        return ["mb:batch:gone"]

    def get(self, key: str) -> Any:
        raise StoreUnavailable("cannot reach Redis (the master just died)")

    def schedule_poll(self, key: str, at: float) -> None:
        self.rescheduled.append(key)


def test_a_store_error_mid_poll_reschedules_the_batch(store: LaneStore) -> None:
    """A poll step that meets a dying master is logged and its batch looked at again soon.
    The warning once named its batch ``name``, a field every log record already has: logging
    raised KeyError, the rescheduling after it never ran, and the batch waited out the whole
    collect lease (seen in the master-kill run above)."""
    registry = _DownMidPoll(store.redis, namespace=store.keys.ns, url=store.url)
    registry.rescheduled = []
    h = BatchHandles(
        store=store, registry=registry, adapter=lambda _p: None,  # type: ignore[arg-type,return-value]
        observations=None, options=lambda _now: OPTIONS, price=None, dispatch=list,  # type: ignore[arg-type]
        settings=SETTINGS, clock=time.time,
    )  # fmt: skip
    report = engine.poll(h)
    assert registry.rescheduled == ["mb:batch:gone"]
    assert report["polled"] == 0
