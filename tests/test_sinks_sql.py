"""SQL sink: one suite run on SQLite (a file in tmp_path) and on PostgreSQL.

PostgreSQL runs when ``MIXBATCH_TEST_POSTGRES_URL`` is set (a SQLAlchemy URL such as
``postgresql+psycopg://user:pass@127.0.0.1:5432/db``, the driver installed); without it the
PostgreSQL cases are skipped with that reason on a laptop, and fail under ``CI=true``. Each
case writes to a table of its own. The sink is a named one (``SqlTarget``): its URL is read
from the variable the table names, here ``APPDB_URL``.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from routing.callbacks import SinkCallback
from routing.models import ErrorInfo, Result, Route, ServiceConfig
from routing.sinks import (
    AddressRefused,
    DeliveryError,
    PayloadTooLarge,
    SinkContext,
    canonical_payload,
    sink_for,
)
from routing.sinks import sql as sql_module
from routing.sinks.sql import SqlSink
from routing.sinks.table import SqlTarget
from routing.states import State
from routing.store.lanes import LaneStore
from tests.conftest import need_server
from tests.test_sink_table import context_for, deliver, finished, sink_settings
from tests.test_ssrf import deliver_failing

PG_ENV = "MIXBATCH_TEST_POSTGRES_URL"
APPDB = SinkCallback(sink="appdb")


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'results.db'}"
    url = os.environ.get(PG_ENV)
    if not url:
        need_server(f"{PG_ENV} is not set: PostgreSQL cases need a server (a SQLAlchemy URL)")
    assert url
    return url


@pytest.fixture
def table() -> str:
    return f"mbtest_{uuid.uuid4().hex[:10]}"


@pytest.fixture
def appdb(db_url: str, table: str, monkeypatch: pytest.MonkeyPatch) -> SqlTarget:
    monkeypatch.setenv("APPDB_URL", db_url)
    return SqlTarget(name="appdb", url_env="APPDB_URL", table=table)


@pytest.fixture
def context(store: LaneStore, appdb: SqlTarget, tmp_path: Path) -> Iterator[SinkContext]:
    ctx = context_for(store, appdb, settings=sink_settings([tmp_path]))
    yield ctx
    ctx.close()


@pytest.fixture
def rows(db_url: str, table: str) -> Iterator[Any]:
    """Read the sink's table back; drops it afterwards so a shared PostgreSQL stays clean."""
    engine = sa.create_engine(db_url)

    def read() -> list[dict[str, Any]]:
        with engine.connect() as conn:
            t = sa.Table(table, sa.MetaData(), autoload_with=conn)
            return [dict(r._mapping) for r in conn.execute(sa.select(t))]

    yield read
    with engine.begin() as conn:
        conn.execute(sa.text(f'DROP TABLE IF EXISTS "{table}"'))
    engine.dispose()


def a_result(now: float, **fields: Any) -> Result:
    values: dict[str, Any] = {
        "id": "standard.01SQLTEST",
        "custom_id": "doc-7",
        "tenant": "acme",
        "lane": "standard",
        "status": State.DONE,
        "status_code": 200,
        "body": {"choices": [{"message": {"content": "first"}}]},
        "usage": {"total_tokens": 5, "cost_usd": 0.0004},
        "route": Route.REALTIME,
        "provider": "sandbox",
        "model": "gpt-4o-mini",
        "deadline": now + 60,
        "created_at": now - 2,
        "finished_at": now - 1,
    }
    values.update(fields)
    return Result(**values)


def _utc(value: datetime) -> datetime:
    """SQLite hands back naive datetimes (stored as UTC); PostgreSQL aware ones."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def test_upserting_twice_keeps_one_row_with_the_latest(
    db_url: str, table: str, rows: Any, context: SinkContext
) -> None:
    now = time.time()
    first = a_result(now)
    sink_for(APPDB, context).deliver(first, canonical_payload(first))
    later = a_result(now, body={"choices": [{"message": {"content": "second"}}]})
    sink_for(APPDB, context).deliver(later, canonical_payload(later))
    [row] = rows()
    assert row["request_id"] == first.id
    assert row["response"] == later.body
    assert (row["custom_id"], row["tenant"], row["lane"]) == ("doc-7", "acme", "standard")
    assert (row["status"], row["status_code"], row["route"]) == ("done", 200, "realtime")
    assert row["usage"] == {"total_tokens": 5, "cost_usd": 0.0004}
    assert row["cost_usd"] == pytest.approx(0.0004)
    assert row["error"] is None
    assert _utc(row["created_at"]).timestamp() == pytest.approx(now - 2, abs=1e-3)
    assert _utc(row["finished_at"]).timestamp() == pytest.approx(now - 1, abs=1e-3)
    assert abs(_utc(row["delivered_at"]).timestamp() - time.time()) < 60


def test_a_failed_result_keeps_its_error(
    db_url: str, table: str, rows: Any, context: SinkContext
) -> None:
    now = time.time()
    error = ErrorInfo(code="server_error", message="upstream 503", retryable=True, status_code=503)
    failed = a_result(now, status=State.FAILED, status_code=503, body=None, error=error, usage=None)
    sink_for(APPDB, context).deliver(failed, canonical_payload(failed))
    [row] = rows()
    assert row["status"] == "failed" and row["response"] is None and row["usage"] is None
    assert row["error"] == error.model_dump(mode="json")


def test_delivering_twice_through_the_store_writes_one_row(
    db_url: str,
    table: str,
    rows: Any,
    store: LaneStore,
    service_config: ServiceConfig,
    context: SinkContext,
) -> None:
    now = time.time()
    rid = finished(store, service_config, now, {"sink": "appdb"}, custom_id="c1")
    assert deliver(store, context, rid, now + 1).status == "delivered"
    result = store.result(rid)
    assert result is not None
    sink_for(APPDB, context).deliver(result, canonical_payload(result))  # the duplicate
    [row] = rows()
    assert (row["request_id"], row["custom_id"]) == (rid, "c1")


def test_the_default_table_comes_from_settings(
    tmp_path: Path, store: LaneStore, service_config: ServiceConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'default.db'}"
    monkeypatch.setenv("DEFAULT_DB_URL", url)
    target = SqlTarget(name="appdb", url_env="DEFAULT_DB_URL")
    ctx = context_for(store, target, settings=sink_settings([tmp_path], sql_table="answers"))
    try:
        now = time.time()
        rid = finished(store, service_config, now, {"sink": "appdb"})
        assert deliver(store, ctx, rid, now + 1).status == "delivered"
    finally:
        ctx.close()
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        found = conn.execute(sa.text("SELECT request_id FROM answers")).scalars().all()
    engine.dispose()
    assert found == [rid]


def test_the_documented_schema_is_the_table(db_url: str, table: str, context: SinkContext) -> None:
    documented = re.findall(
        r"^    (\w+)\s{2,}(?:VARCHAR|INTEGER|JSON|FLOAT|TIMESTAMP)", sql_module.__doc__ or "", re.M
    )
    assert documented == [c.name for c in sql_module.results_table(table).columns]
    now = time.time()
    result = a_result(now)
    sink_for(APPDB, context).deliver(result, canonical_payload(result))
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            columns = [c["name"] for c in sa.inspect(conn).get_columns(table)]
            pk = sa.inspect(conn).get_pk_constraint(table)["constrained_columns"]
        with engine.begin() as conn:
            conn.execute(sa.text(f'DROP TABLE "{table}"'))
    finally:
        engine.dispose()
    assert columns == documented and pk == ["request_id"]


def test_an_unreachable_database_is_retried_and_the_result_kept(
    db_url: str,
    store: LaneStore,
    service_config: ServiceConfig,
    context: SinkContext,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if db_url.startswith("sqlite"):
        bad = f"sqlite:///{tmp_path / 'no-such-dir' / 'sub' / 'results.db'}"
    else:
        bad = sa.make_url(db_url).set(host="127.0.0.1", port=1).render_as_string(False)
    monkeypatch.setenv("APPDB_URL", bad)
    now = time.time()
    rid = finished(store, service_config, now, {"sink": "appdb"})
    out = deliver(store, context, rid, now + 1)
    assert out.status == "retry" and out.error is not None
    assert out.error.code == "sql_unavailable" and out.error.retryable
    assert "cannot connect" in out.error.message
    assert store.due_deliveries("standard", now + 1 + 60) == [rid], "still in the outbox"
    assert store.dlq.entries() == []
    result = store.result(rid)
    assert result is not None and result.status is State.DONE and not result.delivered


def test_a_password_never_shows_in_an_error(
    context: SinkContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BAD_DB_URL", "postgresql+nosuchdriver://user:hunter2@db.internal/app")
    sink = SqlSink(
        SqlTarget(name="bad", url_env="BAD_DB_URL"),
        settings=context.settings,
        engines=context.engines,
        resolver=lambda host, port: ["93.184.215.14"],
    )
    result = a_result(time.time())
    with pytest.raises(DeliveryError) as info:
        sink.deliver(result, canonical_payload(result))
    assert not info.value.retryable and info.value.code == "sql_driver_missing"
    assert "hunter2" not in str(info.value) and "db.internal" in str(info.value)


def test_a_table_without_the_columns_is_refused(
    db_url: str, table: str, context: SinkContext
) -> None:
    engine = sa.create_engine(db_url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(f'CREATE TABLE "{table}" (request_id VARCHAR(128) PRIMARY KEY)'))
        result = a_result(time.time())
        with pytest.raises(DeliveryError) as info:
            sink_for(APPDB, context).deliver(result, canonical_payload(result))
        assert not info.value.retryable and info.value.code == "sql_schema"
        assert "custom_id" in str(info.value) and "routing.sinks.sql" in str(info.value)
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text(f'DROP TABLE IF EXISTS "{table}"'))
        engine.dispose()


def test_a_result_too_large_for_the_sink(
    store: LaneStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SMALL_DB_URL", f"sqlite:///{tmp_path / 'x.db'}")
    settings = sink_settings([tmp_path], sink_max_payload_bytes={"sql": 100})
    ctx = context_for(store, SqlTarget(name="small", url_env="SMALL_DB_URL"), settings=settings)
    try:
        sink = sink_for(SinkCallback(sink="small"), ctx)
        result = a_result(time.time())
        with pytest.raises(PayloadTooLarge, match=r"sql sink: .* limit of 100"):
            sink.deliver(result, canonical_payload(result))
    finally:
        ctx.close()
    assert not (tmp_path / "x.db").exists(), "nothing was written"


def test_a_sqlite_file_outside_the_allowed_directories_is_refused(
    store: LaneStore,
    service_config: ServiceConfig,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A SQLite URL is a file path on the worker: only where MIXBATCH_SINK_ALLOW_PATHS says,
    links followed, and nothing is created elsewhere."""
    allowed, outside = tmp_path / "dbs", tmp_path / "elsewhere"
    allowed.mkdir()
    outside.mkdir()
    (allowed / "link.db").symlink_to(outside / "target.db")
    ctx = context_for(
        store, SqlTarget(name="appdb", url_env="APPDB_URL"), settings=sink_settings([allowed])
    )
    now = time.time()
    try:
        for path in (outside / "x.db", allowed / "link.db", allowed / ".." / "elsewhere" / "y.db"):
            monkeypatch.setenv("APPDB_URL", f"sqlite:///{path}")
            rid = finished(store, service_config, now, {"sink": "appdb"})
            out = deliver(store, ctx, rid, now + 1)
            assert out.status == "dead letter" and out.error is not None
            assert "is not under a directory of MIXBATCH_SINK_ALLOW_PATHS" in out.error.message
        assert list(outside.iterdir()) == [], "no file was created outside"
        monkeypatch.setenv("APPDB_URL", f"sqlite:///{allowed / 'ok.db'}")
        rid = finished(store, service_config, now, {"sink": "appdb"})
        assert deliver(store, ctx, rid, now + 1).status == "delivered"
    finally:
        ctx.close()
    with pytest.raises(AddressRefused):
        SqlSink(
            SqlTarget(name="appdb", url_env="APPDB_URL"),
            settings=sink_settings(),
            engines=ctx.engines,
        ).deliver(a_result(now), b"{}")


def test_an_unset_url_variable_is_a_dead_letter_naming_it(
    store: LaneStore, service_config: ServiceConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("APPDB_URL", raising=False)
    ctx = context_for(store, SqlTarget(name="appdb", url_env="APPDB_URL"))
    status, message = deliver_failing(store, service_config, ctx, "appdb", time.time())
    assert status == "dead letter"
    assert message == (
        "sql sink: sink 'appdb': APPDB_URL is not set in the worker's environment (the "
        "database URL); set it, then replay"
    )
