"""``sink_for``: the sink a request's callback names, built over what one process shares.

A callback names a sink of the service's table (``{"sink": "crm"}``) or a Celery task of the
caller's. A ``SinkContext`` holds the table and the long-lived parts (the HTTP client, SQL
engine pools, Redis clients and scripts), so a sink object is cheap to build per delivery. One
context per process: after a fork, forget it and build another (the worker runtime does this on
``worker_process_init``).

Every network target is checked by the address guard when the table is loaded and again here,
at each delivery: its host is resolved, every address checked, and the connection pinned to a
checked address (``routing.sinks.guard``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection

import httpx
import redis
from pydantic import SecretStr
from redis import Redis
from redis.commands.core import Script
from redis.connection import parse_url

from routing.callbacks import (
    SINKS_FILE,
    CallbackSpec,
    CeleryCallback,
    RetiredCallback,
    SinkCallback,
)
from routing.errors import ConfigError
from routing.sinks.base import DeliveryError, Sink
from routing.sinks.celery import CelerySink, TaskSender
from routing.sinks.guard import AddressPolicy, Resolver, path_refusal, redis_endpoint, resolve_host
from routing.sinks.idle import IDLE_S, MAX_ENTRIES, IdleCache
from routing.sinks.settings import SinkSettings
from routing.sinks.sql import EngineCache, SqlSink
from routing.sinks.stream import StreamSink
from routing.sinks.table import SinkTable, SqlTarget, StreamTarget, WebhookTarget
from routing.sinks.webhook import WebhookSink, new_http_client
from routing.store.scripts import Scripts

__all__ = ["SinkContext", "sink_for"]


def misconfigured(sink: str, message: str, code: str = "sink_misconfigured") -> DeliveryError:
    """A delivery that cannot succeed until the service's configuration changes: a dead
    letter, replayed once it is fixed."""
    return DeliveryError(message, sink=sink, retryable=False, code=code)


class SinkContext:
    """What the sinks of one process share. Thread-safe; clients are opened on first use.

    ``sinks`` is the service's table of named sinks; ``redis`` the service's own Redis, where a
    stream sink without ``url_env`` writes and where stream markers live under ``namespace``;
    ``celery_app`` sends Celery callbacks, never to a queue in ``reserved_queues`` (the
    service's own). SQL engines and other Redis servers' clients unused for ``idle_s`` (by
    ``idle_clock``), or past ``max_handles`` of each, are closed when next touched.
    """

    def __init__(
        self,
        settings: SinkSettings,
        *,
        sinks: SinkTable | None = None,
        redis: Redis | None = None,
        namespace: str = "mb",
        celery_app: TaskSender | None = None,
        reserved_queues: Collection[str] = (),
        resolver: Resolver = resolve_host,
        clock: Callable[[], float] = time.time,
        idle_s: float = IDLE_S,
        max_handles: int = MAX_ENTRIES,
        idle_clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.sinks = sinks if sinks is not None else SinkTable()
        self.redis = redis
        self.namespace = namespace
        self.celery_app = celery_app
        self.reserved_queues = frozenset(reserved_queues)
        self.resolver = resolver
        self.clock = clock
        self.policy = AddressPolicy.from_allow(settings.sink_allow)
        self.engines = EngineCache(
            connect_timeout_s=settings.sql_connect_timeout_s,
            idle_s=idle_s,
            max_entries=max_handles,
            clock=idle_clock,
        )
        self._lock = threading.Lock()
        self._http: httpx.Client | None = None
        #: clients of other Redis servers, by (URL, checked address), closed when idle
        self.redis_clients: IdleCache[tuple[str, str | None], Redis] = IdleCache(
            self._close_client, idle_s=idle_s, max_entries=max_handles, clock=idle_clock
        )
        self._scripts: dict[int, Script] = {}

    def http(self) -> httpx.Client:
        with self._lock:
            if self._http is None:
                self._http = new_http_client(self.settings.webhook_timeout_s)
            return self._http

    def redis_for(self, target: StreamTarget) -> tuple[Redis, bool]:
        """The client for ``target``'s Redis and whether it is the service's own.

        Another Redis is resolved and checked at each delivery, and its client connects to the
        checked address (a TLS connection keeps the name, for its certificate check).
        """
        try:
            url = target.url()
        except ConfigError as exc:
            raise misconfigured("stream", f"{exc}; set it, then replay") from None
        if url is None:
            if self.redis is None:
                raise misconfigured("stream", "no service Redis in this process")
            return self.redis, True
        address = self._redis_address(target, url)
        secret = url.get_secret_value()
        return self.redis_clients.get((secret, address), lambda: _client(secret, address)), False

    def _redis_address(self, target: StreamTarget, url: SecretStr) -> str | None:
        """The checked address to connect to, None where the name must be kept (TLS) or the
        target is a unix socket under an allowed directory."""
        try:
            endpoint = redis_endpoint(url.get_secret_value())
        except ValueError as exc:
            raise misconfigured("stream", f"{target.url_env}: {exc}", "bad_url") from None
        if endpoint.path is not None:
            why = path_refusal(endpoint.path, self.settings.sink_allow_paths, "a unix socket")
            if why is not None:
                raise misconfigured("stream", why, "address_refused")
            return None
        assert endpoint.host is not None
        addresses = self.policy.resolve(endpoint.host, endpoint.port, self.resolver, sink="stream")
        return None if endpoint.tls else addresses[0]

    def append_script(self, client: Redis) -> Script:
        with self._lock:
            script = self._scripts.get(id(client))
            if script is None:
                script = Scripts(client)["stream_append_once"]
                self._scripts[id(client)] = script
            return script

    def _close_client(self, key: tuple[str, str | None], client: Redis) -> None:
        """Close a client gone idle (or at ``close``): its pool is ours, not the client's. A
        connection another thread still holds is left to it and closed when it is released."""
        with self._lock:
            self._scripts.pop(id(client), None)
        client.close()
        client.connection_pool.disconnect(inuse_connections=False)

    def close(self) -> None:
        """Close what this context opened; the service's Redis belongs to its owner."""
        with self._lock:
            http, self._http = self._http, None
        if http is not None:
            http.close()
        self.redis_clients.close()
        with self._lock:
            self._scripts.clear()
        self.engines.close()


def _client(url: str, address: str | None) -> Redis:
    """A client for another Redis, connecting to the checked ``address`` when one is given.
    Builds the pool only; nothing connects until the first command."""
    options = parse_url(url)
    if address is not None:
        options["host"] = address
    pool = redis.ConnectionPool(**options, socket_timeout=10, socket_connect_timeout=5)
    return redis.Redis(connection_pool=pool)


def _named(spec: SinkCallback, context: SinkContext) -> Sink:
    target = context.sinks.find(spec.sink)
    if target is None:
        known = ", ".join(context.sinks.names()) or "none"
        raise misconfigured(
            "named",
            f"no sink named {spec.sink!r} in {context.sinks.source} (sinks: {known}); add it "
            f"to the service's {SINKS_FILE}, then replay",
            "unknown_sink",
        )
    settings = context.settings
    if isinstance(target, WebhookTarget):
        return WebhookSink(
            target,
            settings=settings,
            client=context.http(),
            resolver=context.resolver,
            clock=context.clock,
        )
    if isinstance(target, SqlTarget):
        return SqlSink(
            target,
            settings=settings,
            engines=context.engines,
            policy=context.policy,
            resolver=context.resolver,
            clock=context.clock,
        )
    client, own = context.redis_for(target)
    return StreamSink(
        target,
        settings=settings,
        client=client,
        script=context.append_script(client),
        namespace=context.namespace,
        own_redis=own,
    )


def sink_for(spec: CallbackSpec, context: SinkContext) -> Sink:
    """The sink ``spec`` names. Specs are validated at submit; what only the worker knows (the
    table, the service's queues, the addresses a host resolves to now) is checked here, and a
    delivery it refuses waits in the dead letters with the reason."""
    if isinstance(spec, SinkCallback):
        return _named(spec, context)
    if isinstance(spec, CeleryCallback):
        if context.celery_app is None:
            raise misconfigured("celery", "no Celery app in this process to send the callback")
        return CelerySink(
            spec,
            settings=context.settings,
            app=context.celery_app,
            reserved_queues=context.reserved_queues,
        )
    if isinstance(spec, RetiredCallback):
        raise misconfigured(
            spec.kind,
            f"this request's callback was stored by an older version and is no longer "
            f"delivered: {spec.reason}. Its result stays readable by id",
            "callback_retired",
        )
    kind = getattr(spec, "kind", type(spec).__name__)
    raise misconfigured(str(kind), f"unknown callback {kind!r}", "unknown_sink")
