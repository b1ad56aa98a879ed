"""Redis stream sink: XADD the result, trimmed with ``MAXLEN ~ N``, once per request id.

The stream is a named sink of the service's table (``kind = "stream"``, ``key``, ``maxlen``
and, for a Redis other than the service's, ``url_env``). The key is checked when the table is
loaded (no control characters, braces only as a hash tag, nothing under mixbatch's own
``<namespace>:``, ``maxlen`` at most ``MIXBATCH_STREAM_MAXLEN_CEILING``) and the namespace
again here, before each write.

Each entry has the fields ``id``, ``custom_id``, ``tenant``, ``status`` and ``payload`` (the
result as JSON). A reader can rely on one entry per request id: the append and a marker key
remembering it are one Lua script (``stream_append_once``), so a second delivery of the same id
finds the marker and appends nothing. The marker shares the stream's hash slot, so this holds on Redis Cluster too,
and it lives ``MIXBATCH_STREAM_MARKER_TTL_S`` (7 days by default).
"""

from __future__ import annotations

import redis
from redis.commands.core import Script

from routing.keys import Keys
from routing.models import Result
from routing.sinks.base import DeliveryError, Sink
from routing.sinks.settings import SinkSettings
from routing.sinks.table import StreamTarget

__all__ = ["StreamSink"]


class StreamSink(Sink):
    kind = "stream"

    def __init__(
        self,
        target: StreamTarget,
        *,
        settings: SinkSettings,
        client: redis.Redis,
        script: Script,
        namespace: str,
        own_redis: bool,
    ) -> None:
        super().__init__(max_payload_bytes=settings.payload_limit(self.kind))
        self.target = target
        self.client = client
        self.script = script
        self.namespace = namespace
        self.keys = Keys(namespace)
        self.maxlen = min(target.maxlen or settings.stream_maxlen, settings.stream_maxlen_ceiling)
        self.marker_ttl_s = settings.stream_marker_ttl_s
        self.own_redis = own_redis

    def write(self, result: Result, payload: bytes) -> None:
        key = self.target.key
        if key.startswith(f"{self.namespace}:"):
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
                keys=[key, self.keys.stream_marker(key, result.id)],
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
