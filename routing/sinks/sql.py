"""SQL sink: upsert each result, keyed by request id, into a table of a named sink's database.

The sink is registered in the service's table (``[sinks.NAME]`` with ``kind = "sql"``,
``url_env`` naming the variable that holds the SQLAlchemy URL, and ``table``); the URL, and the
password in it, never travel with a request. PostgreSQL hosts are checked by the address guard
at each delivery and the connection goes to the checked address (libpq's ``hostaddr``); a SQLite
file must lie under a directory of ``MIXBATCH_SINK_ALLOW_PATHS``.

Works on SQLite and PostgreSQL (``INSERT ... ON CONFLICT (request_id) DO UPDATE``), through
SQLAlchemy Core. The table is created if missing; an existing table must have these columns
(more are fine):

    column        type                          meaning
    ------------  ----------------------------  ---------------------------------------------
    request_id    VARCHAR(128) PRIMARY KEY      mixbatch's id (``standard.01J...``)
    custom_id     VARCHAR(512) NULL             the producer's own id
    tenant        VARCHAR(128) NOT NULL
    lane          VARCHAR(32)  NOT NULL
    status        VARCHAR(16)  NOT NULL         done, failed, expired or cancelled
    status_code   INTEGER      NULL             the provider's HTTP status
    response      JSON NULL (JSONB on Postgres) the provider-shaped answer body
    error         JSON NULL                     {code, message, retryable, status_code}
    usage         JSON NULL                     token counts as the provider reported them
    cost_usd      FLOAT NULL                    when known
    route         VARCHAR(16)  NULL             realtime, batch or gpu
    provider      VARCHAR(64)  NULL
    model         VARCHAR(256) NULL
    created_at    TIMESTAMP WITH TIME ZONE      when the request was submitted (UTC)
    finished_at   TIMESTAMP WITH TIME ZONE NULL when its outcome was known
    delivered_at  TIMESTAMP WITH TIME ZONE      when this row was last written

Delivery is at-least-once; the upsert makes it apply once: a second delivery of a request id
rewrites its row with the same result (and a newer ``delivered_at``), never adds a row.

Connection failures are retryable (the result stays stored and is tried again later); a table
whose columns do not fit, or a missing database driver, is not, and goes to the dead letters.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from pydantic import SecretStr
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine

from routing.errors import ConfigError
from routing.models import Result
from routing.sinks.base import AddressRefused, DeliveryError, Sink
from routing.sinks.guard import AddressPolicy, Resolver, path_refusal, resolve_host, sql_endpoint
from routing.sinks.idle import IDLE_S, MAX_ENTRIES, IdleCache
from routing.sinks.settings import SinkSettings
from routing.sinks.table import SqlTarget
from routing.store.base import redact_url

__all__ = ["EngineCache", "SqlSink", "result_row", "results_table"]

_JSON = sa.JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True), "postgresql")


def results_table(name: str, metadata: sa.MetaData | None = None) -> sa.Table:
    """The table as documented above; ``name`` is a plain identifier (checked at load)."""
    return sa.Table(
        name,
        metadata or sa.MetaData(),
        sa.Column("request_id", sa.String(128), primary_key=True),
        sa.Column("custom_id", sa.String(512), nullable=True),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("lane", sa.String(32), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("status_code", sa.Integer, nullable=True),
        sa.Column("response", _JSON, nullable=True),
        sa.Column("error", _JSON, nullable=True),
        sa.Column("usage", _JSON, nullable=True),
        sa.Column("cost_usd", sa.Float, nullable=True),
        sa.Column("route", sa.String(16), nullable=True),
        sa.Column("provider", sa.String(64), nullable=True),
        sa.Column("model", sa.String(256), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=False),
    )


def _when(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC)


def result_row(result: Result, delivered_at: float) -> dict[str, Any]:
    """One row of the table from a result; pure, so the mapping is tested without a database."""
    cost = getattr(result, "cost_usd", None)
    if cost is None and result.usage:
        cost = result.usage.get("cost_usd")
    return {
        "request_id": result.id,
        "custom_id": result.custom_id,
        "tenant": result.tenant,
        "lane": result.lane,
        "status": result.status.value,
        "status_code": result.status_code,
        "response": result.body,
        "error": result.error.model_dump(mode="json") if result.error else None,
        "usage": result.usage,
        "cost_usd": float(cost) if isinstance(cost, int | float) else None,
        "route": result.route.value if result.route else None,
        "provider": result.provider,
        "model": result.model,
        "created_at": _when(result.created_at),
        "finished_at": _when(result.finished_at),
        "delivered_at": _when(delivered_at),
    }


def _redact(url: str) -> str:
    """The URL for messages: SQLAlchemy's own rendering hides ``:password@`` but not
    ``?password=`` (libpq takes either), so the store's redaction is used."""
    return redact_url(url)


class EngineCache:
    """One engine per URL (and checked address) per process, each table checked once; pools
    are reused, and an engine unused for ``idle_s`` (or past ``max_entries``) is disposed the
    next time the cache is touched (``routing.sinks.idle``), with its tables' checks.

    Not shared across ``fork``: drop it in the child (``close``) and a new one fills lazily.
    """

    def __init__(
        self,
        *,
        connect_timeout_s: float = 5.0,
        idle_s: float = IDLE_S,
        max_entries: int = MAX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.connect_timeout_s = connect_timeout_s
        self._lock = threading.Lock()
        self._engines: IdleCache[tuple[str, str | None], Engine] = IdleCache(
            self._dispose, idle_s=idle_s, max_entries=max_entries, clock=clock
        )
        self._tables: dict[tuple[str, str], sa.Table] = {}

    def engine(self, url: str, hostaddr: str | None = None) -> Engine:
        """The engine for ``url``; ``hostaddr``: connect there, not where the host resolves."""
        return self._engines.get((url, hostaddr), lambda: self._create(url, hostaddr))

    def held(self) -> list[tuple[str, str | None]]:
        """The (url, hostaddr) of every engine held now."""
        return self._engines.keys()

    def _dispose(self, key: tuple[str, str | None], engine: Engine) -> None:
        """Close an idle engine's pooled connections (checked-out ones stay with their holder)
        and forget the tables checked through its URL, so none outlives every engine of it."""
        url = key[0]
        if not any(held == url for held, _ in self.held()):
            with self._lock:
                for table_key in [k for k in self._tables if k[0] == url]:
                    del self._tables[table_key]
        engine.dispose()

    def _create(self, url: str, hostaddr: str | None) -> Engine:
        shown = _redact(url)
        try:
            parsed = sa.make_url(url)
            backend = parsed.get_backend_name()
            connect_args: dict[str, Any] = {}
            if backend == "postgresql":
                connect_args["connect_timeout"] = max(1, round(self.connect_timeout_s))
                if hostaddr is not None:
                    connect_args["hostaddr"] = hostaddr
            elif backend == "sqlite":
                connect_args["timeout"] = self.connect_timeout_s
            return sa.create_engine(parsed, pool_pre_ping=True, connect_args=connect_args)
        except (ImportError, sa_exc.NoSuchModuleError) as exc:
            raise DeliveryError(
                f"no database driver for {shown} ({exc}); install one in the worker's "
                "environment (PostgreSQL: psycopg), then replay",
                sink="sql",
                retryable=False,
                code="sql_driver_missing",
            ) from None
        except sa_exc.ArgumentError as exc:
            raise DeliveryError(
                f"bad SQLAlchemy URL {shown} ({exc})",
                sink="sql",
                retryable=False,
                code="bad_url",
            ) from None

    def table(self, url: str, name: str, conn: sa.Connection) -> sa.Table:
        """The table, created if missing, its columns checked the first time it is used."""
        key = (url, name)
        with self._lock:
            known = self._tables.get(key)
        if known is not None:
            return known
        table = results_table(name)
        try:
            table.create(conn, checkfirst=True)
            conn.commit()
        except (sa_exc.IntegrityError, sa_exc.ProgrammingError):
            # Another worker created it between our check and our CREATE: theirs will do.
            conn.rollback()
            if not sa.inspect(conn).has_table(name):
                raise
        have = {c["name"] for c in sa.inspect(conn).get_columns(name)}
        missing = [c.name for c in table.columns if c.name not in have]
        if missing:
            raise DeliveryError(
                f"table {name!r} exists without the columns {', '.join(missing)} "
                "(see routing.sinks.sql for the schema, or name another table)",
                sink="sql",
                retryable=False,
                code="sql_schema",
            )
        with self._lock:
            self._tables[key] = table
        return table

    def close(self) -> None:
        self._engines.close()
        with self._lock:
            self._tables.clear()


def _upsert(dialect: str, table: sa.Table, row: dict[str, Any]) -> sa.Executable:
    insert: Any
    if dialect == "postgresql":
        insert = postgresql.insert(table)
    elif dialect == "sqlite":
        insert = sqlite.insert(table)
    else:
        raise DeliveryError(
            f"dialect {dialect!r} is not supported (sqlite, postgresql)",
            sink="sql",
            retryable=False,
            code="sql_dialect",
        )
    stmt = insert.values(**row)
    return stmt.on_conflict_do_update(
        index_elements=[table.c.request_id],
        set_={name: stmt.excluded[name] for name in row if name != "request_id"},
    )


class SqlSink(Sink):
    kind = "sql"

    def __init__(
        self,
        target: SqlTarget,
        *,
        settings: SinkSettings,
        engines: EngineCache,
        policy: AddressPolicy | None = None,
        resolver: Resolver = resolve_host,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(max_payload_bytes=settings.payload_limit(self.kind))
        self.target = target
        self.settings = settings
        self.table_name = target.table or settings.sql_table
        self.engines = engines
        self.policy = policy or AddressPolicy.from_allow(settings.sink_allow)
        self.resolver = resolver
        self.clock = clock

    def _url(self) -> SecretStr:
        try:
            return self.target.url()
        except ConfigError as exc:
            raise DeliveryError(
                f"{exc}; set it, then replay",
                sink=self.kind,
                retryable=False,
                code="sink_misconfigured",
            ) from None

    def _hostaddr(self, url: str) -> str | None:
        """Check where ``url`` goes, now: the address to connect to (PostgreSQL), or None (a
        SQLite file, checked against the allowed directories)."""
        try:
            endpoint = sql_endpoint(url)
        except ValueError as exc:
            raise DeliveryError(
                f"{self.target.url_env}: {exc}", sink=self.kind, retryable=False, code="bad_url"
            ) from None
        if endpoint.path is not None:
            why = path_refusal(endpoint.path, self.settings.sink_allow_paths, "a SQLite file")
            if why is not None:
                raise AddressRefused(why, sink=self.kind)
        if endpoint.host is None:
            return None
        return self.policy.resolve(endpoint.host, endpoint.port, self.resolver, sink=self.kind)[0]

    def write(self, result: Result, payload: bytes) -> None:
        url = self._url().get_secret_value()
        engine = self.engines.engine(url, self._hostaddr(url))
        shown = _redact(url)
        try:
            conn = engine.connect()
        except sa_exc.DBAPIError as exc:
            raise DeliveryError(
                f"cannot connect to {shown} ({_reason(exc)})",
                sink=self.kind,
                retryable=True,
                code="sql_unavailable",
            ) from None
        now = self.clock()
        try:
            with conn:
                table = self.engines.table(url, self.table_name, conn)
                conn.execute(_upsert(engine.dialect.name, table, result_row(result, now)))
                conn.commit()
        except sa_exc.DBAPIError as exc:
            raise DeliveryError(
                f"writing to {self.table_name!r} at {shown} failed ({_reason(exc)})",
                sink=self.kind,
                retryable=_retryable(exc),
                code="sql_unavailable" if _retryable(exc) else "sql_rejected",
            ) from None


def _reason(exc: sa_exc.DBAPIError) -> str:
    """The driver's own message, first line, without SQLAlchemy's statement and parameters."""
    text = str(exc.orig) if exc.orig is not None else str(exc)
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


def _retryable(exc: sa_exc.DBAPIError) -> bool:
    """Lost connections, locks and timeouts may pass; a statement the database refuses will not.

    SQLite reports both kinds as ``OperationalError``, so its "no such ..." messages (a table or
    column that is not there) are told apart by their text.
    """
    if exc.connection_invalidated or isinstance(exc, sa_exc.DisconnectionError):
        return True
    if isinstance(exc, sa_exc.OperationalError):
        text = str(exc.orig).lower()
        return not any(s in text for s in ("no such ", "has no column", "syntax error"))
    return isinstance(exc, sa_exc.InterfaceError)
