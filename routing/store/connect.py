"""Redis clients for every form ``MIXBATCH_REDIS_URL`` takes, and the replica wait of a submit.

The forms:

    redis://[[user]:password@]host[:port][/db]       one node (``rediss://``: TLS), as always
    redis+cluster://[[user]:password@]h:p[,h:p...]/  Redis Cluster (``rediss+cluster://``: TLS);
                                                     any reachable node finds the others
    redis+sentinel://[[user]:password@]h:p[,h:p...]/service[/db]
                                                     the master Sentinel names ``service``,
                                                     followed on failover (``rediss+sentinel://``)

Every form builds a client with redis-py's own classes (``Redis``, ``RedisCluster``, a
Sentinel-managed ``Redis``), so scripts, pipelines and retries are redis-py's. A URL that cannot
work is refused here, in a sentence naming the variable: a malformed one, a cluster none of
whose nodes answers, a Sentinel service no sentinel knows.

**The replica wait.** Redis replicates asynchronously: a master may acknowledge a submit and
die before any replica has it, and the promoted replica never saw the request. ``Replication``
closes that window: after a submit's writes, one ``WAIT`` on the node that holds each written
lane asks for ``MIXBATCH_REDIS_MIN_REPLICAS`` acknowledgements (unset: 1 on a master that
reports a connected replica, 0 on one that reports none) within
``MIXBATCH_REDIS_WAIT_TIMEOUT_S``; too few raise ``ReplicationTimeout`` and the submit is not
reported as accepted. ``WAIT`` counts the writes of the connection it is sent on, and redis-py
may hand the next command another pooled connection, so the wait is preceded, on the same
connection, by a tiny write in the lane's slot: whatever connection the submit used, that write
comes later in the replication stream than the submit's.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import quote, unquote

import redis
import redis.asyncio as aioredis
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisClusterException
from redis.sentinel import Sentinel

from routing.errors import ConfigError, ReplicationTimeout, StoreUnavailable
from routing.store.base import redact_url
from routing.store.scripts import script_sources

__all__ = [
    "RedisTarget",
    "Replication",
    "connect",
    "connect_async",
    "is_cluster",
    "parse_redis_url",
]

VARIABLE = "MIXBATCH_REDIS_URL"
Kind = Literal["node", "cluster", "sentinel"]
_SCHEMES: dict[str, tuple[Kind, bool]] = {
    "redis": ("node", False),
    "rediss": ("node", True),
    "unix": ("node", False),
    "redis+cluster": ("cluster", False),
    "rediss+cluster": ("cluster", True),
    "redis+sentinel": ("sentinel", False),
    "rediss+sentinel": ("sentinel", True),
}
_DEFAULT_PORT = {"node": 6379, "cluster": 6379, "sentinel": 26379}
_FORMS = (
    "redis://host:port/db, rediss://..., redis+cluster://host:port[,host:port...]/, "
    "rediss+cluster://..., redis+sentinel://host:port[,host:port...]/service/db"
)


@dataclass(frozen=True)
class RedisTarget:
    """What a ``MIXBATCH_REDIS_URL`` names, parsed; ``url`` is the text it came from."""

    url: str
    kind: Kind
    tls: bool
    nodes: tuple[tuple[str, int], ...] = ()
    service: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = None
    query: str = ""
    variable: str = VARIABLE

    def node_url(self, host: str, port: int, db: int = 0) -> str:
        """A plain ``redis://`` URL of one node, with this URL's credentials and options."""
        auth = ""
        if self.username or self.password:
            auth = f"{_quote(self.username or '')}:{_quote(self.password or '')}@"
        shown = f"[{host}]" if ":" in host else host
        query = f"?{self.query}" if self.query else ""
        return f"{'rediss' if self.tls else 'redis'}://{auth}{shown}:{port}/{db}{query}"


def _quote(text: str) -> str:
    return quote(text, safe="")


def _bad(url: str, variable: str, why: str) -> ConfigError:
    return ConfigError(f"{variable}: {redact_url(url)} {why}; the forms are {_FORMS}")


def _host_port(text: str, default: int, url: str, variable: str) -> tuple[str, int]:
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest.removeprefix(":")
    else:
        host, _, port_text = text.rpartition(":") if ":" in text else (text, "", "")
    if not host:
        raise _bad(url, variable, f"has an empty host in {text!r}")
    if not port_text:
        return host, default
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise _bad(url, variable, f"has a bad port in {host}:{port_text}")
    return host, int(port_text)


def parse_redis_url(url: str, variable: str = VARIABLE) -> RedisTarget:
    """Parse ``url`` into a ``RedisTarget``; a ``ConfigError`` naming ``variable`` if malformed.

    A plain ``redis://`` URL is checked by redis-py when the client is built; the cluster and
    Sentinel forms hold several hosts, which no URL parser reads, so they are split here.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in _SCHEMES:
        raise _bad(url, variable, "has an unknown scheme")
    kind, tls = _SCHEMES[scheme.lower()]
    if kind == "node":
        return RedisTarget(url=url, kind=kind, tls=tls, variable=variable)
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, pw = userinfo.partition(":")
        username, password = unquote(user) or None, unquote(pw) if colon else None
        if not colon:  # redis://secret@host: the single word is the password, as redis-py reads it
            username, password = None, unquote(user)
    if not hosts:
        raise _bad(url, variable, "names no host")
    nodes = tuple(
        _host_port(h.strip(), _DEFAULT_PORT[kind], url, variable) for h in hosts.split(",")
    )
    parts = [p for p in path.split("/") if p]
    service, db = "", 0
    if kind == "cluster":
        if parts not in ([], ["0"]):
            raise _bad(url, variable, "has a path: a Redis Cluster has one database, 0")
    else:
        if not parts or len(parts) > 2:
            raise _bad(url, variable, "needs the Sentinel service name as its path (/service/db)")
        service = unquote(parts[0])
        if len(parts) == 2:
            if not parts[1].isdigit():
                raise _bad(url, variable, f"has a database {parts[1]!r} that is not a number")
            db = int(parts[1])
    return RedisTarget(
        url=url,
        kind=kind,
        tls=tls,
        nodes=nodes,
        service=service,
        db=db,
        username=username,
        password=password,
        query=query,
        variable=variable,
    )


def is_cluster(url: str) -> bool:
    """Whether ``url`` names a Redis Cluster (whose keys of one script must share a slot)."""
    return url.partition("://")[0].lower() in ("redis+cluster", "rediss+cluster")


def node_options(target: RedisTarget) -> dict[str, Any]:
    """redis-py's connection options from the URL's credentials and query (host and port out)."""
    from redis.connection import parse_url

    host, port = target.nodes[0]
    options = dict(parse_url(target.node_url(host, port, target.db)))
    for name in ("host", "port", "connection_class"):
        options.pop(name, None)
    if target.kind == "cluster":
        options.pop("db", None)  # a cluster has database 0 only, and refuses the argument
    if target.tls:
        options["ssl"] = True
    return options


def _url_errors(target: RedisTarget) -> contextlib.AbstractContextManager[None]:
    from routing.store.base import url_errors

    return url_errors(target.url, target.variable)


def connect(url: str, variable: str = VARIABLE, **options: Any) -> redis.Redis:
    """A sync client for ``url`` in any of its forms (the cluster client is typed as ``Redis``:
    it answers the same commands, and every script's keys share one slot).

    A cluster's nodes are asked for its map now; a Sentinel service is looked up now: either
    failing is an error naming ``variable``, not a surprise at the first submit.
    """
    target = parse_redis_url(url, variable)
    options.setdefault("health_check_interval", 30)
    if target.kind == "node":
        with _url_errors(target):
            return redis.Redis.from_url(url, **options)
    if target.kind == "cluster":
        return _cluster(target, options)
    sentinel = Sentinel(list(target.nodes), socket_timeout=options.get("socket_timeout") or 5.0)
    _check_service(target, [s for s in sentinel.sentinels])
    return sentinel.master_for(target.service, **{**node_options(target), **options})


@functools.cache
def _sources_by_sha() -> dict[str, str]:
    return {hashlib.sha1(t.encode()).hexdigest(): t for t in script_sources().values()}


def _pipelined_script(pipe: Any, sha: str, numkeys: int, *keys_and_args: Any) -> Any:
    """A script queued in a cluster pipeline, sent as ``EVAL`` with its text: the node it
    lands on may never have seen it (a replica promoted since), and a pipelined ``EVALSHA``
    cannot fall back to loading it there."""
    return pipe.execute_command("EVAL", _sources_by_sha()[sha], numkeys, *keys_and_args)


class _Cluster(RedisCluster):
    """redis-py's cluster client whose pipelines run mixbatch's scripts.

    redis-py refuses a script in a cluster pipeline; the store pipelines scripts (one per lane
    and chunk, every one's keys in one slot), which the cluster pipeline routes by its keys.
    """

    def pipeline(self, transaction: Any = None, shard_hint: Any = None) -> Any:
        pipe = super().pipeline(transaction, shard_hint)
        pipe.evalsha = functools.partial(_pipelined_script, pipe)
        return pipe


def _cluster(target: RedisTarget, options: dict[str, Any]) -> redis.Redis:
    options.pop("health_check_interval", None)
    startup = [ClusterNode(h, p) for h, p in target.nodes]
    try:
        client: Any = _Cluster(
            startup_nodes=startup,
            **node_options(target),
            **options,
        )
    except (RedisClusterException, redis.ConnectionError, redis.TimeoutError) as exc:
        raise _no_cluster(target, exc) from None
    return client  # a RedisCluster answers as a Redis here


def _no_cluster(target: RedisTarget, exc: Exception) -> StoreUnavailable:
    return StoreUnavailable(
        f"{target.variable}: no node of the Redis Cluster at {redact_url(target.url)} "
        f"answered ({type(exc).__name__}); check the hosts and ports, and that the cluster "
        "is up (`redis-cli --cluster check HOST:PORT`)"
    )


def _check_service(target: RedisTarget, sentinels: Iterable[redis.Redis]) -> None:
    """Fail now, in a sentence, when no sentinel answers or none knows the service."""
    answered = 0
    for s in sentinels:
        try:
            masters = s.sentinel_masters()
        except (redis.ConnectionError, redis.TimeoutError):
            continue
        answered += 1
        if target.service in masters:
            return
    if answered == 0:
        raise StoreUnavailable(
            f"{target.variable}: no sentinel of {redact_url(target.url)} answered; "
            "check the hosts and ports (a sentinel listens on 26379 by default)"
        )
    raise ConfigError(
        f"{target.variable}: unknown Sentinel service {target.service!r}: none of the "
        f"{answered} sentinel(s) at {redact_url(target.url)} monitors it; the path of the URL "
        "is the name in `sentinel monitor NAME ...` (see `SENTINEL MASTERS`)"
    )


def connect_async(url: str, variable: str = VARIABLE, **options: Any) -> aioredis.Redis:
    """``connect`` for ``redis.asyncio``: the same forms. Built without a round trip but for a
    Sentinel service, which is looked up now (a sync call, once): an unknown service fails here;
    a cluster's map is read on the first command."""
    from redis.asyncio.cluster import ClusterNode as AsyncNode
    from redis.asyncio.cluster import RedisCluster as AsyncCluster
    from redis.asyncio.sentinel import Sentinel as AsyncSentinel

    target = parse_redis_url(url, variable)
    options.setdefault("health_check_interval", 30)
    if target.kind == "node":
        with _url_errors(target):
            return aioredis.Redis.from_url(url, **options)
    if target.kind == "cluster":
        options.pop("health_check_interval", None)
        nodes = [AsyncNode(h, p) for h, p in target.nodes]
        client: Any = AsyncCluster(startup_nodes=nodes, **node_options(target), **options)
        return client
    sync = Sentinel(list(target.nodes), socket_timeout=5.0)
    try:
        _check_service(target, sync.sentinels)
    finally:
        for s in sync.sentinels:
            s.close()
    sentinel = AsyncSentinel(list(target.nodes), socket_timeout=5.0)
    return sentinel.master_for(target.service, **{**node_options(target), **options})


async def aclose_async(client: aioredis.Redis) -> None:
    """Close a ``connect_async`` client, and the sentinels a Sentinel one asked for its master
    (their connections belong to the event loop too, and would be left open)."""
    await client.aclose()  # type: ignore[attr-defined]  # types-redis predates it
    manager = getattr(getattr(client, "connection_pool", None), "sentinel_manager", None)
    for sentinel in getattr(manager, "sentinels", ()):
        await sentinel.aclose()


# -- the replica wait ----------------------------------------------------------------------------


def _min_replicas_env() -> int | None:
    raw = os.environ.get("MIXBATCH_REDIS_MIN_REPLICAS", "").strip()
    if not raw:
        return None
    if not raw.isdigit():
        raise ConfigError(f"MIXBATCH_REDIS_MIN_REPLICAS={raw!r}: must be a whole number >= 0")
    return int(raw)


def _wait_timeout_env() -> float:
    raw = os.environ.get("MIXBATCH_REDIS_WAIT_TIMEOUT_S", "").strip() or "2"
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value < 3600:
        raise ConfigError(f"MIXBATCH_REDIS_WAIT_TIMEOUT_S={raw!r}: must be seconds, > 0")
    return value


#: How long the replica count of a master (for the unset ``MIXBATCH_REDIS_MIN_REPLICAS``) is
#: trusted before ``INFO replication`` is asked again: a replica added later is soon counted.
_COUNT_TTL_S = 30.0


@dataclass
class Replication:
    """The replica wait after a submit. ``min_replicas`` None: 1 where the node has a replica."""

    min_replicas: int | None = None
    timeout_s: float = 2.0
    _counts: dict[str, tuple[float, int]] = field(default_factory=dict, repr=False)

    @classmethod
    def from_env(cls) -> Replication:
        """``MIXBATCH_REDIS_MIN_REPLICAS`` and ``MIXBATCH_REDIS_WAIT_TIMEOUT_S``, checked."""
        return cls(min_replicas=_min_replicas_env(), timeout_s=_wait_timeout_env())

    def confirm(self, client: redis.Redis, slot_keys: Iterable[str]) -> None:
        """After a submit wrote ``slot_keys``' slots: their nodes' replicas have it, or raise.

        One ``WAIT`` per node holding any of the keys (a single node: one in all).
        """
        if self.min_replicas == 0:
            return
        for node_name, node, key in _nodes_of(client, slot_keys):
            wanted = self.wanted(self._replica_count(node_name, node))
            if wanted == 0:
                continue
            acked = _wait(node, key, wanted, self.timeout_s)
            if acked < wanted and self.min_replicas is None:
                # unset: 1 only while a replica is connected; after a failover the new master
                # may have none (yet), which this re-reads rather than trusting the cache
                self._counts.pop(node_name, None)
                wanted = self.wanted(self._replica_count(node_name, node))
            self.check(node_name, acked, wanted)

    def wanted(self, replicas: int | None) -> int:
        """Acknowledgements to ask of a master with ``replicas`` connected (None: not read)."""
        if self.min_replicas is not None:
            return self.min_replicas
        return min(1, replicas or 0)

    def check(self, node_name: str, acked: int, wanted: int) -> None:
        """Raise ``ReplicationTimeout`` when fewer than ``wanted`` replicas acknowledged."""
        if acked < wanted:
            raise ReplicationTimeout(
                f"Redis at {redact_url(node_name)}: {acked} of the {wanted} replica(s) "
                f"MIXBATCH_REDIS_MIN_REPLICAS asks for acknowledged the submit within "
                f"{self.timeout_s:g}s (MIXBATCH_REDIS_WAIT_TIMEOUT_S); it was not accepted: "
                "submit it again (a custom_id makes that safe)"
            )

    def cached_count(self, node_name: str) -> int | None:
        """The replica count read lately for ``node_name``, None when it is due a new read
        (0 while ``MIXBATCH_REDIS_MIN_REPLICAS`` is set: no count is needed then)."""
        if self.min_replicas is not None:
            return 0
        seen = self._counts.get(node_name)
        if seen is None or time.monotonic() - seen[0] > _COUNT_TTL_S:
            return None
        return seen[1]

    def remember(self, node_name: str, info: Mapping[str, Any]) -> int:
        """Keep the replica count of an ``INFO replication`` reply; returns it."""
        count = int(info.get("connected_slaves", 0))
        self._counts[node_name] = (time.monotonic(), count)
        return count

    def _replica_count(self, node_name: str, node: redis.Redis) -> int:
        count = self.cached_count(node_name)
        if count is None:
            count = self.remember(node_name, node.info("replication"))
        return count


def _wait(node: redis.Redis, key: str, replicas: int, timeout_s: float) -> int:
    """``WAIT`` after a write in ``key``'s slot on the same connection; the replicas that acked."""
    pipe = node.pipeline(transaction=False)
    pipe.set(marker_key(key), "1", px=60_000)
    pipe.execute_command("WAIT", replicas, int(timeout_s * 1000))
    return int(pipe.execute()[-1])


def marker_key(key: str) -> str:
    """The tiny write in ``key``'s slot that precedes a ``WAIT`` (see the module's docstring)."""
    return f"{key}:replicated"


def _nodes_of(client: redis.Redis, keys: Iterable[str]) -> Iterator[tuple[str, redis.Redis, str]]:
    """(a name of the node, a client of it alone, one of the keys it holds) per node."""
    if isinstance(client, RedisCluster):
        seen: set[str] = set()
        for key in keys:
            node = client.get_node_from_key(key)
            if node.name in seen:
                continue
            seen.add(node.name)
            conn = client.get_redis_connection(node)
            yield node.name, conn, key
        return
    first = next(iter(keys), None)
    if first is not None:
        pool = client.connection_pool
        kwargs = pool.connection_kwargs
        name = f"{kwargs.get('host', 'unix')}:{kwargs.get('port', kwargs.get('path', ''))}"
        yield name, client, first


#: A store that never waits (tests of one node, the embedded Redis, the sandbox).
NO_WAIT = Replication(min_replicas=0)
