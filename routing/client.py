"""What producers import: enqueue requests, ask about them, wait for answers.

It imports neither ``config`` nor ``tasks`` (many Django projects have packages of those names)
and pulls in no Celery worker code or torch: only redis-py and pydantic. The lanes table comes
from Redis, where the service publishes it, so a producer needs no copy of the service's files.

    from routing.client import Client

    mb = Client("redis://localhost:6379/0")
    ticket = mb.submit(
        endpoint="/v1/chat/completions",
        body={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}]},
        lane="standard",
        custom_id="doc-42",
    )
    answer = mb.result(ticket.id, timeout=3600)
    print(answer.status, answer.body)

``AsyncClient`` (``routing.async_client``) is the same surface for asyncio code, awaited.
"""

from __future__ import annotations

import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from routing.callbacks import CeleryCallback
from routing.errors import (
    BodyTooLarge,
    ConfigError,
    DeadlineInPast,
    InvalidRequest,
    LaneFull,
    MalformedInput,
    MixbatchError,
    NotFound,
    ResultTimeout,
    StoreUnavailable,
    UnknownEndpoint,
    UnknownLane,
)
from routing.models import (
    Endpoint,
    Prepared,
    Request,
    Result,
    Route,
    ServiceConfig,
    StatusInfo,
    Ticket,
    coerce_request,
    prepare,
)
from routing.states import State
from routing.store.base import redact_url
from routing.store.lanes import LaneStore

if TYPE_CHECKING:
    from routing.async_client import AsyncClient

__all__ = [
    "AsyncClient",
    "BodyTooLarge",
    "CeleryCallback",
    "Client",
    "ConfigError",
    "DeadlineInPast",
    "Endpoint",
    "InvalidRequest",
    "LaneFull",
    "MalformedInput",
    "MixbatchError",
    "NotFound",
    "Request",
    "Result",
    "ResultTimeout",
    "Route",
    "State",
    "StatusInfo",
    "StoreUnavailable",
    "Ticket",
    "UnknownEndpoint",
    "UnknownLane",
]

_CONFIG_TTL_S = 30.0


def __getattr__(name: str) -> Any:
    """``AsyncClient``, imported on first use: it builds on this module."""
    if name == "AsyncClient":
        from routing.async_client import AsyncClient

        return AsyncClient
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def default_redis_url() -> str:
    """``MIXBATCH_REDIS_URL``, else the embedded Redis that ``mixbatch up`` started here."""
    url = os.environ.get("MIXBATCH_REDIS_URL")
    if url:
        return url
    from routing.store.embedded import running_url

    data_dir = os.environ.get("MIXBATCH_DATA_DIR", ".mixbatch")
    running = running_url(data_dir)
    if running:
        return running
    raise ConfigError(
        "MIXBATCH_REDIS_URL is unset and no embedded Redis is running under "
        f"{data_dir!r}: start the service with `mixbatch up`, or set MIXBATCH_REDIS_URL"
    )


def no_lanes_table(url: str, namespace: str, client: str) -> ConfigError:
    """The error of a client that finds no lanes table: the service never ran there."""
    return ConfigError(
        f"no lanes table in Redis at {redact_url(url)} under namespace {namespace!r}: start "
        "the service (`mixbatch up`) once, check MIXBATCH_NAMESPACE matches it, or pass "
        f"`config=` to {client}"
    )


def as_request(item: Request | dict[str, Any], tenant: str) -> Request:
    """``item`` as a ``Request``, in the client's ``tenant`` unless it names its own."""
    if isinstance(item, dict) and "tenant" not in item:
        item = {**item, "tenant": tenant}
    req = coerce_request(item)
    if "tenant" not in req.model_fields_set:
        req = req.model_copy(update={"tenant": tenant})
    return req


def prepare_items(
    items: Iterable[Request | dict[str, Any]], config: ServiceConfig, tenant: str, now: float
) -> list[Prepared]:
    """Validate every item before any is written; the first bad one raises, naming its index.

    Shared by ``Client`` and ``AsyncClient``: both accept exactly the same requests.
    """
    out: list[Prepared] = []
    for i, item in enumerate(items):
        try:
            out.append(prepare(as_request(item, tenant), config, now))
        except InvalidRequest as exc:
            raise type(exc)(str(exc), field=f"items[{i}]") from None
    return out


class Producer(ABC):
    """What ``Client`` and ``AsyncClient`` are built from: where the service's Redis is, the
    namespace, the tenant requests are submitted as, and a lanes table given instead of the
    published one. Each opens its own kind of connection in ``_connect`` (no round trip yet)."""

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        namespace: str | None = None,
        tenant: str = "default",
        config: ServiceConfig | None = None,
    ) -> None:
        self.redis_url = redis_url or default_redis_url()
        self.namespace = namespace or os.environ.get("MIXBATCH_NAMESPACE", "mb")
        self.tenant = tenant
        self._fixed_config = config
        self._connect()

    @abstractmethod
    def _connect(self) -> None:
        """Open this client's Redis handle (sync or asyncio)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({redact_url(self.redis_url)!r}, tenant={self.tenant!r})"


class Client(Producer):
    """A producer's handle on mixbatch. Thread-safe; one per process is plenty."""

    def _connect(self) -> None:
        self.store = LaneStore.from_url(self.redis_url, namespace=self.namespace)
        self._config: ServiceConfig | None = None
        self._config_at = 0.0
        self._lock = threading.Lock()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.store.close()

    @property
    def config(self) -> ServiceConfig:
        """The lanes table and limits the service published, re-read every 30 s."""
        if self._fixed_config is not None:
            return self._fixed_config
        with self._lock:
            if self._config is None or time.monotonic() - self._config_at > _CONFIG_TTL_S:
                loaded = self.store.load_config()
                if loaded is None:
                    raise no_lanes_table(self.redis_url, self.store.keys.ns, "Client")
                self._config, self._config_at = loaded, time.monotonic()
            return self._config

    def _request(self, item: Request | dict[str, Any]) -> Request:
        return as_request(item, self.tenant)

    def submit(self, request: Request | dict[str, Any] | None = None, /, **fields: Any) -> Ticket:
        """Enqueue one request; durable once this returns. Fields as in ``Request``.

        Submitting a custom_id the tenant already used returns the first request's ticket
        (``ticket.duplicate`` is True) instead of doing the work twice.
        """
        if request is None:
            request = fields
        elif fields:
            raise TypeError("pass a Request (or dict) or keyword fields, not both")
        prepared = prepare(self._request(request), self.config, time.time())
        return self.store.submit_one(prepared, self.config)

    def submit_many(
        self,
        items: Iterable[Request | dict[str, Any]],
        *,
        chunk_size: int = 1000,
        on_progress: Callable[[int], None] | None = None,
    ) -> list[Ticket]:
        """Enqueue many, pipelined: a few round trips per ``chunk_size`` requests.

        Every item is validated before any is written, so a bad one raises ``InvalidRequest``
        (``items[i]`` in its message) and nothing is enqueued. ``on_progress`` gets the count
        written after each chunk.
        """
        prepared = self.prepare_many(items)
        tickets: list[Ticket] = []
        config = self.config
        for start in range(0, len(prepared), chunk_size):
            chunk = prepared[start : start + chunk_size]
            try:
                tickets.extend(self.store.submit_many(chunk, config))
            except LaneFull as exc:
                exc.accepted = tickets + exc.accepted
                later = range(start + len(chunk), len(prepared))
                exc.rejected = [start + i for i in exc.rejected] + list(later)
                raise
            if on_progress is not None:
                on_progress(len(chunk))
        return tickets

    def prepare_many(self, items: Iterable[Request | dict[str, Any]]) -> list[Prepared]:
        """Validate without writing; raises on the first bad item, naming its index."""
        return prepare_items(items, self.config, self.tenant, time.time())

    def status(self, request_id: str) -> StatusInfo:
        return self.store.status(request_id)

    def result(self, request_id: str, timeout: float | None = None) -> Result:
        """The answer, waiting for it if needed (BLPOP, not polling); ``timeout`` in seconds.

        Raises ``ResultTimeout`` if it is still in flight when the timeout runs out.
        """
        return self.store.wait(request_id, timeout)

    def cancel(self, request_id: str) -> State:
        """Cancel if not finished yet; returns the state the request ends up in."""
        return self.store.cancel(request_id)
