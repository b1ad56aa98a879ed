"""What the Django and Flask integrations share besides answers: settings and requests.

Both read the same six settings (Django from ``settings.MIXBATCH["REDIS_URL"]``, Flask from
``app.config["MIXBATCH_REDIS_URL"]``), build requests the same way and hand back the same
``PendingRequest``, so the two pages of documentation describe one behaviour.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from routing.callbacks import reserved_celery_name
from routing.client import Client
from routing.contrib.answers import Target
from routing.models import Ticket
from routing.store.connect import parse_redis_url

__all__ = [
    "BOOKKEEPING_FIELDS",
    "DEFAULT_CALLBACK_QUEUE",
    "ENQUEUE_MANY_TASK",
    "ENQUEUE_QUEUE",
    "ENQUEUE_TASK",
    "SETTING_NAMES",
    "IntegrationSettings",
    "PendingRequest",
    "build_request",
    "celery_broker",
    "enqueue_many_entry",
    "enqueue_many_options",
    "enqueue_options",
    "request_digest",
    "request_summary",
    "send_enqueue",
    "send_enqueue_many",
    "settings_from",
]

DEFAULT_CALLBACK_QUEUE = "mixbatch_answers"
#: The settings, by their Django key (Flask prefixes each with ``MIXBATCH_``).
SETTING_NAMES = ("REDIS_URL", "NAMESPACE", "TENANT", "LANE", "CALLBACK_TASK", "CALLBACK_QUEUE")
#: Optional fields (Django) or columns (Flask) the default writers fill when a row has them:
#: the outcome (done, failed, expired, cancelled), the request id, and a failure's message.
BOOKKEEPING_FIELDS = ("mixbatch_status", "mixbatch_request_id", "mixbatch_error")

Deadline = datetime | float | str | timedelta


@dataclass(frozen=True)
class IntegrationSettings:
    """Resolved settings. ``redis_url`` None means the client's own default
    (``MIXBATCH_REDIS_URL``, else the embedded Redis ``mixbatch up`` started in this directory).
    """

    redis_url: str | None
    namespace: str
    tenant: str
    lane: str
    callback_task: str
    callback_queue: str

    def callback(self, task: str | None = None, queue: str | None = None) -> dict[str, str]:
        """The request's callback: the ready task, or ``task``, on the app's callback queue."""
        return {
            "kind": "celery",
            "task": task or self.callback_task,
            "queue": queue or self.callback_queue,
        }

    def client(self) -> Client:
        return Client(self.redis_url, namespace=self.namespace, tenant=self.tenant)


def celery_broker(redis_url: str | None) -> tuple[str, dict[str, Any]]:
    """The app's Celery broker and transport options: the broker the service sends results on.

    ``MIXBATCH_BROKER_URL`` when set (``MIXBATCH_BROKER_MASTER_NAME`` for a ``sentinel://``
    one), else the store's own Redis: one node as is, a Sentinel store as Celery's
    ``sentinel://`` list with its service. Celery cannot speak Cluster, so a cluster store
    without a broker of its own is refused here, naming the variable, as the service does.
    """
    broker = os.environ.get("MIXBATCH_BROKER_URL") or None
    master = os.environ.get("MIXBATCH_BROKER_MASTER_NAME") or None
    url = redis_url or os.environ.get("MIXBATCH_REDIS_URL") or ""
    target = parse_redis_url(url) if url else None
    if broker is None and target is not None and target.kind == "cluster":
        raise ValueError(
            "MIXBATCH_BROKER_URL is unset and MIXBATCH_REDIS_URL is a Redis Cluster, which "
            "Celery cannot use: set MIXBATCH_BROKER_URL to the service's broker"
        )
    if broker is None and target is not None and target.kind == "sentinel":
        auth = f"{target.username or ''}:{target.password}@" if target.password else ""
        broker = ";".join(f"sentinel://{auth}{h}:{p}/{target.db}" for h, p in target.nodes)
        master = master or target.service
    broker = broker or url
    options = {"master_name": master} if broker.startswith("sentinel://") and master else {}
    return broker, options


def settings_from(
    values: Mapping[str, Any], *, default_task: str, where: Callable[[str], str]
) -> IntegrationSettings:
    """Settings from ``values`` keyed by ``SETTING_NAMES``; None or "" means the default.

    ``REDIS_URL`` and ``NAMESPACE`` default to the variables the service itself reads, so one
    environment configures both sides. ``where(name)`` spells a key for error messages.
    """

    def get(name: str, default: str | None) -> str | None:
        value = values.get(name)
        if value is None or value == "":
            return default
        if not isinstance(value, str):
            raise TypeError(f"{where(name)} must be a string, not {value!r}")
        reserved = reserved_celery_name(value) if name.startswith("CALLBACK_") else None
        if reserved is not None:
            # The service refuses to send a result into its own or Celery's namespace.
            ready = default_task if name == "CALLBACK_TASK" else DEFAULT_CALLBACK_QUEUE
            raise TypeError(
                f"{where(name)}: {value!r} is in {reserved}, where the service sends nothing; "
                f"name your app's own (the default is {ready!r})"
            )
        return value

    return IntegrationSettings(
        redis_url=get("REDIS_URL", os.environ.get("MIXBATCH_REDIS_URL") or None),
        namespace=get("NAMESPACE", os.environ.get("MIXBATCH_NAMESPACE") or None) or "mb",
        tenant=get("TENANT", None) or "default",
        lane=get("LANE", None) or "standard",
        callback_task=get("CALLBACK_TASK", None) or default_task,
        callback_queue=get("CALLBACK_QUEUE", None) or DEFAULT_CALLBACK_QUEUE,
    )


@dataclass
class PendingRequest:
    """What ``enqueue`` returns: the request's custom_id now, its ticket once committed.

    ``ticket`` stays None until the transaction commits, and for good if it rolls back.
    """

    custom_id: str
    ticket: Ticket | None = None

    @property
    def submitted(self) -> bool:
        return self.ticket is not None

    @property
    def id(self) -> str | None:
        """mixbatch's request id, once submitted."""
        return self.ticket.id if self.ticket else None


def request_digest(endpoint: str, model: str | None, body: Mapping[str, Any]) -> str:
    """16 hex digits of SHA-256 over what is asked: the default ``key`` of a target.

    With it in the custom_id, asking again for the same row with the same body is the same
    request (a retried web request costs nothing twice), while a changed body (the row's text
    was edited) is a new one, and so is a row that reuses a primary key after the database
    was recreated, unless it also asks exactly the same thing.
    """
    canonical = json.dumps(
        [endpoint, model, body], sort_keys=True, separators=(",", ":"), default=str
    )
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def build_request(
    settings: IntegrationSettings,
    target: Target,
    *,
    endpoint: str,
    body: Mapping[str, Any],
    model: str | None = None,
    lane: str | None = None,
    deadline: Deadline | None = None,
    metadata: Mapping[str, str] | None = None,
    max_attempts: int | None = None,
    task: str | None = None,
    queue: str | None = None,
) -> dict[str, Any]:
    """The request dict ``Client.submit`` takes, naming ``target`` in its custom_id; a target
    without a ``key`` gets ``request_digest`` of the endpoint, model and body."""
    if target.key is None:
        target = replace(target, key=request_digest(endpoint, model, body))
    request: dict[str, Any] = {
        "custom_id": target.custom_id,
        "endpoint": endpoint,
        "body": dict(body),
        "lane": lane or settings.lane,
        "callback": settings.callback(task, queue),
        "metadata": dict(metadata or {}),
    }
    optional = {"model": model, "deadline": deadline, "max_attempts": max_attempts}
    request.update({k: v for k, v in optional.items() if v is not None})
    return request


#: The task a producer with only a Celery app sends requests to, and the queue it listens on.
ENQUEUE_TASK = "mixbatch.enqueue"
ENQUEUE_QUEUE = "mixbatch.control"
#: Fields that say which request it is, never what it asks (no body, metadata or callback).
SUMMARY_FIELDS = ("lane", "tenant", "custom_id", "endpoint", "model")
_SUMMARY_VALUE = re.compile(r"^[A-Za-z0-9_.:/@+-]{1,200}$")


def request_summary(request: Mapping[str, Any]) -> str:
    """``lane=... custom_id=...``: what a log line, the broker's headers and Flower may show of
    a request. A value outside a plain character set is left out, since it is not validated yet
    (the request is checked when the task runs)."""
    parts = [
        f"{name}={value}"
        for name in SUMMARY_FIELDS
        if isinstance(value := request.get(name), str) and _SUMMARY_VALUE.match(value)
    ]
    return " ".join(parts) if parts else "request=hidden"


def enqueue_options(request: Mapping[str, Any], *, queue: str = ENQUEUE_QUEUE) -> dict[str, Any]:
    """``send_task`` keyword arguments that enqueue ``request`` through ``mixbatch.enqueue``.

    Celery's default ``argsrepr`` is the ``repr`` of the arguments: the request's whole body, in
    the message's headers, in the ``task-sent`` event Flower shows and in the worker's log. The
    summary goes there instead; the body travels only as the argument itself.
    """
    return {
        "args": [dict(request)],
        "queue": queue,
        "argsrepr": request_summary(request),
        "kwargsrepr": "{}",
    }


def send_enqueue(celery_app: Any, request: Mapping[str, Any], **options: Any) -> Any:
    """``celery_app.send_task("mixbatch.enqueue", ...)`` with the request's summary as argsrepr;
    ``options`` (``queue``, ``priority``, ...) are passed on. Returns Celery's ``AsyncResult``."""
    sent = {**enqueue_options(request), **options}
    return celery_app.send_task(ENQUEUE_TASK, **sent)


ENQUEUE_MANY_TASK = "mixbatch.enqueue_many"


def enqueue_many_options(
    requests: Sequence[Mapping[str, Any]], *, queue: str = ENQUEUE_QUEUE
) -> dict[str, Any]:
    """``send_task`` keyword arguments for ``mixbatch.enqueue_many``: the list as the argument,
    a count as its argsrepr (never the bodies)."""
    return {
        "args": [[dict(r) for r in requests]],
        "queue": queue,
        "argsrepr": f"requests={len(requests)}",
        "kwargsrepr": "{}",
    }


def send_enqueue_many(
    celery_app: Any, requests: Sequence[Mapping[str, Any]], **options: Any
) -> Any:
    """``celery_app.send_task("mixbatch.enqueue_many", ...)``: what an app's periodic task calls
    once it has built the night's requests. ``options`` are passed on."""
    return celery_app.send_task(ENQUEUE_MANY_TASK, **{**enqueue_many_options(requests), **options})


def enqueue_many_entry(
    requests: Sequence[Mapping[str, Any]], schedule: Any, *, queue: str = ENQUEUE_QUEUE
) -> dict[str, Any]:
    """A ``beat_schedule`` entry that sends ``requests`` to ``mixbatch.enqueue_many`` on
    ``schedule`` (seconds, a ``timedelta`` or a ``crontab``), from the app's own beat. The list
    is fixed when the schedule is read; a job that builds its requests at run time schedules
    its own task that calls ``send_enqueue_many``."""
    opts = enqueue_many_options(requests, queue=queue)
    return {
        "task": ENQUEUE_MANY_TASK,
        "schedule": schedule,
        "args": opts["args"],
        "options": {k: opts[k] for k in ("queue", "argsrepr", "kwargsrepr")},
    }
