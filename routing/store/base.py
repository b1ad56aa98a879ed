"""What every store shares: its Redis handles, error translation, URLs without passwords.

``LaneStore`` is assembled from parts in their own modules (submitting, reading); each part
is a ``StoreBase`` and reads the handles declared here, as do the dead letters.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import redis

from routing.errors import StoreUnavailable
from routing.keys import Keys, lane_of
from routing.store.scripts import Scripts

__all__ = ["StoreBase", "decode", "dumps", "redact_url", "store_errors"]


def redact_url(url: str) -> str:
    """Return ``url`` with its password (userinfo or ``?password=``) replaced by ``***``.

    Every URL that reaches a log line, an error message or the CLI goes through here, so a
    Redis password never leaks. A bare ``user@`` is redacted too: people often put the
    password there by mistake.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    netloc = parts.netloc
    userinfo, at, hostport = netloc.rpartition("@")
    if at:
        user, colon, _password = userinfo.partition(":")
        netloc = f"{user}:***@{hostport}" if colon else f"***@{hostport}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(key.lower() == "password" for key, _ in pairs):
            query = urlencode(
                [(key, "***" if key.lower() == "password" else value) for key, value in pairs],
                safe="*",
            )
    if netloc == parts.netloc and query == parts.query:
        return url
    rebuilt = (
        f"{parts.scheme}://{netloc}{parts.path}" if parts.scheme else f"//{netloc}{parts.path}"
    )
    if query:
        rebuilt += f"?{query}"
    if parts.fragment:
        rebuilt += f"#{parts.fragment}"
    return rebuilt


@contextlib.contextmanager
def store_errors(url: str) -> Iterator[None]:
    """Translate redis-py's connection errors once, naming the URL without its password."""
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise StoreUnavailable(
            f"cannot reach Redis at {redact_url(url)} ({exc}); is it running? "
            "Set MIXBATCH_REDIS_URL, or leave it unset to use the embedded Redis"
        ) from exc


def decode(value: Any) -> str:
    """A Redis reply (bytes) or a number as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


def dumps(value: Any) -> str:
    """Compact JSON, the form every JSON value the store writes takes."""
    return json.dumps(value, separators=(",", ":"), default=str)


class StoreBase:
    """The handles of one lane store, shared by its parts."""

    redis: redis.Redis
    keys: Keys
    url: str
    result_ttl_s: int
    cluster: bool
    scripts: Scripts

    def request_keys(self, request_id: str) -> dict[str, str]:
        """Every key a script about one request may touch; all in its lane's slot."""
        lane = lane_of(request_id)
        k = self.keys
        return {
            "req": k.request(request_id),
            "q": k.queue(lane),
            "qage": k.queue_age(lane),
            "delayed": k.delayed(lane),
            "leases": k.leases(lane),
            "outbox": k.outbox(lane),
            "finished": k.finished(lane),
            "counts": k.counts(lane),
            "notify": k.notify(request_id),
        }
