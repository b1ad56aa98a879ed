"""The sinks' long-lived handles do not pile up: a SQL engine or another Redis's client unused
for ``idle_s`` is closed the next time its cache is touched, and each cache holds at most
``max_handles``. Real SQLite engines and real Redis clients, under an injected clock."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy.engine import Engine
from sqlalchemy.pool import QueuePool

from routing.callbacks import SinkCallback
from routing.sinks import SinkContext, canonical_payload, sink_for
from routing.sinks.idle import IdleCache
from routing.sinks.table import SqlTarget, StreamTarget
from routing.store.lanes import LaneStore
from tests.test_sink_table import context_for, sink_settings
from tests.test_sinks_sql import a_result

IDLE_S = 60.0


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def sql_targets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, n: int) -> list[SqlTarget]:
    targets = []
    for i in range(n):
        monkeypatch.setenv(f"DB{i}_URL", f"sqlite:///{tmp_path / f'db{i}.sqlite'}")
        targets.append(SqlTarget(name=f"db{i}", url_env=f"DB{i}_URL", table="results"))
    return targets


@pytest.fixture
def sql_context(
    store: LaneStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clock: Clock
) -> Iterator[SinkContext]:
    ctx = context_for(
        store,
        *sql_targets(tmp_path, monkeypatch, 3),
        settings=sink_settings([tmp_path]),
        idle_s=IDLE_S,
        max_handles=2,
        idle_clock=clock,
    )
    yield ctx
    ctx.close()


def write(ctx: SinkContext, sink: str, n: int = 0) -> None:
    result = a_result(time.time(), id=f"standard.01CACHE{n:06d}")
    sink_for(SinkCallback(sink=sink), ctx).deliver(result, canonical_payload(result))


def held_engine(ctx: SinkContext, tmp_path: Path, i: int) -> Engine | None:
    url = f"sqlite:///{tmp_path / f'db{i}.sqlite'}"
    return ctx.engines._engines.peek((url, None))


def test_an_idle_sql_engine_is_disposed_when_the_cache_is_next_touched(
    sql_context: SinkContext, tmp_path: Path, clock: Clock
) -> None:
    write(sql_context, "db0")
    engine = held_engine(sql_context, tmp_path, 0)
    assert engine is not None
    pool = engine.pool
    assert isinstance(pool, QueuePool)
    assert pool.checkedin() == 1, "the delivery's connection went back to the pool"
    clock.now += IDLE_S - 1
    write(sql_context, "db1", 1)
    assert held_engine(sql_context, tmp_path, 0) is engine, "not idle long enough yet"
    clock.now += IDLE_S
    write(sql_context, "db1", 2)
    assert held_engine(sql_context, tmp_path, 0) is None
    assert engine.pool is not pool and pool.checkedin() == 0, "its connections were closed"
    write(sql_context, "db0", 3)  # delivering there again opens a new engine, table rechecked
    again = held_engine(sql_context, tmp_path, 0)
    assert again is not None and again is not engine


def test_the_sql_engine_cache_keeps_at_most_max_handles(
    sql_context: SinkContext, tmp_path: Path, clock: Clock
) -> None:
    write(sql_context, "db0")
    write(sql_context, "db1", 1)
    first = held_engine(sql_context, tmp_path, 0)
    assert first is not None
    pool = first.pool
    write(sql_context, "db0", 2)  # db0 used last: db1 is now the least recently used
    write(sql_context, "db2", 3)
    assert len(sql_context.engines.held()) == 2
    assert held_engine(sql_context, tmp_path, 1) is None
    assert held_engine(sql_context, tmp_path, 0) is first and first.pool is pool


def server_ids(server: redis.Redis) -> set[int]:
    return {int(c["id"]) for c in server.client_list()}


def wait_gone(server: redis.Redis, cid: int) -> bool:
    """Whether the server saw connection ``cid`` close (it notices on its next event loop)."""
    for _ in range(100):
        if cid not in server_ids(server):
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def stream_context(
    store: LaneStore, redis_url: str, monkeypatch: pytest.MonkeyPatch, clock: Clock
) -> Iterator[tuple[SinkContext, list[str]]]:
    base = redis_url.rsplit("/", 1)[0]
    keys = []
    targets = []
    for i, db in enumerate((13, 14, 15)):
        monkeypatch.setenv(f"R{i}_URL", f"{base}/{db}")
        keys.append(f"cache:{uuid.uuid4().hex[:8]}")
        targets.append(StreamTarget(name=f"r{i}", key=keys[-1], url_env=f"R{i}_URL"))
    ctx = context_for(
        store,
        *targets,
        resolver=lambda host, port: ["127.0.0.1"],
        idle_s=IDLE_S,
        max_handles=2,
        idle_clock=clock,
    )
    yield ctx, keys
    ctx.close()
    for i, key in enumerate(keys):
        client = redis.Redis.from_url(f"{base}/{13 + i}")
        client.delete(key, *client.keys(f"{store.keys.ns}:*"))
        client.close()


def stream_client(ctx: SinkContext, i: int) -> redis.Redis:
    target = ctx.sinks.find(f"r{i}")
    assert isinstance(target, StreamTarget)
    client, own = ctx.redis_for(target)
    assert not own
    return client


def test_an_idle_redis_client_is_closed_and_reopened_on_next_use(
    store: LaneStore, stream_context: tuple[SinkContext, list[str]], clock: Clock
) -> None:
    ctx, _ = stream_context
    write(ctx, "r0")
    client = stream_client(ctx, 0)
    cid = client.client_id()
    assert cid in server_ids(store.redis)
    clock.now += IDLE_S
    write(ctx, "r0", 1)  # the same target, idle too long: a fresh client
    assert stream_client(ctx, 0) is not client
    assert wait_gone(store.redis, cid), "the idle client's connection is closed"
    assert len(ctx.redis_clients) == 1


def test_the_redis_client_cache_keeps_at_most_max_handles(
    store: LaneStore, stream_context: tuple[SinkContext, list[str]]
) -> None:
    ctx, _ = stream_context
    write(ctx, "r0")
    oldest = stream_client(ctx, 0)
    cid = oldest.client_id()
    write(ctx, "r1", 1)
    write(ctx, "r2", 2)
    assert len(ctx.redis_clients) == 2
    assert wait_gone(store.redis, cid), "the least recently used client was closed"
    assert stream_client(ctx, 1).ping() and stream_client(ctx, 2).ping()


def test_the_service_redis_is_never_closed_by_the_cache(store: LaneStore, clock: Clock) -> None:
    own = StreamTarget(name="own", key=f"own:{uuid.uuid4().hex[:8]}")
    ctx = context_for(store, own, idle_s=IDLE_S, max_handles=1, idle_clock=clock)
    try:
        write(ctx, "own")
        clock.now += 10 * IDLE_S
        write(ctx, "own", 1)
        assert len(ctx.redis_clients) == 0 and store.redis.xlen(own.key) == 2
    finally:
        ctx.close()
        store.redis.delete(own.key)
    assert store.redis.ping()


def test_what_went_idle_is_closed_even_when_building_fails(clock: Clock) -> None:
    closed: list[Any] = []
    cache: IdleCache[str, object] = IdleCache(
        lambda key, value: closed.append(key), idle_s=IDLE_S, clock=clock
    )
    cache.get("a", object)
    clock.now += IDLE_S

    def broken() -> object:
        raise ValueError("bad URL")

    with pytest.raises(ValueError):
        cache.get("b", broken)
    assert closed == ["a"] and len(cache) == 0
