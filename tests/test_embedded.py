"""The embedded Redis: lifecycle, state file, reuse, AOF durability and dying with its parent."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from routing.errors import ConfigError, StoreUnavailable
from routing.store.base import redact_url
from routing.store.embedded import (
    EmbeddedRedis,
    ensure_running,
    free_port,
    redis_server_binary,
    running_url,
)

REPO_ROOT = Path(__file__).resolve().parent.parent


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] not in {"Z", "X"}


def _wait_gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _pid_alive(pid):
            return True
        time.sleep(0.05)
    return False


def _ping(url: str) -> bool:
    try:
        with redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1) as client:
            return bool(client.ping())
    except redis.ConnectionError:
        return False


@pytest.fixture
def server(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    embedded = EmbeddedRedis(tmp_path / "redis")
    embedded.start()
    try:
        yield embedded
    finally:
        embedded.stop()


def test_binary_found() -> None:
    binary = redis_server_binary()
    assert os.access(binary, os.X_OK)


def test_free_port_is_bindable() -> None:
    port = free_port()
    assert 0 < port < 65536
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))


def test_start_ping_stop(tmp_path: Path) -> None:
    embedded = EmbeddedRedis(tmp_path)
    assert not embedded.running
    assert embedded.pid is None
    embedded.start()
    pid = embedded.pid
    assert pid is not None
    assert embedded.running
    assert embedded.url == f"redis://127.0.0.1:{embedded.port}/0"
    assert _ping(embedded.url)
    embedded.stop()
    assert not embedded.running
    assert embedded.pid is None
    assert not _pid_alive(pid)
    assert not _ping(embedded.url)
    embedded.stop()


def test_context_manager_and_config(tmp_path: Path) -> None:
    with (
        EmbeddedRedis(tmp_path, appendfsync="everysec") as embedded,
        redis.Redis.from_url(embedded.url, decode_responses=True) as client,
    ):
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("appendfsync") == {"appendfsync": "everysec"}
        assert client.config_get("save") == {"save": ""}
        assert client.config_get("bind") == {"bind": "127.0.0.1"}
    assert not embedded.running


def test_state_file_written_and_removed(server: EmbeddedRedis) -> None:
    state = json.loads(server.state_file.read_text())
    assert state == {"url": server.url, "pid": server.pid, "port": server.port}
    server.stop()
    assert not server.state_file.exists()


def test_running_url_and_ensure_running_reuse(server: EmbeddedRedis) -> None:
    assert running_url(server.data_dir) == server.url
    url, owned = ensure_running(server.data_dir)
    assert (url, owned) == (server.url, None)


def test_ensure_running_starts_when_none(tmp_path: Path) -> None:
    assert running_url(tmp_path) is None
    url, owned = ensure_running(tmp_path)
    assert owned is not None
    try:
        assert url == owned.url
        assert _ping(url)
        assert running_url(tmp_path) == url
    finally:
        owned.stop()
    assert running_url(tmp_path) is None


def test_stale_state_file_removed(server: EmbeddedRedis) -> None:
    server.kill()
    assert server.state_file.exists()
    assert running_url(server.data_dir) is None
    assert not server.state_file.exists()


def test_second_server_in_same_dir_refused(server: EmbeddedRedis) -> None:
    with pytest.raises(ConfigError, match="already serves"):
        EmbeddedRedis(server.data_dir).start()


def test_data_survives_restart(server: EmbeddedRedis) -> None:
    port = server.port
    with redis.Redis.from_url(server.url) as client:
        client.set("k", "v")
        client.rpush("lane", "a", "b")
    server.restart()
    assert server.port == port
    with redis.Redis.from_url(server.url) as client:
        assert client.get("k") == b"v"
        assert client.lrange("lane", 0, -1) == [b"a", b"b"]


def test_data_survives_kill_with_appendfsync_always(server: EmbeddedRedis) -> None:
    with redis.Redis.from_url(server.url) as client:
        for i in range(50):
            client.hset("req", str(i), "queued")
    old_pid = server.pid
    assert old_pid is not None
    server.kill()
    assert not _pid_alive(old_pid)
    server.start()
    with redis.Redis.from_url(server.url) as client:
        assert client.hlen("req") == 50


def test_start_failure_raises_with_log_tail(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        embedded = EmbeddedRedis(tmp_path, port=port)
        with pytest.raises(StoreUnavailable, match="last lines of"):
            embedded.start()
    assert not embedded.running


def test_start_off_main_thread(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    embedded = EmbeddedRedis(tmp_path)
    worker = threading.Thread(target=embedded.start)
    worker.start()
    worker.join()
    try:
        assert embedded.running
        assert _ping(embedded.url)
        assert "off the main thread" in caplog.text
    finally:
        embedded.stop()


def test_bad_appendfsync_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="appendfsync"):
        EmbeddedRedis(tmp_path, appendfsync="sometimes")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_server_dies_with_sigkilled_parent(tmp_path: Path) -> None:
    script = tmp_path / "owner.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys, time
            from routing.store.embedded import EmbeddedRedis

            server = EmbeddedRedis(sys.argv[1]).start()
            print(server.pid, flush=True)
            time.sleep(60)
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    with subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "data")],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
        env=env,
    ) as owner:
        assert owner.stdout is not None
        line = owner.stdout.readline()
        assert line.strip().isdigit(), f"helper printed {line!r}"
        redis_pid = int(line)
        try:
            assert _pid_alive(redis_pid)
            owner.send_signal(signal.SIGKILL)
            owner.wait()
            assert _wait_gone(redis_pid), "embedded redis outlived its SIGKILLed parent"
        finally:
            if _pid_alive(redis_pid):
                os.kill(redis_pid, signal.SIGKILL)


def test_stops_at_exit_but_not_in_forked_child(tmp_path: Path) -> None:
    script = tmp_path / "owner.py"
    script.write_text(
        textwrap.dedent(
            """
            import os, sys
            import redis
            from routing.store.embedded import EmbeddedRedis

            server = EmbeddedRedis(sys.argv[1]).start()
            child = os.fork()
            if child == 0:
                sys.exit(0)
            os.waitpid(child, 0)
            with redis.Redis.from_url(server.url) as client:
                print(server.pid, client.ping(), flush=True)
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "data")],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=env,
        timeout=20,
        check=True,
    )
    pid, pinged = done.stdout.split()
    assert pinged == "True", "a forked child's exit stopped its parent's redis"
    assert _wait_gone(int(pid)), "embedded redis outlived its owner's normal exit"
    assert not (tmp_path / "data" / "redis.json").exists()


def test_state_file_of_another_server_on_that_port_is_stale(
    server: EmbeddedRedis, tmp_path: Path
) -> None:
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    assert server.pid is not None
    state = {"url": server.url, "pid": server.pid + 100_000, "port": server.port}
    (other_dir / "redis.json").write_text(json.dumps(state))
    assert running_url(other_dir) is None
    assert not (other_dir / "redis.json").exists()


def test_no_binary_is_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("routing.store.embedded.shutil.which", lambda _name: None)
    monkeypatch.setattr("routing.store.embedded.find_spec", lambda _name: None)
    with pytest.raises(ConfigError, match="MIXBATCH_REDIS_URL"):
        redis_server_binary()


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://:secret@host:6379/0", "redis://:***@host:6379/0"),
        ("redis://user:secret@host:6379/1", "redis://user:***@host:6379/1"),
        ("rediss://secret@host/0", "rediss://***@host/0"),
        ("redis://host:6379/0?password=secret&db=2", "redis://host:6379/0?password=***&db=2"),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("unix:///tmp/redis.sock?db=0", "unix:///tmp/redis.sock?db=0"),
        ("unix:///tmp/redis.sock?password=secret", "unix:///tmp/redis.sock?password=***"),
        ("unix://:secret@/tmp/redis.sock", "unix://:***@/tmp/redis.sock"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected
    assert "secret" not in redact_url(url)
