"""Result sinks: where a finished request's answer is written back to the caller.

    from routing.sinks import SinkContext, SinkSettings, canonical_payload, sink_for

    context = SinkContext(SinkSettings(), redis=store.redis, namespace="mb", celery_app=app)
    sink_for(request.callback, context).deliver(result, canonical_payload(result))

Four sinks, chosen by the callback's ``kind``: ``celery`` (a task of the caller's),
``webhook`` (signed HTTP POST), ``sql`` (upsert into a table) and ``stream`` (Redis XADD).
Every one applies a result once per request id, so at-least-once delivery has an exactly-once
effect. Receivers verify webhook signatures with ``verify_signature``.
"""

from __future__ import annotations

from routing.sinks.base import (
    AddressRefused,
    DeliveryError,
    PayloadTooLarge,
    Sink,
    canonical_payload,
)
from routing.sinks.factory import SinkContext, sink_for
from routing.sinks.settings import SinkSettings, get_sink_settings, reset_sink_settings
from routing.sinks.signing import verify_signature

__all__ = [
    "AddressRefused",
    "DeliveryError",
    "PayloadTooLarge",
    "Sink",
    "SinkContext",
    "SinkSettings",
    "canonical_payload",
    "get_sink_settings",
    "reset_sink_settings",
    "sink_for",
    "verify_signature",
]
