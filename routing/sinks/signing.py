"""Webhook signatures per Standard Webhooks (https://www.standardwebhooks.com). Standard library
only, so a receiver can import it without the rest of mixbatch's dependencies mattering; any of
the spec's own libraries (``pip install standardwebhooks``: ``Webhook(secret).verify(body,
headers)``) verifies the same deliveries.

Every delivery carries three headers:

    webhook-id          the request id: the same on every retry, so it is the idempotency key
    webhook-timestamp   unix seconds when this attempt was signed
    webhook-signature   ``v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">``, one per
                        active secret, space-separated (two while a secret is being rotated)

A secret is ``whsec_`` and the base64 of its key bytes (``new_secret()`` makes one). Signing the
id and the timestamp with the body lets a receiver refuse a replay of an old delivery, and a
delivery moved to another request id.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Iterable, Mapping, Sequence
from secrets import token_bytes

__all__ = [
    "ID_HEADER",
    "SECRET_PREFIX",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "new_secret",
    "secret_key",
    "sign",
    "verify_signature",
    "webhook_headers",
]

ID_HEADER = "webhook-id"
TIMESTAMP_HEADER = "webhook-timestamp"
SIGNATURE_HEADER = "webhook-signature"
SECRET_PREFIX = "whsec_"
#: How far a timestamp may be from the receiver's clock, either way (the spec's five minutes).
DEFAULT_TOLERANCE_S = 300.0

Secret = str | bytes


def new_secret(n_bytes: int = 32) -> str:
    """A fresh ``whsec_...`` secret, for the sink table's environment variable."""
    return SECRET_PREFIX + base64.b64encode(token_bytes(n_bytes)).decode()


def secret_key(secret: Secret) -> bytes:
    """The HMAC key of ``secret``: ``whsec_<base64>`` (or the bare base64) decoded; bytes are
    taken as the key itself. ``ValueError`` (without the secret in it) when it is not base64."""
    if isinstance(secret, bytes | bytearray):
        key = bytes(secret)
    else:
        text = secret.strip().removeprefix(SECRET_PREFIX)
        try:
            key = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(
                "a webhook secret is 'whsec_' followed by base64 (Standard Webhooks); "
                "make one with: python -c 'from routing.sinks.signing import new_secret; "
                "print(new_secret())'"
            ) from None
    if not key:
        raise ValueError("a webhook secret may not be empty")
    return key


def sign(secret: Secret, msg_id: str, timestamp: int, body: bytes) -> str:
    """``v1,<base64>``: the spec's signature of one delivery under one secret."""
    message = f"{msg_id}.{timestamp}.".encode() + bytes(body)
    digest = hmac.new(secret_key(secret), message, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def webhook_headers(
    secrets: Sequence[Secret], msg_id: str, body: bytes, *, timestamp: int | None = None
) -> dict[str, str]:
    """The three headers of one delivery, signed with every active secret (current first)."""
    if not secrets:
        raise ValueError("no secret to sign with")
    t = int(time.time()) if timestamp is None else int(timestamp)
    return {
        ID_HEADER: msg_id,
        TIMESTAMP_HEADER: str(t),
        SIGNATURE_HEADER: " ".join(sign(s, msg_id, t, body) for s in secrets),
    }


def _lower(headers: Mapping[str, str] | Iterable[tuple[str, str]]) -> dict[str, str]:
    items = headers.items() if isinstance(headers, Mapping) else headers
    return {str(k).lower(): str(v) for k, v in items}


def verify_signature(
    secret: Secret | Sequence[Secret],
    headers: Mapping[str, str] | Iterable[tuple[str, str]],
    body: bytes,
    tolerance: float = DEFAULT_TOLERANCE_S,
    *,
    now: float | None = None,
) -> bool:
    """True if ``headers`` sign ``body`` under ``secret`` (or any of several, during a rotation)
    and their timestamp is within ``tolerance`` seconds of ``now``, either way.

    For receivers: pass the raw request body, byte for byte, before any JSON parsing, and the
    request's headers (any case). The comparison is constant-time; a malformed or missing header
    gives False, never an exception. A valid delivery may still come again (mixbatch delivers at
    least once): apply each ``webhook-id`` once.
    """
    if not isinstance(body, bytes | bytearray):
        return False
    h = _lower(headers)
    msg_id, stamp, signatures = h.get(ID_HEADER), h.get(TIMESTAMP_HEADER), h.get(SIGNATURE_HEADER)
    if not (msg_id and stamp and signatures) or not stamp.isascii() or not stamp.isdigit():
        return False
    current = time.time() if now is None else now
    if abs(current - int(stamp)) > tolerance:
        return False
    keys = [secret] if isinstance(secret, str | bytes | bytearray) else list(secret)
    try:
        expected = [sign(k, msg_id, int(stamp), bytes(body)).encode() for k in keys]
    except ValueError:
        return False
    ok = False
    for candidate in signatures.split(" "):
        given = candidate.encode("ascii", "replace")
        for want in expected:
            # Compare every pair, so the time taken does not tell which one matched.
            ok |= hmac.compare_digest(want, given)
    return ok
