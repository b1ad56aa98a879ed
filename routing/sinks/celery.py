"""Celery sink: send the result to a task of the caller's, by name, on the caller's queue.

The natural fit for Django and Flask apps that already run Celery: their own worker writes the
answer into their own database. The task gets one argument, the result as a JSON object, and
the header ``mixbatch_request_id``; it should apply each request id once (an upsert, or
``get_or_create``), because delivery is at-least-once.

The Celery app is passed in (anything with ``send_task``), so ``routing`` imports no Celery.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

from routing.callbacks import CeleryCallback
from routing.models import Result
from routing.sinks.base import DeliveryError, Sink
from routing.sinks.settings import SinkSettings

__all__ = ["CelerySink", "TaskSender"]


class TaskSender(Protocol):
    """The part of ``celery.Celery`` this sink uses."""

    def send_task(self, name: str, args: Any = ..., **options: Any) -> Any: ...


class CelerySink(Sink):
    kind = "celery"

    def __init__(self, spec: CeleryCallback, *, settings: SinkSettings, app: TaskSender) -> None:
        super().__init__(max_payload_bytes=settings.payload_limit(self.kind))
        self.spec = spec
        self.app = app

    def write(self, result: Result, payload: bytes) -> None:
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
