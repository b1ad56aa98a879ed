"""A counting semaphore in Redis: at most ``limit`` holders of one key across every process.

Realtime calls are bounded per provider and model across all workers, on all hosts; a
per-process pool cannot do that. Holders are members of a sorted set scored by the expiry of
their lease (Redis server time, in milliseconds, so hosts with skewed clocks agree), and one
Lua script drops expired holders and admits a new one only while the set is under the limit.
A process that crashes while holding simply stops renewing: its lease runs out after
``lease_s`` and its slot comes back.

The semaphore is not fair: waiters poll with a growing sleep (5 ms up to 100 ms, jittered)
rather than queueing, which keeps Redis quiet and is plenty for calls that take seconds.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
import uuid
from collections.abc import Iterator

from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from routing.errors import SemaphoreBusy, StoreUnavailable
from routing.store.scripts import Scripts

__all__ = ["RedisSemaphore"]

logger = logging.getLogger(__name__)

_FIRST_WAIT_S = 0.005
_MAX_WAIT_S = 0.1


@contextlib.contextmanager
def _redis_errors(key: str) -> Iterator[None]:
    try:
        yield
    except (RedisConnectionError, RedisTimeoutError) as exc:
        raise StoreUnavailable(
            f"semaphore {key!r}: Redis is unreachable ({type(exc).__name__}: {exc})"
        ) from exc


class RedisSemaphore:
    """At most ``limit`` concurrent holders of ``key``, each for at most ``lease_s`` unrenewed.

    ``key`` is used as given: the caller builds it (``routing.keys.Keys.semaphore``), hash tag
    included, so the semaphore lives on one Redis Cluster slot. Choose ``lease_s`` longer than
    the slowest call it guards, or call ``renew`` while holding: a lease that runs out while
    its holder still works lets one extra holder in.
    """

    def __init__(self, redis: Redis, key: str, limit: int, lease_s: float = 120) -> None:
        if limit < 1:
            raise ValueError(f"semaphore {key!r}: limit must be at least 1, got {limit}")
        if lease_s <= 0:
            raise ValueError(f"semaphore {key!r}: lease_s must be positive, got {lease_s}")
        self.redis = redis
        self.key = key
        self.limit = limit
        self.lease_s = lease_s
        scripts = Scripts(redis)
        self._acquire = scripts["semaphore_acquire"]
        self._renew = scripts["semaphore_renew"]
        self._count = scripts["semaphore_count"]

    def __repr__(self) -> str:
        return f"RedisSemaphore(key={self.key!r}, limit={self.limit}, lease_s={self.lease_s:g})"

    @property
    def _lease_ms(self) -> int:
        return max(1, round(self.lease_s * 1000))

    def try_acquire(self) -> str | None:
        """One attempt, no waiting: a token if a slot was free, else None."""
        token = uuid.uuid4().hex
        with _redis_errors(self.key):
            got = self._acquire(keys=[self.key], args=[self.limit, token, self._lease_ms])
        return token if int(got) == 1 else None

    def acquire(self, timeout_s: float) -> str | None:
        """A token proving a slot, or None if none came free within ``timeout_s`` seconds."""
        deadline = time.monotonic() + timeout_s
        wait = _FIRST_WAIT_S
        while True:
            token = self.try_acquire()
            if token is not None:
                return token
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            time.sleep(min(left, wait * random.uniform(0.5, 1.0)))
            wait = min(wait * 2, _MAX_WAIT_S)

    def release(self, token: str) -> bool:
        """Give the slot back; False if it was not held (already released, or its lease ran out)."""
        with _redis_errors(self.key):
            return int(self.redis.zrem(self.key, token)) == 1

    def renew(self, token: str) -> bool:
        """Extend a held lease to ``lease_s`` from now; False if the lease had already run out."""
        with _redis_errors(self.key):
            return int(self._renew(keys=[self.key], args=[token, self._lease_ms])) == 1

    def in_use(self) -> int:
        """How many slots are held by live leases now."""
        with _redis_errors(self.key):
            return int(self._count(keys=[self.key]))

    @contextlib.contextmanager
    def hold(self, timeout_s: float) -> Iterator[str]:
        """Hold a slot for the ``with`` block; raises ``SemaphoreBusy`` if none comes free.

        If Redis is gone when the block ends, the slot is left to expire after ``lease_s``
        rather than raising over the block's own result or error.
        """
        started = time.monotonic()
        token = self.acquire(timeout_s)
        if token is None:
            raise SemaphoreBusy(self.key, self.limit, time.monotonic() - started)
        try:
            yield token
        finally:
            try:
                self.release(token)
            except StoreUnavailable as exc:
                logger.warning(
                    "semaphore slot not released, it expires with its lease",
                    extra={"semaphore": self.key, "lease_s": self.lease_s, "error": str(exc)},
                )
