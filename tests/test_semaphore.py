"""RedisSemaphore against a real redis-server (conftest's ``redis_url``): threads, processes,
crashes, expiry."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from routing.errors import SemaphoreBusy, StoreUnavailable
from routing.store.embedded import EmbeddedRedis, free_port
from routing.store.semaphore import RedisSemaphore

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    conn = redis.Redis.from_url(redis_url)
    try:
        yield conn
    finally:
        conn.close()


@pytest.fixture
def key() -> str:
    return f"test:{{sem:{uuid.uuid4().hex}}}"


def test_admits_up_to_limit_then_refuses(client: redis.Redis, key: str) -> None:
    sem = RedisSemaphore(client, key, limit=2)
    first, second = sem.acquire(0), sem.acquire(0)
    assert first and second and first != second
    assert sem.acquire(0.05) is None
    assert sem.in_use() == 2


def test_release_frees_a_slot_once(client: redis.Redis, key: str) -> None:
    sem = RedisSemaphore(client, key, limit=1)
    token = sem.acquire(0)
    assert token is not None
    assert sem.release(token) is True
    assert sem.release(token) is False
    assert sem.in_use() == 0
    assert sem.acquire(0) is not None


def test_a_waiter_gets_the_slot_when_it_is_released(client: redis.Redis, key: str) -> None:
    sem = RedisSemaphore(client, key, limit=1)
    token = sem.acquire(0)
    assert token is not None
    timer = threading.Timer(0.15, sem.release, args=(token,))
    timer.start()
    started = time.monotonic()
    try:
        assert sem.acquire(2.0) is not None
    finally:
        timer.join()
    assert 0.1 < time.monotonic() - started < 1.0


def _script_calls(client: redis.Redis) -> int:
    stats = client.info("commandstats")
    return sum(
        int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("evalsha", "eval")
    )


def test_waiting_does_not_hammer_redis(client: redis.Redis, key: str) -> None:
    sem = RedisSemaphore(client, key, limit=1)
    assert sem.acquire(0) is not None
    before = _script_calls(client)
    assert sem.acquire(0.5) is None
    tries = _script_calls(client) - before
    assert 2 <= tries <= 20


def test_hold_releases_on_exit_and_on_error(client: redis.Redis, key: str) -> None:
    sem = RedisSemaphore(client, key, limit=1)
    with sem.hold(0.1) as token:
        assert isinstance(token, str)
        assert sem.in_use() == 1
    assert sem.in_use() == 0
    with pytest.raises(RuntimeError), sem.hold(0.1):
        raise RuntimeError("work failed")
    assert sem.in_use() == 0


def test_hold_raises_a_clear_error_when_full(client: redis.Redis, key: str) -> None:
    sem = RedisSemaphore(client, key, limit=1)
    assert sem.acquire(0) is not None
    with (
        pytest.raises(SemaphoreBusy, match=r"all 1 slots of semaphore .*sem:") as info,
        sem.hold(0.05),
    ):
        pytest.fail("entered a full semaphore")
    assert info.value.retryable
    assert info.value.waited_s >= 0.05


def test_limit_holds_across_threads(redis_url: str, key: str) -> None:
    limit, workers = 3, 12
    lock = threading.Lock()
    current = peak = done = 0

    def work() -> None:
        nonlocal current, peak, done
        conn = redis.Redis.from_url(redis_url)
        try:
            with RedisSemaphore(conn, key, limit=limit).hold(10.0):
                with lock:
                    current += 1
                    peak = max(peak, current)
                time.sleep(0.03)
                with lock:
                    current -= 1
                    done += 1
        finally:
            conn.close()

    threads = [threading.Thread(target=work) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert done == workers
    assert peak == limit


_CHILD = textwrap.dedent(
    """
    import os, sys, time
    import redis
    from routing.store.semaphore import RedisSemaphore

    url, key, limit, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    conn = redis.Redis.from_url(url)
    sem = RedisSemaphore(conn, key, limit=limit, lease_s=float(sys.argv[5]))
    if mode == "crash":
        assert sem.acquire(5.0)
        print("held", flush=True)
        os._exit(0)
    conn.rpush(key + ":ready", os.getpid())
    assert conn.blpop([key + ":go"], timeout=20)
    for _ in range(3):
        with sem.hold(20.0):
            now = conn.incr(key + ":current")
            conn.rpush(key + ":seen", now)
            time.sleep(0.03)
            conn.decr(key + ":current")
    conn.close()
    """
)


def _child(
    redis_url: str, key: str, limit: int, mode: str, lease_s: float
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, redis_url, key, str(limit), mode, str(lease_s)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )


def test_limit_holds_across_processes(client: redis.Redis, redis_url: str, key: str) -> None:
    children = [_child(redis_url, key, 2, "work", 30.0) for _ in range(4)]
    for _ in children:
        assert client.blpop([key + ":ready"], timeout=20)
    client.rpush(key + ":go", *range(len(children)))
    for child in children:
        child.communicate(timeout=20)
        assert child.returncode == 0
    seen = [int(n) for n in client.lrange(key + ":seen", 0, -1)]
    assert len(seen) == 12
    assert max(seen) == 2
    assert RedisSemaphore(client, key, limit=2).in_use() == 0


def test_a_crashed_holder_expires_after_its_lease(
    client: redis.Redis, redis_url: str, key: str
) -> None:
    child = _child(redis_url, key, 1, "crash", 0.5)
    out, _ = child.communicate(timeout=20)
    assert out.strip() == "held" and child.returncode == 0
    sem = RedisSemaphore(client, key, limit=1, lease_s=0.5)
    assert sem.in_use() == 1
    assert sem.acquire(0) is None
    assert sem.acquire(3.0) is not None


def test_renew_keeps_a_lease_alive(client: redis.Redis, key: str) -> None:
    sem = RedisSemaphore(client, key, limit=1, lease_s=0.6)
    token = sem.acquire(0)
    assert token is not None
    for _ in range(3):
        time.sleep(0.25)
        assert sem.renew(token) is True
    assert sem.acquire(0) is None
    time.sleep(0.7)
    assert sem.renew(token) is False
    assert sem.acquire(0) is not None


def test_the_key_expires_with_its_last_lease(client: redis.Redis, key: str) -> None:
    sem = RedisSemaphore(client, key, limit=5, lease_s=0.2)
    assert sem.acquire(0) is not None
    assert 0 < client.pttl(key) <= 200
    time.sleep(0.3)
    assert client.exists(key) == 0


@pytest.mark.parametrize(("limit", "lease_s"), [(0, 10.0), (1, 0.0), (2, -1.0)])
def test_rejects_bad_settings(client: redis.Redis, limit: int, lease_s: float) -> None:
    with pytest.raises(ValueError, match="semaphore"):
        RedisSemaphore(client, "k", limit=limit, lease_s=lease_s)


def test_unreachable_redis_is_store_unavailable() -> None:
    conn = redis.Redis(port=free_port(), socket_connect_timeout=0.2, retry=None)
    try:
        with pytest.raises(StoreUnavailable, match="semaphore 'k'"):
            RedisSemaphore(conn, "k", limit=1).acquire(0)
    finally:
        conn.close()


def test_hold_survives_redis_vanishing_inside_the_block(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = EmbeddedRedis(tmp_path, appendfsync="no").start()
    conn = redis.Redis.from_url(server.url, socket_connect_timeout=0.2, retry=None)
    try:
        sem = RedisSemaphore(conn, "k", limit=1)
        with sem.hold(1.0):
            server.kill()
    finally:
        conn.close()
        server.stop()
    assert any("expires with its lease" in r.getMessage() for r in caplog.records)
