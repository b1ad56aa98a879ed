"""Redis stream sink: XADD the result, trimmed with ``MAXLEN ~ N``, once per request id.

Each entry has the fields ``id``, ``custom_id``, ``tenant``, ``status`` and ``payload`` (the
result as JSON). A reader can rely on one entry per request id: the append and a marker key
remembering it are one Lua script, so a second delivery of the same id finds the marker and
appends nothing. The marker shares the stream's hash slot, so this holds on Redis Cluster too,
and it lives ``MIXBATCH_STREAM_MARKER_TTL_S`` (7 days by default).
"""

from __future__ import annotations

import redis
from redis.commands.core import Script

from routing.models import Result, StreamCallback
from routing.sinks.base import DeliveryError, Sink
from routing.sinks.settings import SinkSettings

__all__ = ["APPEND_ONCE_LUA", "StreamSink", "marker_key"]

APPEND_ONCE_LUA = """
-- append_once: add a result to a stream unless this request id was added before.
-- KEYS[1] stream  KEYS[2] marker (same hash slot)
-- ARGV[1] maxlen (approximate)  ARGV[2] marker ttl_s  ARGV[3..] field, value pairs
-- returns {1, entry_id} appended, {0, entry_id} already there
local seen = redis.call('GET', KEYS[2])
if seen then return {0, seen} end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', unpack(ARGV, 3))
redis.call('SET', KEYS[2], id, 'EX', ARGV[2])
return {1, id}
"""


def _hash_tag(key: str) -> str:
    """What Redis Cluster hashes for ``key``: its ``{tag}`` if it has a non-empty one."""
    start = key.find("{")
    if start != -1:
        end = key.find("}", start + 1)
        if end > start + 1:
            return key[start + 1 : end]
    return key


def marker_key(namespace: str, stream: str, request_id: str) -> str:
    """The key remembering that ``request_id`` is in ``stream``, in the stream's hash slot."""
    return f"{namespace}:stream-once:{{{_hash_tag(stream)}}}:{stream}:{request_id}"


class StreamSink(Sink):
    kind = "stream"

    def __init__(
        self,
        spec: StreamCallback,
        *,
        settings: SinkSettings,
        client: redis.Redis,
        script: Script,
        namespace: str,
        own_redis: bool,
    ) -> None:
        super().__init__(max_payload_bytes=settings.payload_limit(self.kind))
        self.spec = spec
        self.client = client
        self.script = script
        self.namespace = namespace
        self.maxlen = spec.maxlen or settings.stream_maxlen
        self.marker_ttl_s = settings.stream_marker_ttl_s
        self.own_redis = own_redis

    def write(self, result: Result, payload: bytes) -> None:
        key = self.spec.key
        if self.own_redis and key.startswith(f"{self.namespace}:"):
            raise DeliveryError(
                f"stream key {key!r} is inside mixbatch's own key namespace "
                f"({self.namespace}:); choose another key",
                sink=self.kind,
                retryable=False,
                code="bad_stream_key",
            )
        fields = {
            "id": result.id,
            "custom_id": result.custom_id or "",
            "tenant": result.tenant,
            "status": result.status.value,
        }
        args: list[str | bytes | int] = [self.maxlen, self.marker_ttl_s]
        for name, value in fields.items():
            args += [name, value]
        args += ["payload", payload]
        try:
            self.script(
                keys=[key, marker_key(self.namespace, key, result.id)],
                args=args,
                client=self.client,
            )
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise DeliveryError(
                f"cannot reach the stream's Redis ({exc})",
                sink=self.kind,
                retryable=True,
                code="redis_unavailable",
            ) from None
        except redis.ResponseError as exc:
            raise DeliveryError(
                f"Redis refused XADD to {key!r} ({exc})",
                sink=self.kind,
                retryable="BUSY" in str(exc) or "LOADING" in str(exc),
                code="redis_refused",
            ) from None
