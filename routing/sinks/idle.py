"""``IdleCache``: the long-lived handles of the sinks (SQL engines, Redis clients), closed when idle.

A worker keeps one engine or client per target and checked address, so pools are reused. Left
alone, that map only grows: a host whose DNS answer rotates is a new key at each change, and a
target removed from the table keeps its pool open until the process ends. So an entry unused
for ``idle_s`` is closed the next time the cache is touched (no thread of its own), and at most
``max_entries`` are kept, the least recently used closed first.

Closing an entry another thread still uses must be harmless: the closers given here only drop
idle connections (a SQLAlchemy ``dispose`` leaves checked-out connections to their holder; a
Redis pool is disconnected without its in-use connections).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["IDLE_S", "MAX_ENTRIES", "IdleCache"]

#: An engine or client unused this long is closed; a target delivered to again reconnects.
IDLE_S = 600.0
#: The most engines (or clients) one process keeps open.
MAX_ENTRIES = 32

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class IdleCache(Generic[K, V]):
    """Values by key, each closed by ``close`` once unused for ``idle_s`` or pushed out by the
    cap. Thread-safe; values are built under the lock (building must not do I/O), closed
    outside it."""

    def __init__(
        self,
        close: Callable[[K, V], None],
        *,
        idle_s: float = IDLE_S,
        max_entries: int = MAX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._close = close
        self.idle_s = idle_s
        self.max_entries = max_entries
        self.clock = clock
        self._lock = threading.Lock()
        #: key -> (value, last use); least recently used first
        self._entries: OrderedDict[K, tuple[V, float]] = OrderedDict()

    def get(self, key: K, build: Callable[[], V]) -> V:
        """The value for ``key``, built when missing; closes what went idle meanwhile."""
        now = self.clock()
        stale: list[tuple[K, V]] = []
        try:
            with self._lock:
                stale += self._expired(now)
                entry = self._entries.get(key)
                value = build() if entry is None else entry[0]
                self._entries[key] = (value, now)
                self._entries.move_to_end(key)
                while len(self._entries) > self.max_entries:
                    old, (dropped, _) = self._entries.popitem(last=False)
                    stale.append((old, dropped))
        finally:  # what went idle is closed even when building the new value failed
            self._dispose(stale)
        return value

    def peek(self, key: K) -> V | None:
        """The value for ``key`` if held, without touching it."""
        with self._lock:
            entry = self._entries.get(key)
        return None if entry is None else entry[0]

    def keys(self) -> list[K]:
        with self._lock:
            return list(self._entries)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def evict_idle(self) -> None:
        """Close what has been idle for ``idle_s``, now (``get`` does this too)."""
        with self._lock:
            stale = self._expired(self.clock())
        self._dispose(stale)

    def close(self) -> None:
        """Close every value (a process shutting down, or a child after fork)."""
        with self._lock:
            stale = [(k, v) for k, (v, _) in self._entries.items()]
            self._entries.clear()
        self._dispose(stale)

    def _expired(self, now: float) -> list[tuple[K, V]]:
        stale: list[tuple[K, V]] = []
        while self._entries:
            key, (value, used) = next(iter(self._entries.items()))
            if now - used < self.idle_s:
                break
            del self._entries[key]
            stale.append((key, value))
        return stale

    def _dispose(self, stale: list[tuple[K, V]]) -> None:
        for key, value in stale:
            try:
                self._close(key, value)
            except Exception as exc:  # a handle that fails to close must not fail a delivery
                log.warning("closing an idle sink handle failed", extra={"error": str(exc)})
