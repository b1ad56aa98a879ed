"""The ready callback task, found by ``app.autodiscover_tasks()`` of the project's Celery app.

mixbatch sends each result to ``mixbatch_django.store_answer`` on the queue named in
``settings.MIXBATCH["CALLBACK_QUEUE"]``; run a worker on that queue:

    celery -A yourproject worker -Q mixbatch_answers

Only the worker imports this module (it needs Celery); the web process never does.
"""

from __future__ import annotations

from typing import Any

from celery import shared_task
from django.db import InterfaceError, OperationalError

from routing.contrib.django.conf import DEFAULT_CALLBACK_TASK
from routing.contrib.django.core import apply_result

__all__ = ["store_answer"]


@shared_task(
    name=DEFAULT_CALLBACK_TASK,
    ignore_result=True,
    # A worker killed mid-task gets the message again; apply_result makes that harmless.
    acks_late=True,
    # A locked or unreachable database passes; retry with backoff, never past a minute
    # (long countdowns on a Redis broker risk redelivery: see docs/architecture.md).
    autoretry_for=(OperationalError, InterfaceError),
    retry_backoff=1,
    retry_backoff_max=60,
    max_retries=20,
)
def store_answer(result: dict[str, Any]) -> bool:
    """Write one mixbatch result into the row its custom_id names; False for a repeat."""
    return apply_result(result)
