"""``sink_for``: the sink a callback spec names, built over what one process shares.

A ``SinkContext`` holds the long-lived parts (the HTTP client, SQL engine pools, Redis clients
and scripts) so a sink object is cheap to build per delivery. One context per process: after a
fork, forget it and build another (the worker runtime does this on ``worker_process_init``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import httpx
import redis
from redis import Redis
from redis.commands.core import Script

from routing.callbacks import (
    SINK_KINDS,
    CallbackSpec,
    CeleryCallback,
    SqlCallback,
    StreamCallback,
    WebhookCallback,
)
from routing.sinks.base import DeliveryError, Sink
from routing.sinks.celery import CelerySink, TaskSender
from routing.sinks.settings import SinkSettings
from routing.sinks.sql import EngineCache, SqlSink
from routing.sinks.stream import StreamSink
from routing.sinks.webhook import Resolver, WebhookSink, new_http_client, resolve_host
from routing.store.scripts import Scripts

__all__ = ["SinkContext", "sink_for"]


class SinkContext:
    """What the sinks of one process share. Thread-safe; clients are opened on first use.

    ``redis`` is the service's own Redis, where a stream sink without ``redis_url`` writes and
    where stream markers live under ``namespace``; ``celery_app`` sends Celery callbacks.
    """

    def __init__(
        self,
        settings: SinkSettings,
        *,
        redis: Redis | None = None,
        namespace: str = "mb",
        celery_app: TaskSender | None = None,
        resolver: Resolver = resolve_host,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.namespace = namespace
        self.celery_app = celery_app
        self.resolver = resolver
        self.clock = clock
        self.engines = EngineCache(connect_timeout_s=settings.sql_connect_timeout_s)
        self._lock = threading.Lock()
        self._http: httpx.Client | None = None
        self._redis_clients: dict[str, Redis] = {}
        self._scripts: dict[int, Script] = {}

    def http(self) -> httpx.Client:
        with self._lock:
            if self._http is None:
                self._http = new_http_client(self.settings.webhook_timeout_s)
            return self._http

    def redis_for(self, url: str | None) -> tuple[Redis, bool]:
        """The client for ``url`` (None: the service's Redis) and whether it is the service's."""
        if url is None:
            if self.redis is None:
                raise DeliveryError(
                    "no redis_url in the callback and no service Redis in this process",
                    sink="stream",
                    retryable=False,
                    code="sink_misconfigured",
                )
            return self.redis, True
        with self._lock:
            client = self._redis_clients.get(url)
            if client is None:
                try:
                    client = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)
                except ValueError as exc:
                    raise DeliveryError(
                        f"bad redis_url ({exc})", sink="stream", retryable=False, code="bad_url"
                    ) from None
                self._redis_clients[url] = client
            return client, False

    def append_script(self, client: Redis) -> Script:
        with self._lock:
            script = self._scripts.get(id(client))
            if script is None:
                script = Scripts(client)["stream_append_once"]
                self._scripts[id(client)] = script
            return script

    def close(self) -> None:
        """Close what this context opened; the service's Redis belongs to its owner."""
        with self._lock:
            http, self._http = self._http, None
            clients = list(self._redis_clients.values())
            self._redis_clients.clear()
            self._scripts.clear()
        if http is not None:
            http.close()
        for client in clients:
            client.close()
        self.engines.close()


def sink_for(spec: CallbackSpec, context: SinkContext) -> Sink:
    """The sink ``spec`` names. Specs are validated at submit, so an unknown kind here means a
    request stored by a newer version: a non-retryable error, kept in the dead letters."""
    settings = context.settings
    if isinstance(spec, WebhookCallback):
        return WebhookSink(
            spec,
            settings=settings,
            client=context.http(),
            resolver=context.resolver,
            clock=context.clock,
        )
    if isinstance(spec, SqlCallback):
        return SqlSink(spec, settings=settings, engines=context.engines, clock=context.clock)
    if isinstance(spec, StreamCallback):
        client, own = context.redis_for(spec.redis_url)
        return StreamSink(
            spec,
            settings=settings,
            client=client,
            script=context.append_script(client),
            namespace=context.namespace,
            own_redis=own,
        )
    if isinstance(spec, CeleryCallback):
        if context.celery_app is None:
            raise DeliveryError(
                "no Celery app in this process to send the callback with",
                sink="celery",
                retryable=False,
                code="sink_misconfigured",
            )
        return CelerySink(spec, settings=settings, app=context.celery_app)
    kind = getattr(spec, "kind", type(spec).__name__)
    raise DeliveryError(
        f"unknown sink {kind!r} (known sinks: {', '.join(SINK_KINDS)})",
        sink=str(kind),
        retryable=False,
        code="unknown_sink",
    )
