"""Celery sink: send the result to a task of the caller's, by name, on the caller's queue.

The natural fit for Django and Flask apps that already run Celery: their own worker writes the
answer into their own database. The task gets one argument, the result as a JSON object, and
the header ``mixbatch_request_id``; it should apply each request id once (an upsert, or
``get_or_create``), because delivery is at-least-once.

The Celery app is passed in (anything with ``send_task``), so ``routing`` imports no Celery.
A task or queue in mixbatch's or Celery's own namespace is refused at submit
(``routing.callbacks``) and again here, with the service's own queues (``reserved_queues``),
so a result is never handed to one of the service's own tasks or workers.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from typing import Any, Protocol

from routing.callbacks import CeleryCallback, reserved_celery_name
from routing.models import Result
from routing.sinks.base import DeliveryError, Sink
from routing.sinks.settings import SinkSettings

__all__ = ["CelerySink", "TaskSender"]


class TaskSender(Protocol):
    """The part of ``celery.Celery`` this sink uses."""

    def send_task(self, name: str, args: Any = ..., **options: Any) -> Any: ...


class CelerySink(Sink):
    kind = "celery"

    def __init__(
        self,
        spec: CeleryCallback,
        *,
        settings: SinkSettings,
        app: TaskSender,
        reserved_queues: Collection[str] = (),
    ) -> None:
        super().__init__(max_payload_bytes=settings.payload_limit(self.kind))
        self.spec = spec
        self.app = app
        self.reserved_queues = reserved_queues

    def _refusal(self) -> str | None:
        for what, name in (("task", self.spec.task), ("queue", self.spec.queue)):
            if name is None:
                continue
            reserved = reserved_celery_name(name)
            if reserved is None and what == "queue" and name in self.reserved_queues:
                reserved = "the service's own queues"
            if reserved is not None:
                return f"{what} {name!r} is in {reserved}; name a {what} of your own app"
        return None

    def write(self, result: Result, payload: bytes) -> None:
        refused = self._refusal()
        if refused is not None:
            raise DeliveryError(refused, sink=self.kind, retryable=False, code="reserved_name")
        try:
            self.app.send_task(
                self.spec.task,
                args=[json.loads(payload)],
                queue=self.spec.queue,
                headers={"mixbatch_request_id": result.id},
                argsrepr=f"id={result.id} status={result.status.value}",
            )
        except Exception as exc:  # kombu raises many types; a broker hiccup passes
            raise DeliveryError(
                f"cannot send task {self.spec.task!r}: {type(exc).__name__}: {exc}",
                sink=self.kind,
                retryable=True,
                code="broker_unavailable",
            ) from None
