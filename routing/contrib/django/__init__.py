"""mixbatch for Django: enqueue on commit, get the answer written into your own model.

    # settings.py
    INSTALLED_APPS = [..., "routing.contrib.django"]
    MIXBATCH = {"REDIS_URL": "redis://...", "CALLBACK_QUEUE": "myapp.callbacks"}

    # a view
    from routing.contrib.django import enqueue

    with transaction.atomic():
        doc = Document.objects.create(text=text)
        enqueue(doc, "embedding", endpoint="/v1/embeddings",
                body={"model": "text-embedding-3-small", "input": text})

    # the project's Celery app: app.autodiscover_tasks() finds mixbatch_django.store_answer
    celery -A myproject worker -Q myapp.callbacks

The request is submitted only when the transaction commits; the project's worker writes the
answer (the vector, or the reply's text) into ``doc.embedding`` once, however often it is
delivered, and fills ``mixbatch_status``, ``mixbatch_request_id`` and ``mixbatch_error`` if
the model has them. ``docs/django.md`` walks through it with a runnable example project.
"""

from __future__ import annotations

from routing.contrib.answers import Answer, Target, TargetError
from routing.contrib.django.conf import DEFAULT_CALLBACK_QUEUE, DEFAULT_CALLBACK_TASK
from routing.contrib.django.core import (
    BOOKKEEPING_FIELDS,
    PendingRequest,
    Writer,
    apply_result,
    enqueue,
    enqueue_now,
    get_client,
    get_settings,
    target_for,
    write_answer,
)

__all__ = [
    "BOOKKEEPING_FIELDS",
    "DEFAULT_CALLBACK_QUEUE",
    "DEFAULT_CALLBACK_TASK",
    "Answer",
    "PendingRequest",
    "Target",
    "TargetError",
    "Writer",
    "apply_result",
    "enqueue",
    "enqueue_now",
    "get_client",
    "get_settings",
    "target_for",
    "write_answer",
]
