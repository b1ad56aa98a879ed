"""What every sink shares: the payload, the one verb, and the errors a delivery can end in.

A sink is the outward edge of delivery. ``Sink.deliver`` does the bookkeeping every sink needs
(the size check); a backend's ``write`` does only its I/O and translates its library's errors
into ``DeliveryError`` once, saying whether trying again may help. ``routing.engine.deliver`` holds
the retry policy and never looks at httpx, SQLAlchemy or redis-py exceptions.

    MixbatchError
    └── DeliveryError           a sink did not take the result (``retryable`` says if later may)
        ├── PayloadTooLarge     over the sink's byte limit (never retryable: it will not shrink)
        └── AddressRefused      a webhook resolves to a refused address (SSRF guard)
"""

from __future__ import annotations

import abc
import json
from typing import ClassVar

from routing.errors import MixbatchError
from routing.models import ErrorInfo, Result

__all__ = ["AddressRefused", "DeliveryError", "PayloadTooLarge", "Sink", "canonical_payload"]


class DeliveryError(MixbatchError):
    """A sink did not take a result. ``code`` is short and stable; the message names the sink.

    ``retryable`` is False when another try cannot succeed without someone changing something
    (a 4xx answer, a refused address, a missing secret): such a delivery goes straight to the
    dead-letter list, where ``mixbatch dlq replay`` sends it again once it is fixed.
    """

    def __init__(
        self,
        message: str,
        *,
        sink: str,
        retryable: bool,
        code: str = "delivery_failed",
        status_code: int | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        self.sink = sink
        self.retryable = retryable
        self.code = code
        self.status_code = status_code
        self.retry_after_s = retry_after_s
        super().__init__(f"{sink} sink: {message}")

    def to_error_info(self) -> ErrorInfo:
        """The shape the store keeps as the delivery's last error."""
        return ErrorInfo(
            code=self.code,
            message=str(self),
            retryable=self.retryable,
            status_code=self.status_code,
        )


class PayloadTooLarge(DeliveryError):
    def __init__(self, sink: str, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__(
            f"the result is {size} bytes, over this sink's limit of {limit} "
            "(MIXBATCH_MAX_PAYLOAD_BYTES, or MIXBATCH_SINK_MAX_PAYLOAD_BYTES per sink); "
            "the result stays stored and can be read by id",
            sink=sink,
            retryable=False,
            code="payload_too_large",
        )


class AddressRefused(DeliveryError):
    def __init__(self, message: str, *, sink: str = "webhook") -> None:
        super().__init__(message, sink=sink, retryable=False, code="address_refused")


def canonical_payload(result: Result) -> bytes:
    """The bytes every sink delivers: the result as compact JSON with sorted keys.

    One canonical form means a webhook's signature, a stream entry and a SQL row all describe
    the same bytes, and delivering the same result twice produces the same payload.
    """
    data = result.model_dump(mode="json")
    return json.dumps(data, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode()


class Sink(abc.ABC):
    """One place a result can be written back to. Subclasses implement ``write`` (I/O only).

    Delivery is at-least-once, so every ``write`` must apply a result once per request id:
    by an upsert, an idempotency key the receiver honours, or a check in the same atomic step.
    """

    kind: ClassVar[str]

    def __init__(self, *, max_payload_bytes: int) -> None:
        self.max_payload_bytes = max_payload_bytes

    def deliver(self, result: Result, payload: bytes) -> None:
        """Write ``payload`` (``canonical_payload(result)``) or raise ``DeliveryError``."""
        if len(payload) > self.max_payload_bytes:
            raise PayloadTooLarge(self.kind, len(payload), self.max_payload_bytes)
        self.write(result, payload)

    @abc.abstractmethod
    def write(self, result: Result, payload: bytes) -> None:
        """Do the I/O; translate the library's errors into ``DeliveryError``."""
