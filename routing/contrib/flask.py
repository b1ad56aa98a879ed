"""mixbatch for Flask: an ``init_app`` extension, enqueue after commit, answers written back.

    from routing.contrib.flask import Mixbatch

    metadata = sa.MetaData()
    documents = sa.Table("documents", metadata, ...)
    mixbatch = Mixbatch(metadata=metadata)           # tables answers may be written into

    def create_app():
        app = Flask(__name__)
        app.config["MIXBATCH_REDIS_URL"] = "redis://..."
        app.config["MIXBATCH_CALLBACK_QUEUE"] = "myapp.callbacks"
        mixbatch.init_app(app, engine=sa.create_engine("sqlite:///db.sqlite3"))
        mixbatch.callback_task(celery_app, app=app)  # registers mixbatch_flask.store_answer
        return app

    # a view
    with mixbatch.transaction() as conn:             # engine.begin(), plus submit on commit
        doc_id = conn.execute(documents.insert().values(text=text)).inserted_primary_key[0]
        mixbatch.enqueue(documents, doc_id, "embedding", endpoint="/v1/embeddings",
                         body={"model": "text-embedding-3-small", "input": text})

Flask has no transaction of its own, so ``transaction()`` is the commit point: requests enqueued
inside it are checked at once and submitted only after the block commits; if it raises, the
database rolls back and nothing is enqueued. The app's Celery worker runs the callback task,
which writes each answer into its row once (the request id goes into ``mixbatch_applied`` in the
same database transaction), however often mixbatch delivers it.

Settings (``app.config``), all optional, None or "" meaning the default:

    MIXBATCH_REDIS_URL        the service's Redis; default $MIXBATCH_REDIS_URL
    MIXBATCH_NAMESPACE        the service's MIXBATCH_NAMESPACE, default "mb"
    MIXBATCH_TENANT           default "default"
    MIXBATCH_LANE             default lane of enqueue(), default "standard"
    MIXBATCH_CALLBACK_TASK    default "mixbatch_flask.store_answer"
    MIXBATCH_CALLBACK_QUEUE   the queue the app's worker consumes, default "mixbatch_answers"

``docs/flask.md`` walks through it with a runnable example app.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from flask import Flask, current_app, has_app_context
from sqlalchemy import exc as sa_exc

from routing.client import Client
from routing.contrib.answers import Answer, Target, TargetError
from routing.contrib.common import (
    BOOKKEEPING_FIELDS,
    SETTING_NAMES,
    Deadline,
    IntegrationSettings,
    PendingRequest,
    build_request,
    settings_from,
)
from routing.models import Result, Ticket

__all__ = [
    "APPLIED_TABLE",
    "BOOKKEEPING_FIELDS",
    "DEFAULT_CALLBACK_TASK",
    "Answer",
    "Mixbatch",
    "PendingRequest",
    "Target",
    "TargetError",
    "Writer",
    "applied_table",
    "load_settings",
    "write_answer",
]

log = logging.getLogger("routing.contrib.flask")

DEFAULT_CALLBACK_TASK = "mixbatch_flask.store_answer"
APPLIED_TABLE = "mixbatch_applied"
#: ``write(conn, table, answer)``: write an answer into its row inside the open transaction.
Writer = Callable[[sa.Connection, sa.Table, Answer], None]

#: The callbacks of the innermost open ``Mixbatch.transaction()`` block of this context.
_pending: contextvars.ContextVar[list[Callable[[], None]] | None] = contextvars.ContextVar(
    "mixbatch_pending", default=None
)


def load_settings(config: Mapping[str, Any]) -> IntegrationSettings:
    """The ``MIXBATCH_*`` keys of a Flask config; a wrong type raises, naming the key."""
    values = {name: config.get(f"MIXBATCH_{name}") for name in SETTING_NAMES}
    return settings_from(
        values, default_task=DEFAULT_CALLBACK_TASK, where=lambda k: f"app.config['MIXBATCH_{k}']"
    )


def applied_table(metadata: sa.MetaData) -> sa.Table:
    """``mixbatch_applied``: request ids already written, one row each (see ``apply_result``).

    Added to ``metadata`` (or the one already there returned), so ``metadata.create_all`` or
    an Alembic autogenerate picks it up with the app's own tables.
    """
    existing = metadata.tables.get(APPLIED_TABLE)
    if existing is not None:
        return existing
    return sa.Table(
        APPLIED_TABLE,
        metadata,
        sa.Column("request_id", sa.String(128), primary_key=True),
        sa.Column("custom_id", sa.String(512), nullable=False, default=""),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("applied_at", sa.DateTime(timezone=True), nullable=False, index=True),
    )


def _pk_column(table: sa.Table) -> sa.Column[Any]:
    columns = list(table.primary_key.columns)
    if len(columns) != 1:
        raise TargetError(f"table {table.name!r} needs a one-column primary key to be a target")
    return columns[0]


def _typed_pk(column: sa.Column[Any], pk: str) -> Any:
    """The primary key as the column's Python type (an int for INTEGER), so every database
    compares it as the column does."""
    try:
        python_type = column.type.python_type
    except NotImplementedError:
        return pk
    try:
        return python_type(pk)
    except (TypeError, ValueError):
        raise TargetError(f"{pk!r} is not a primary key of table {column.table.name!r}") from None


def write_answer(conn: sa.Connection, table: sa.Table, answer: Answer) -> None:
    """The default writer: the value into the target column, plus the bookkeeping columns.

    On success the answer's value (a vector for embeddings, the text for chat) goes into the
    target column (a JSON column for vectors); whatever the outcome, ``mixbatch_status``,
    ``mixbatch_request_id`` and ``mixbatch_error`` are set when the table has them. A failed
    request leaves the target column as it was.
    """
    values: dict[str, Any] = {}
    if answer.ok:
        values[answer.target.field] = answer.value
    extra = (answer.status, answer.request_id, answer.error)
    for name, value in zip(BOOKKEEPING_FIELDS, extra, strict=True):
        if name in table.c:
            values[name] = "" if value is None and not table.c[name].nullable else value
    if not values:
        return
    pk = _pk_column(table)
    conn.execute(
        table.update().where(pk == _typed_pk(pk, answer.target.pk)).values(values),
    )


class _AlreadyApplied(Exception):
    """Rolls back the transaction of a delivery whose request id is already recorded."""


@dataclass
class _State:
    """One app's extension state, in ``app.extensions["mixbatch"]``."""

    settings: IntegrationSettings
    engine: sa.Engine | None
    client: Client | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


class Mixbatch:
    """The extension. One instance serves any number of apps (``init_app`` each); every method
    acts for ``current_app``, so call them in a request, a CLI command or an app context.

    ``metadata`` holds the tables answers may be written into (a table it lacks is reflected
    from the database on first use); ``mixbatch_applied`` is added to it.
    """

    def __init__(
        self,
        app: Flask | None = None,
        *,
        engine: sa.Engine | None = None,
        metadata: sa.MetaData | None = None,
    ) -> None:
        self.metadata = metadata if metadata is not None else sa.MetaData()
        self.applied = applied_table(self.metadata)
        self._reflected: dict[tuple[int, str], sa.Table] = {}
        self._ready_engines: set[int] = set()
        self._lock = threading.Lock()
        self._engine = engine
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask, *, engine: sa.Engine | None = None) -> None:
        """Read ``MIXBATCH_*`` from ``app.config`` now, so a bad value fails at start-up.

        ``engine`` (else the one given to the constructor) is the database answers are
        written into; the callback task needs it, and ``transaction()`` uses it by default.
        """
        try:
            settings = load_settings(app.config)
        except TypeError as exc:
            raise RuntimeError(str(exc)) from None
        app.extensions["mixbatch"] = _State(settings=settings, engine=engine or self._engine)

    # -- per-app state ---------------------------------------------------------------------

    def _state(self, app: Flask | None = None) -> _State:
        if app is None:
            if not has_app_context():
                raise RuntimeError(
                    "mixbatch needs an app: call it in a request or `with app.app_context():`"
                )
            app = current_app
        state = app.extensions.get("mixbatch")
        if not isinstance(state, _State):
            raise RuntimeError(f"call mixbatch.init_app(app) for the app {app.name!r} first")
        return state

    @property
    def settings(self) -> IntegrationSettings:
        return self._state().settings

    @property
    def client(self) -> Client:
        """The app's ``routing.client.Client``, made on first use (thread-safe, fork-safe)."""
        state = self._state()
        with state.lock:
            if state.client is None:
                state.client = state.settings.client()
            return state.client

    @property
    def engine(self) -> sa.Engine:
        engine = self._state().engine
        if engine is None:
            raise RuntimeError("no engine: pass one to mixbatch.init_app(app, engine=...)")
        return engine

    # -- producing -------------------------------------------------------------------------

    def submit(self, request: Any = None, /, **fields: Any) -> Ticket:
        """``Client.submit`` for this app, now: no row, no transaction, your own callback."""
        return self.client.submit(request, **fields)

    @contextmanager
    def transaction(
        self, begin: sa.Engine | AbstractContextManager[Any] | None = None
    ) -> Iterator[Any]:
        """A database transaction whose ``enqueue`` calls are submitted after it commits.

        ``begin`` is what opens the transaction: None for the app's engine (``engine.begin()``,
        yielding the connection), another engine, or any context manager that commits on a
        clean exit and rolls back on an exception (``session.begin()``, a ``sqlite3``
        connection). If the block raises, nothing is submitted.
        """
        if begin is None:
            begin = self.engine.begin()
        elif isinstance(begin, sa.Engine):
            begin = begin.begin()
        callbacks: list[Callable[[], None]] = []
        token = _pending.set(callbacks)
        try:
            with begin as conn:
                yield conn
        finally:
            _pending.reset(token)
        for submit in callbacks:  # committed: only now may the requests go out
            submit()

    def enqueue(
        self,
        table: sa.Table | str,
        pk: Any,
        column: str,
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
    ) -> PendingRequest:
        """Ask for an answer to write into ``table.column`` of the row ``pk``, once the open
        ``transaction()`` block commits (at once outside one).

        The request is checked now, against the lanes the service published, so a bad lane,
        endpoint or body raises inside the block and rolls the row back with it. The custom_id
        names the row, the column and ``key``: by default a digest of the endpoint, model and
        body, so the same question for the same row is asked once (a repeat returns the first
        request, and its answer if it has one) and a changed body is a new request. Pass
        ``key`` (say, a version) to ask the same question again on purpose.
        """
        name = table if isinstance(table, str) else table.name
        request = build_request(
            self.settings, Target(name, str(pk), column, key), endpoint=endpoint, body=body,
            model=model, lane=lane, deadline=deadline, metadata=metadata,
            max_attempts=max_attempts, task=task, queue=queue,
        )  # fmt: skip
        client, state = self.client, self._state()
        client.prepare_many([request])
        pending = PendingRequest(custom_id=request["custom_id"])

        def submit() -> None:
            pending.ticket = client.submit(request)
            self._submitted(state, client, name, pk, pending.ticket)

        callbacks = _pending.get()
        if callbacks is None:
            submit()
        else:
            callbacks.append(submit)
        return pending

    def _submitted(self, state: _State, client: Client, name: str, pk: Any, ticket: Ticket) -> None:
        """After a submit: record the id and, for a repeated question, catch up on its answer.

        A repeated custom_id returns the first request. If that one has finished, its answer
        will not be delivered again, and this row may never have had it (the database was
        recreated and the primary key reused, say), so the stored result is applied here;
        where it was applied before, ``mixbatch_applied`` makes that a no-op.
        """
        self._record_id(state, name, pk, ticket)
        if ticket.duplicate and state.engine is not None:
            result = client.store.result(ticket.id)
            if result is not None:
                self.apply_result(result)

    def _record_id(self, state: _State, name: str, pk: Any, ticket: Ticket) -> None:
        """Put the request id on the row when its table has ``mixbatch_request_id``; the
        callback writes the same value, so it does not matter which lands first."""
        if state.engine is None:
            return
        table = self._table(name, state.engine)
        if "mixbatch_request_id" not in table.c:
            return
        column = _pk_column(table)
        with state.engine.begin() as conn:
            conn.execute(
                table.update()
                .where(column == _typed_pk(column, str(pk)))
                .values(mixbatch_request_id=ticket.id)
            )

    # -- writing answers back --------------------------------------------------------------

    def _table(self, name: str, engine: sa.Engine) -> sa.Table:
        table = self.metadata.tables.get(name)
        if table is not None:
            return table
        with self._lock:
            cached = self._reflected.get((id(engine), name))
        if cached is not None:
            return cached
        try:
            table = sa.Table(name, sa.MetaData(), autoload_with=engine)
        except sa_exc.NoSuchTableError:
            raise TargetError(f"no table {name!r} (custom_id names it)") from None
        with self._lock:
            self._reflected[(id(engine), name)] = table
        return table

    def _ensure_applied(self, engine: sa.Engine) -> None:
        """Create ``mixbatch_applied`` if missing, once per engine and process."""
        if id(engine) in self._ready_engines:
            return
        self.applied.create(engine, checkfirst=True)
        with self._lock:
            self._ready_engines.add(id(engine))

    def apply_result(
        self, result: Result | Mapping[str, Any], *, write: Writer | None = None
    ) -> bool:
        """Write one delivered result into its row, once; True if it was written now.

        False when this request id was applied before (a duplicate delivery: nothing changes)
        or the row is gone. The id goes into ``mixbatch_applied`` and the row is written in
        one transaction, so both happen or neither does, and of two concurrent deliveries only
        one can insert the id. ``write(conn, table, answer)`` replaces ``write_answer``.
        Raises ``TargetError`` for a result whose custom_id names no table or column here.
        """
        answer = Answer.from_result(result)
        engine = self.engine
        table = self._table(answer.target.label, engine)
        if answer.target.field not in table.c:
            raise TargetError(f"table {table.name!r} has no column {answer.target.field!r}")
        pk_column = _pk_column(table)
        pk = _typed_pk(pk_column, answer.target.pk)
        self._ensure_applied(engine)
        try:
            with engine.begin() as conn:
                try:
                    conn.execute(
                        self.applied.insert().values(
                            request_id=answer.request_id,
                            custom_id=answer.result.custom_id or "",
                            status=answer.status,
                            applied_at=datetime.fromtimestamp(time.time(), UTC),
                        )
                    )
                except sa_exc.IntegrityError:
                    raise _AlreadyApplied from None
                row = conn.execute(
                    sa.select(pk_column).where(pk_column == pk).with_for_update()
                ).first()
                if row is None:
                    log.info(
                        "mixbatch result %s is for %s pk=%s, which no longer exists; skipped",
                        answer.request_id,
                        table.name,
                        answer.target.pk,
                    )
                    return False
                (write or write_answer)(conn, table, answer)
        except _AlreadyApplied:
            log.info("mixbatch result %s was applied before; skipped", answer.request_id)
            return False
        return True

    def callback_task(
        self, celery_app: Any, *, app: Flask | None = None, name: str | None = None
    ) -> Any:
        """Register the ready callback task on the app's Celery app, and return it.

        Its name is ``name``, else ``MIXBATCH_CALLBACK_TASK`` of ``app``, else
        ``mixbatch_flask.store_answer``. It runs ``apply_result`` in an app context: ``app``'s
        when given, else the one the Celery app's task class provides (Flask's documented
        ``FlaskTask`` pattern). It retries a locked or unreachable database with backoff,
        never waiting more than a minute (long countdowns on a Redis broker risk redelivery).
        """
        if name is None:
            name = load_settings(app.config).callback_task if app else DEFAULT_CALLBACK_TASK
        extension = self

        def store_answer(result: dict[str, Any]) -> bool:
            """Write one mixbatch result into the row its custom_id names; False for a repeat."""
            if app is None or has_app_context():
                return extension.apply_result(result)
            with app.app_context():
                return extension.apply_result(result)

        return celery_app.task(
            name=name,
            ignore_result=True,
            acks_late=True,
            autoretry_for=(sa_exc.OperationalError, sa_exc.InterfaceError),
            retry_backoff=1,
            retry_backoff_max=60,
            max_retries=20,
        )(store_answer)
