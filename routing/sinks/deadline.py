"""A total deadline for one HTTP exchange, whatever the other side trickles.

httpx's timeouts bound each socket operation, not the exchange: a receiver that sends one byte
a second never trips a 10-second read timeout and can hold a worker for as long as it likes.
``TotalDeadline`` bounds the whole of it (connect, TLS, send, the answer): each phase's timeout
is what is left, and when the time is up a timer shuts the connection down, which ends any read
or write in progress at once.

    with TotalDeadline(10.0) as deadline:
        with client.stream("POST", url, timeout=deadline.timeout(), extensions=deadline.extensions()):
            ...
    deadline.expired  # True when the timer cut the exchange short

The connection is found through httpcore's ``trace`` extension, which hands over each new
connection's stream; the timer shuts down a duplicate of its socket (``shutdown`` acts on the
connection, whichever descriptor it is called on), so it never touches a descriptor that the
connection has closed and the process reused meanwhile.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

__all__ = ["TotalDeadline"]


class TotalDeadline:
    """A wall-clock budget for one exchange; a context manager that runs its timer."""

    def __init__(self, total_s: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.total_s = total_s
        self._clock = clock
        self._ends = clock() + total_s
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._timer = threading.Timer(total_s, self._expire)
        self._timer.daemon = True
        self.expired = False

    def remaining(self) -> float:
        return max(0.0, self._ends - self._clock())

    def timeout(self) -> httpx.Timeout:
        """Per-phase timeouts of what is left (a little above zero, so httpx still tries)."""
        return httpx.Timeout(max(self.remaining(), 0.001))

    def extensions(self) -> dict[str, Any]:
        """The request extensions that let the timer find the connection."""
        return {"trace": self._trace}

    def _trace(self, event: str, info: dict[str, Any]) -> None:
        if event.endswith(("connect_tcp.complete", "start_tls.complete")):
            stream = info.get("return_value")
            sock = stream.get_extra_info("socket") if stream is not None else None
            if isinstance(sock, socket.socket):
                self._watch(sock.dup())

    def _watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            late = self.expired
        if late:
            _shutdown(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            watched = list(self._sockets)
        for sock in watched:
            _shutdown(sock)

    def __enter__(self) -> TotalDeadline:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        self._timer.join()
        with self._lock:
            watched, self._sockets = self._sockets, []
        for sock in watched:
            sock.close()


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed by the other side or by httpcore
        sock.shutdown(socket.SHUT_RDWR)
