"""The replica wait of a submit for ``redis.asyncio`` clients (``routing.async_client``).

The same rule as ``routing.store.connect.Replication`` (whose counts and verdicts it uses):
after a submit's writes, one ``WAIT`` per master that holds a written slot, preceded on the
same connection by a tiny write in that slot. On a single node or behind Sentinel a pipeline
of the client is one connection; on a Redis Cluster the async client hands no connection of
one node out, so each master gets a small client of its own, kept until ``aclose``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster as AsyncCluster

from routing.store.connect import Replication, marker_key, node_options, parse_redis_url

__all__ = ["AsyncReplication"]


class AsyncReplication:
    """``Replication.confirm``, awaited; ``node_options`` build a cluster master's client."""

    def __init__(self, rule: Replication, node_options: dict[str, Any]) -> None:
        self.rule = rule
        self._options = node_options
        self._masters: dict[str, aioredis.Redis] = {}

    @classmethod
    def for_url(cls, url: str) -> AsyncReplication:
        """The wait ``MIXBATCH_REDIS_MIN_REPLICAS`` and ``MIXBATCH_REDIS_WAIT_TIMEOUT_S`` ask for,
        with the credentials and TLS of ``url`` for a cluster master's own client."""
        target = parse_redis_url(url)
        options = node_options(target) if target.kind == "cluster" else {}
        return cls(Replication.from_env(), options)

    async def confirm(self, client: aioredis.Redis, slot_keys: Iterable[str]) -> None:
        """After a submit wrote ``slot_keys``' slots: their masters' replicas have it, or raise
        ``ReplicationTimeout`` (the submit is then not reported as accepted)."""
        rule = self.rule
        if rule.min_replicas == 0:
            return
        for name, node, key in self._nodes_of(client, slot_keys):
            wanted = rule.wanted(await self._count(name, node))
            if wanted == 0:
                continue
            acked = await _wait(node, key, wanted, rule.timeout_s)
            if acked < wanted and rule.min_replicas is None:  # a failover: read the count again
                rule.remember(name, await node.info("replication"))
                wanted = rule.wanted(rule.cached_count(name))
            rule.check(name, acked, wanted)

    async def _count(self, name: str, node: aioredis.Redis) -> int:
        count = self.rule.cached_count(name)
        if count is None:
            count = self.rule.remember(name, await node.info("replication"))
        return count

    def _nodes_of(
        self, client: aioredis.Redis, keys: Iterable[str]
    ) -> list[tuple[str, aioredis.Redis, str]]:
        """(a name of the master, a client whose pipeline is one connection to it, a key)."""
        if not isinstance(client, AsyncCluster):
            first = next(iter(keys), None)
            return [] if first is None else [(_name(client), client, first)]
        found: dict[str, tuple[str, aioredis.Redis, str]] = {}
        for key in keys:
            node = client.get_node_from_key(key)
            if node is None or node.name in found:
                continue
            master = self._masters.get(node.name)
            if master is None:
                master = aioredis.Redis(host=node.host, port=node.port, **self._options)
                self._masters[node.name] = master
            found[node.name] = (node.name, master, key)
        return list(found.values())

    async def aclose(self) -> None:
        for master in self._masters.values():
            await master.aclose()  # type: ignore[attr-defined]  # types-redis predates it
        self._masters.clear()


async def _wait(node: aioredis.Redis, key: str, replicas: int, timeout_s: float) -> int:
    async with node.pipeline(transaction=False) as pipe:
        pipe.set(marker_key(key), "1", px=60_000)
        pipe.execute_command("WAIT", replicas, int(timeout_s * 1000))
        return int((await pipe.execute())[-1])


def _name(client: aioredis.Redis) -> str:
    """host:port of a one-node client, or the Sentinel service it follows."""
    pool = client.connection_pool
    service = getattr(pool, "service_name", None)
    if service:
        return f"the master of Sentinel service {service}"
    kwargs = pool.connection_kwargs
    return f"{kwargs.get('host', 'unix')}:{kwargs.get('port', kwargs.get('path', ''))}"
