"""SQL sink: one suite run on SQLite (a file in tmp_path) and on PostgreSQL.

PostgreSQL runs when ``MIXBATCH_TEST_POSTGRES_URL`` is set (a SQLAlchemy URL such as
``postgresql+psycopg://user:pass@127.0.0.1:5432/db``, the driver installed); without it the
PostgreSQL cases are skipped with that reason on a laptop, and fail under ``CI=true``. Each case writes to a table of its own.
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

from routing.callbacks import SqlCallback
from routing.errors import InvalidRequest
from routing.models import ErrorInfo, Result, Route, ServiceConfig, coerce_request
from routing.sinks import DeliveryError, PayloadTooLarge, SinkContext, canonical_payload, sink_for
from routing.sinks import sql as sql_module
from routing.sinks.sql import SqlSink
from routing.states import State
from routing.store.lanes import LaneStore
from tests.conftest import need_server
from tests.test_sinks_webhook import BODY, deliver_once, finished, sink_settings

PG_ENV = "MIXBATCH_TEST_POSTGRES_URL"


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
def context(store: LaneStore) -> Iterator[SinkContext]:
    ctx = SinkContext(sink_settings(), redis=store.redis, namespace=store.keys.ns)
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
    spec = SqlCallback(url=db_url, table=table)
    first = a_result(now)
    sink_for(spec, context).deliver(first, canonical_payload(first))
    later = a_result(now, body={"choices": [{"message": {"content": "second"}}]})
    sink_for(spec, context).deliver(later, canonical_payload(later))
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
    sink_for(SqlCallback(url=db_url, table=table), context).deliver(
        failed, canonical_payload(failed)
    )
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
    rid = finished(
        store, service_config, now, {"kind": "sql", "url": db_url, "table": table}, custom_id="c1"
    )
    assert deliver_once(store, context, rid, now + 1).status == "delivered"
    result = store.result(rid)
    assert result is not None
    sink_for(SqlCallback(url=db_url, table=table), context).deliver(
        result, canonical_payload(result)
    )  # the at-least-once duplicate
    [row] = rows()
    assert (row["request_id"], row["custom_id"]) == (rid, "c1")


def test_the_default_table_comes_from_settings(
    tmp_path: Path, store: LaneStore, service_config: ServiceConfig
) -> None:
    url = f"sqlite:///{tmp_path / 'default.db'}"
    ctx = SinkContext(sink_settings(sql_table="answers"), redis=store.redis)
    try:
        now = time.time()
        rid = finished(store, service_config, now, {"kind": "sql", "url": url})
        assert deliver_once(store, ctx, rid, now + 1).status == "delivered"
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
    sink_for(SqlCallback(url=db_url, table=table), context).deliver(
        result, canonical_payload(result)
    )
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
    db_url: str, store: LaneStore, service_config: ServiceConfig, context: SinkContext
) -> None:
    if db_url.startswith("sqlite"):
        bad = "sqlite:////nonexistent-mixbatch-dir/sub/results.db"
    else:
        bad = str(sa.make_url(db_url).set(host="127.0.0.1", port=1))
    now = time.time()
    rid = finished(store, service_config, now, {"kind": "sql", "url": bad})
    out = deliver_once(store, context, rid, now + 1)
    assert out.status == "retry" and out.error is not None
    assert out.error.code == "sql_unavailable" and out.error.retryable
    assert "cannot connect" in out.error.message
    assert store.due_deliveries("standard", now + 1 + 60) == [rid], "still in the outbox"
    assert store.dlq.entries() == []
    result = store.result(rid)
    assert result is not None and result.status is State.DONE and not result.delivered


def test_a_password_never_shows_in_an_error(context: SinkContext) -> None:
    sink = SqlSink(
        SqlCallback(url="postgresql+nosuchdriver://user:hunter2@db.internal/app"),
        settings=context.settings,
        engines=context.engines,
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
            sink_for(SqlCallback(url=db_url, table=table), context).deliver(
                result, canonical_payload(result)
            )
        assert not info.value.retryable and info.value.code == "sql_schema"
        assert "custom_id" in str(info.value) and "routing.sinks.sql" in str(info.value)
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text(f'DROP TABLE IF EXISTS "{table}"'))
        engine.dispose()


def test_a_result_too_large_for_the_sink(store: LaneStore, tmp_path: Path) -> None:
    ctx = SinkContext(sink_settings(sink_max_payload_bytes={"sql": 100}), redis=store.redis)
    try:
        sink = sink_for(SqlCallback(url=f"sqlite:///{tmp_path / 'x.db'}"), ctx)
        result = a_result(time.time())
        with pytest.raises(PayloadTooLarge, match=r"sql sink: .* limit of 100"):
            sink.deliver(result, canonical_payload(result))
    finally:
        ctx.close()
    assert not (tmp_path / "x.db").exists(), "nothing was written"


@pytest.mark.parametrize(
    "callback,field,fragment",
    [
        ({"kind": "sql", "url": "mysql://u@h/db"}, "callback.url", "sqlite://..., postgresql://"),
        ({"kind": "sql", "url": "postgres://u@h/db"}, "callback.url", "postgresql+psycopg"),
        ({"kind": "sql", "url": "sqlite:///x.db", "table": "x; DROP"}, "callback.table", "letters"),
        ({"kind": "sql"}, "callback.url", "Field required"),
    ],
)
def test_a_bad_sql_callback_is_refused_at_submit(
    callback: dict[str, Any], field: str, fragment: str
) -> None:
    with pytest.raises(InvalidRequest) as info:
        coerce_request({"body": BODY, "callback": callback})
    assert info.value.field == field
    assert fragment in str(info.value)
