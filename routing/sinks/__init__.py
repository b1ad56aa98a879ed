"""Result sinks: where a finished request's answer is written back to the caller.

    from routing.sinks import SinkContext, canonical_payload, get_sink_settings, load_sinks, sink_for

    settings = get_sink_settings()
    sinks = load_sinks("config/sinks.toml", settings=settings, namespace="mb")
    context = SinkContext(settings, sinks=sinks, redis=store.redis, namespace="mb", celery_app=app)
    sink_for(request.callback, context).deliver(result, canonical_payload(result))

A callback names a sink of the service's table (``{"sink": "crm"}``: a signed ``webhook``, a
``sql`` table, a Redis ``stream``; ``routing.sinks.table``) or a ``celery`` task of the
caller's. Producers never name URLs, hosts or credentials: the table and the environment hold
them, and the address guard (``routing.sinks.guard``) checks every network target when the
table is loaded and when a delivery connects. Every sink applies a result once per request id,
so at-least-once delivery has an exactly-once effect. Receivers verify webhook signatures with
``verify_signature``.
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
from routing.sinks.table import SinkTable, SqlTarget, StreamTarget, WebhookTarget, load_sinks

__all__ = [
    "AddressRefused",
    "DeliveryError",
    "PayloadTooLarge",
    "Sink",
    "SinkContext",
    "SinkSettings",
    "SinkTable",
    "SqlTarget",
    "StreamTarget",
    "WebhookTarget",
    "canonical_payload",
    "get_sink_settings",
    "load_sinks",
    "reset_sink_settings",
    "sink_for",
    "verify_signature",
]
