"""The Django integration's functions; ``routing.contrib.django`` re-exports them.

Two halves, one per process:

* the web process calls ``enqueue(row, "field", ...)`` inside its transaction; the request is
  checked at once (a bad lane or body raises there, rolling the transaction back) but
  submitted only by ``transaction.on_commit``, so a rolled-back transaction enqueues nothing;
* the app's Celery worker runs ``store_answer`` (``routing.contrib.django.tasks``), which calls
  ``apply_result``: it records the request id in ``AppliedResult`` and writes the answer into
  the row in the same database transaction, so a second delivery of the same result (mixbatch
  delivers at least once) finds the id and changes nothing.

This module imports no models at import time: Django imports an app's package while it is
still loading the app registry.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

from django.apps import apps
from django.core.exceptions import FieldDoesNotExist, ValidationError
from django.db import IntegrityError, router, transaction
from django.db.models import Model

from routing.client import Client
from routing.contrib.answers import Answer, Target, TargetError
from routing.contrib.common import (
    BOOKKEEPING_FIELDS,
    Deadline,
    IntegrationSettings,
    PendingRequest,
    build_request,
)
from routing.contrib.django.conf import load_settings
from routing.models import Result, Ticket

__all__ = [
    "BOOKKEEPING_FIELDS",
    "PendingRequest",
    "Writer",
    "apply_result",
    "enqueue",
    "enqueue_now",
    "get_client",
    "get_settings",
    "reset",
    "target_for",
    "write_answer",
]

log = logging.getLogger("routing.contrib.django")

#: A function that writes an answer into its (locked) row and saves it.
Writer = Callable[[Any, Answer], None]

_lock = threading.Lock()
_settings: IntegrationSettings | None = None
_client: Client | None = None


def get_settings() -> IntegrationSettings:
    """``settings.MIXBATCH``, checked, read once (``reset`` forgets it)."""
    global _settings
    with _lock:
        if _settings is None:
            _settings = load_settings()
        return _settings


def get_client() -> Client:
    """The process's ``routing.client.Client`` for ``settings.MIXBATCH``, made on first use.

    One is enough: it is thread-safe and its Redis pool survives a fork (redis-py reconnects
    in the child), so a prefork server or Celery worker can share the module-level one.
    """
    global _client
    s = get_settings()
    with _lock:
        if _client is None:
            _client = s.client()
        return _client


def reset(**_: object) -> None:
    """Forget the settings and close the client; connected to ``setting_changed`` so
    ``override_settings(MIXBATCH=...)`` in a test takes effect."""
    global _settings, _client
    with _lock:
        client, _client, _settings = _client, None, None
    if client is not None:
        client.close()


def target_for(instance: Model, field: str, key: str | None = None) -> Target:
    """The target of a saved row's ``field``; its ``custom_id`` goes into the request."""
    opts = instance._meta
    if instance.pk is None:
        raise ValueError(f"{opts.label} is not saved yet: save it before enqueueing for it")
    try:
        opts.get_field(field)
    except FieldDoesNotExist:
        raise ValueError(f"{opts.label} has no field {field!r} to write the answer into") from None
    return Target(opts.label_lower, str(instance.pk), field, key)


def _request(instance: Model, field: str, key: str | None, **fields: Any) -> dict[str, Any]:
    return build_request(get_settings(), target_for(instance, field, key), **fields)


def _record_id(model: type[Model], pk: Any, db: str, ticket: Ticket) -> None:
    """Put the request id on the row (if it has ``mixbatch_request_id``), to look it up later.

    The callback writes the same value when it applies the answer, so it does not matter
    which of the two lands first.
    """
    try:
        model._meta.get_field("mixbatch_request_id")
    except FieldDoesNotExist:
        return
    model._base_manager.using(db).filter(pk=pk).update(mixbatch_request_id=ticket.id)


def _submitted(model: type[Model], pk: Any, db: str, ticket: Ticket) -> None:
    """After a submit: record the id and, for a repeated question, catch up on its answer.

    A repeated custom_id returns the first request. If that one has finished, its answer will
    not be delivered again, and this row may never have had it (the database was recreated
    and the primary key reused, say), so the stored result is applied here, now; where it was
    applied before, ``AppliedResult`` makes that a no-op.
    """
    _record_id(model, pk, db, ticket)
    if ticket.duplicate:
        result = get_client().store.result(ticket.id)
        if result is not None:
            apply_result(result)


def enqueue(
    instance: Model,
    field: str,
    *,
    endpoint: str,
    body: Mapping[str, Any],
    model: str | None = None,
    lane: str | None = None,
    deadline: Deadline | None = None,
    metadata: Mapping[str, str] | None = None,
    max_attempts: int | None = None,
    key: str | None = None,
    task: str | None = None,
    queue: str | None = None,
    using: str | None = None,
) -> PendingRequest:
    """Ask mixbatch for an answer to write into ``instance.<field>``, once the transaction
    of ``using`` (the row's database by default) commits.

    The request is validated now, against the lanes the service published, so a bad lane,
    endpoint or body raises here, inside the transaction, and rolls it back with the row. It
    is submitted by ``transaction.on_commit``: a rolled-back transaction enqueues nothing, and
    outside any ``atomic`` block it is submitted at once. The answer arrives at ``task``
    (default ``settings.MIXBATCH["CALLBACK_TASK"]``) on ``queue``.

    The custom_id names the row, the field and ``key``: by default a digest of the endpoint,
    model and body, so enqueueing the same question for the same row again returns the first
    request (and its answer, if it has one) instead of paying twice, while a changed body is
    a new request. Pass ``key`` (say, a version) to ask the same question again on purpose.

    If the submit itself fails after the commit (Redis down), the error propagates from the
    commit and the row stays committed without a request; calling ``enqueue_now`` for it later
    is safe, since a repeated custom_id returns the first request.
    """
    request = _request(
        instance, field, key, endpoint=endpoint, body=body, model=model, lane=lane,
        deadline=deadline, metadata=metadata, max_attempts=max_attempts, task=task, queue=queue,
    )  # fmt: skip
    get_client().prepare_many([request])
    cls, pk = type(instance), instance.pk
    db = using or instance._state.db or router.db_for_write(cls, instance=instance)
    pending = PendingRequest(custom_id=request["custom_id"])

    def submit() -> None:
        pending.ticket = get_client().submit(request)
        _submitted(cls, pk, db, pending.ticket)

    transaction.on_commit(submit, using=db)
    return pending


def enqueue_now(
    instance: Model,
    field: str,
    *,
    endpoint: str,
    body: Mapping[str, Any],
    model: str | None = None,
    lane: str | None = None,
    deadline: Deadline | None = None,
    metadata: Mapping[str, str] | None = None,
    max_attempts: int | None = None,
    key: str | None = None,
    task: str | None = None,
    queue: str | None = None,
) -> Ticket:
    """Submit at once, whatever transaction is open: for scripts, backfills, and re-sending
    rows whose commit-time submit failed (a repeated custom_id returns the first ticket)."""
    request = _request(
        instance, field, key, endpoint=endpoint, body=body, model=model, lane=lane,
        deadline=deadline, metadata=metadata, max_attempts=max_attempts, task=task, queue=queue,
    )  # fmt: skip
    ticket = get_client().submit(request)
    _submitted(type(instance), instance.pk, instance._state.db or "default", ticket)
    return ticket


def write_answer(row: Any, answer: Answer) -> None:
    """The default writer: the value into the target field, plus the bookkeeping fields.

    On success the answer's value (a vector for embeddings, the text for chat) goes into
    ``answer.target.field``; a text longer than a ``CharField``'s ``max_length`` is cut to
    fit, rather than failing the write forever. Whatever the outcome, ``mixbatch_status``
    (done, failed, expired, cancelled), ``mixbatch_request_id`` and ``mixbatch_error`` are
    set when the model has them. A failed request leaves the target field as it was.
    """
    opts = row._meta
    updates: dict[str, Any] = {}
    if answer.ok:
        updates[answer.target.field] = answer.value
    extra = dict(
        zip(BOOKKEEPING_FIELDS, (answer.status, answer.request_id, answer.error), strict=True)
    )
    for name, value in extra.items():
        try:
            opts.get_field(name)
        except FieldDoesNotExist:
            continue
        updates[name] = value
    for name, value in updates.items():
        f = opts.get_field(name)
        if value is None and not f.null:
            value = ""
        max_length = getattr(f, "max_length", None)
        if isinstance(value, str) and max_length and len(value) > max_length:
            value = value[:max_length]
        setattr(row, f.attname, value)
    if updates:
        row.save(update_fields=list(updates))


def _resolve(target: Target) -> tuple[type[Model], Any]:
    """The model class and the typed primary key a target names, or ``TargetError``."""
    try:
        model = apps.get_model(target.label)
    except (LookupError, ValueError):
        raise TargetError(f"no model {target.label!r} is installed (custom_id names it)") from None
    try:
        model._meta.get_field(target.field)
        pk = model._meta.pk.to_python(target.pk)
    except FieldDoesNotExist:
        raise TargetError(f"{model._meta.label} has no field {target.field!r}") from None
    except ValidationError:
        raise TargetError(f"{target.pk!r} is not a primary key of {model._meta.label}") from None
    return model, pk


def apply_result(result: Result | Mapping[str, Any], *, write: Writer | None = None) -> bool:
    """Write one delivered result into its row, once; True if it was written now.

    False when this request id was applied before (a duplicate delivery: nothing changes) or
    the row has been deleted since. The id goes into ``AppliedResult`` and the row is written
    in one transaction on the row's database, so either both happen or neither does: a crash
    in between leaves the result to be applied by the next delivery, and two concurrent
    deliveries cannot both write (the second one's insert fails on the primary key).

    ``write(row, answer)`` replaces ``write_answer``: it gets the row locked
    (``select_for_update``) and must save what it changes. Raises ``TargetError`` for a
    result whose custom_id names no installed model.
    """
    from routing.contrib.django.models import AppliedResult

    answer = Answer.from_result(result)
    model, pk = _resolve(answer.target)
    db = router.db_for_write(model)
    with transaction.atomic(using=db):
        try:
            with transaction.atomic(using=db):
                AppliedResult.objects.using(db).create(
                    request_id=answer.request_id,
                    custom_id=answer.result.custom_id or "",
                    status=answer.status,
                )
        except IntegrityError:
            log.info("mixbatch result %s was applied before; skipped", answer.request_id)
            return False
        row = model._base_manager.using(db).select_for_update().filter(pk=pk).first()
        if row is None:
            log.info(
                "mixbatch result %s is for %s pk=%s, which no longer exists; skipped",
                answer.request_id,
                model._meta.label,
                answer.target.pk,
            )
            return False
        (write or write_answer)(row, answer)
    return True
