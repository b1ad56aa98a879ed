"""Webhook signatures: what mixbatch sends and what a receiver checks. Standard library only,
so a receiver can import it without the rest of mixbatch's dependencies mattering.

The header is ``Mixbatch-Signature: t=<unix seconds>,v1=<hex>``, where ``<hex>`` is the
HMAC-SHA256 of ``"<t>.<raw body>"`` under the tenant's secret. Signing the timestamp with the
body lets a receiver refuse a replay of an old, validly signed delivery; several ``v1=``
entries may appear (one per secret while a secret is being rotated) and any match is enough.
"""

from __future__ import annotations

import hashlib
import hmac
import time

__all__ = [
    "REQUEST_ID_HEADER",
    "SIGNATURE_HEADER",
    "sign",
    "signature_header",
    "verify_signature",
]

SIGNATURE_HEADER = "Mixbatch-Signature"
REQUEST_ID_HEADER = "Mixbatch-Request-Id"


def _key(secret: str | bytes) -> bytes:
    return secret.encode() if isinstance(secret, str) else secret


def sign(secret: str | bytes, timestamp: int, body: bytes) -> str:
    """Hex HMAC-SHA256 of ``"<timestamp>.<body>"``."""
    message = str(timestamp).encode() + b"." + body
    return hmac.new(_key(secret), message, hashlib.sha256).hexdigest()


def signature_header(secret: str | bytes, body: bytes, *, timestamp: int | None = None) -> str:
    t = int(time.time()) if timestamp is None else timestamp
    return f"t={t},v1={sign(secret, t, body)}"


def verify_signature(
    secret: str | bytes,
    header: str | None,
    body: bytes,
    tolerance: float = 300,
    *,
    now: float | None = None,
) -> bool:
    """True if ``header`` signs ``body`` with ``secret`` and its time is within ``tolerance``.

    For receivers: pass the raw request body, byte for byte, before any JSON parsing. The
    comparison is constant-time. A timestamp more than ``tolerance`` seconds away from ``now``
    (either way) is refused, so a captured delivery cannot be replayed later; the receiver
    should still apply each ``Mixbatch-Request-Id`` once, since mixbatch may deliver again.
    Any malformed header gives False rather than an exception.
    """
    if not header or not isinstance(body, bytes | bytearray):
        return False
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep:
            return False
        if name == "t":
            try:
                timestamp = int(value)
            except ValueError:
                return False
        elif name == "v1":
            candidates.append(value)
    if timestamp is None or not candidates:
        return False
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance:
        return False
    expected = sign(secret, timestamp, bytes(body))
    ok = False
    for candidate in candidates:
        # Compare every candidate, so the time taken does not tell which one matched.
        ok |= hmac.compare_digest(expected.encode(), candidate.encode("ascii", "replace"))
    return ok
