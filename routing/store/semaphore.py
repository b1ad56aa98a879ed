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

from routing.errors import MixbatchError, StoreUnavailable

__all__ = ["RedisSemaphore", "SemaphoreBusy"]

logger = logging.getLogger(__name__)

_FIRST_WAIT_S = 0.005
_MAX_WAIT_S = 0.1

# KEYS[1]  holders: ZSET token -> lease expiry (server ms)
# ARGV[1]  limit
# ARGV[2]  token
# ARGV[3]  lease in ms
# Returns 1 if the token now holds a slot, 0 if the semaphore is full.
# The key's own TTL follows the longest lease, so an abandoned semaphore leaves nothing behind.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + lease, ARGV[2])
if redis.call('PTTL', KEYS[1]) < lease then
  redis.call('PEXPIRE', KEYS[1], lease)
end
return 1
"""

# KEYS[1]  holders: ZSET token -> lease expiry (server ms)
# ARGV[1]  token
# ARGV[2]  lease in ms
# Returns 1 if the token still held a live slot and its lease now runs ARGV[2] from now, else 0.
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[2])
local expiry = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not expiry or tonumber(expiry) <= now then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 0
end
redis.call('ZADD', KEYS[1], 'XX', now + lease, ARGV[1])
if redis.call('PTTL', KEYS[1]) < lease then
  redis.call('PEXPIRE', KEYS[1], lease)
end
return 1
"""

# KEYS[1]  holders: ZSET token -> lease expiry (server ms)
# Returns the number of holders whose lease has not run out.
_COUNT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')
"""


class SemaphoreBusy(MixbatchError, TimeoutError):
    """Every slot stayed taken for the whole wait. Retryable: slots free up as calls finish."""

    retryable = True

    def __init__(self, key: str, limit: int, waited_s: float) -> None:
        self.key = key
        self.limit = limit
        self.waited_s = waited_s
        super().__init__(
            f"all {limit} slots of semaphore {key!r} stayed taken for {waited_s:.2f} s; "
            "raise the provider's max_concurrency or give the wait more time"
        )


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
        self._acquire = redis.register_script(_ACQUIRE)
        self._renew = redis.register_script(_RENEW)
        self._count = redis.register_script(_COUNT)

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
