"""What every store shares: its Redis handles, error translation, URLs without passwords.

``LaneStore`` is assembled from parts in their own modules (submitting, reading); each part
is a ``StoreBase`` and reads the handles declared here, as do the dead letters.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode

import redis
from pydantic import BaseModel

from routing.errors import ConfigError, StoreUnavailable
from routing.keys import Keys, lane_of, shard_of
from routing.models import ErrorInfo, LaneSpec, ServiceConfig, StoredResult
from routing.states import LEASED, State
from routing.store.scripts import Scripts

__all__ = [
    "CANCELLABLE",
    "CANCELLED",
    "StoreBase",
    "decision_calls",
    "decode",
    "dumps",
    "redact_url",
    "store_errors",
    "url_errors",
]

#: What a cancelled request's result says, and the states it may be cancelled from.
CANCELLED = ErrorInfo(code="cancelled", message="cancelled by the caller")
CANCELLABLE = (State.QUEUED, *LEASED, State.SUBMITTED)
#: ``settle.lua``'s KEYS, by their names in ``StoreBase.request_keys``.
#: Requests per ``save_decision.lua`` call: a claim's decisions in a few calls, none too long.
DECISION_CHUNK = 500
_SETTLE_KEYS = ("req", "leases", "q", "qage", "delayed", "outbox", "finished", "counts", "notify")


#: Query parameters that carry a credential in Redis, libpq and SQLAlchemy URLs.
_SECRET_PARAMS = frozenset(
    {"password", "passwd", "pwd", "sslpassword", "secret", "token", "access_token", "api_key"}
)


def _redact_query(query: str) -> str:
    pairs = parse_qsl(query, keep_blank_values=True)
    if not any(key.lower() in _SECRET_PARAMS for key, _ in pairs):
        return query
    hidden = [(k, "***" if k.lower() in _SECRET_PARAMS else v) for k, v in pairs]
    return urlencode(hidden, safe="*")


def redact_url(url: str) -> str:
    """Return ``url`` with its password (userinfo, ``?password=`` and the like) as ``***``.

    Every URL that reaches a log line, an error message or the CLI goes through here, so a
    password never leaks. A bare ``user@`` is redacted too: people often put the password there
    by mistake. A password written unencoded may hold ``/``, ``?``, ``#`` or ``@``, which end the
    host part for a URL parser; so the userinfo runs to the last ``@`` unless every ``@`` sits
    before the first of those: redacting too much is better than showing a password.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    netloc_end = min((i for i in map(rest.find, "/?#") if i != -1), default=len(rest))
    netloc = rest[:netloc_end]
    if "@" in rest[netloc_end:]:
        userinfo, _, after = rest.rpartition("@")
    elif "@" in netloc:
        userinfo, _, after = rest.partition("@")
        userinfo, _, host = netloc.rpartition("@")
        after = host + rest[netloc_end:]
    else:
        userinfo, after = "", rest
    if userinfo:
        user, colon, _password = userinfo.partition(":")
        shown_user = f"{user}:***" if colon and not set(user) & set("/?#") else "***"
        after = f"{shown_user}@{after}"
    # The query runs to the end: a '#' inside a password must not hide the rest of it.
    path, question, query = after.partition("?")
    redacted = f"{path}?{_redact_query(query)}" if question else after
    if redacted == rest:
        return url
    return f"{scheme}://{redacted}" if sep else redacted


@contextlib.contextmanager
def url_errors(url: str, variable: str = "MIXBATCH_REDIS_URL") -> Iterator[None]:
    """Turn redis-py's complaint about a malformed URL into a ``ConfigError`` that shows the URL
    redacted. redis-py's own message can quote a piece of the password (an unencoded ``/`` in
    it makes the rest look like a port), so it is left out, and so is the exception chain."""
    try:
        yield
    except ValueError:
        raise ConfigError(
            f"{variable}: {redact_url(url)} is not a valid Redis URL "
            "(redis://[[user]:password@]host[:port][/db]); percent-encode '/', '?', '#', '@' "
            "and ':' in a password (e.g. '/' as %2F)"
        ) from None


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
    #: Shards per lane, learned from every lanes table this store is handed (a submit's, a
    #: claim's, the published config); ``_published_read`` once the published one was read.
    lane_shards: dict[str, int]
    _published_read: bool

    def learn_lanes(self, lanes: Iterable[LaneSpec]) -> None:
        self.lane_shards.update((spec.name, spec.shards) for spec in lanes)

    def shards(self, lane: str) -> range:
        """The shards of ``lane``. A lane this store was never told about is looked up once in
        the published config (``mixbatch up`` and every worker publish it); unknown there too,
        it has one shard: exactly the keys of a lane before sharding."""
        if lane not in self.lane_shards and not self._published_read:
            self._published_read = True
            with store_errors(self.url):
                raw = self.redis.get(self.keys.config())
            if raw is not None:
                self.learn_lanes(ServiceConfig.model_validate_json(raw).lanes)
        return range(self.lane_shards.get(lane, 1))

    def request_keys(self, request_id: str) -> dict[str, str]:
        """Every key a script about one request may touch; all in its lane shard's slot."""
        lane, shard = lane_of(request_id), shard_of(request_id)
        k = self.keys
        return {
            "req": k.request(request_id),
            "q": k.queue(lane, shard),
            "qage": k.queue_age(lane, shard),
            "delayed": k.delayed(lane, shard),
            "leases": k.leases(lane, shard),
            "outbox": k.outbox(lane, shard),
            "finished": k.finished(lane, shard),
            "counts": k.counts(lane, shard),
            "notify": k.notify(request_id),
        }

    def settle_call(
        self,
        request_id: str,
        who: str,
        to: State,
        payload: str,
        now: float,
        from_states: Sequence[State],
        *,
        ready_at: float | None = None,
        gave_up: tuple[str, str] = ("", ""),
        delivered: bool = False,
    ) -> tuple[list[str], list[Any]]:
        """``settle.lua``'s KEYS and ARGV: the one script by which a request finishes (``to`` an
        outcome) or goes back to its lane (``to`` QUEUED). Pure, so every client (the sync store,
        ``routing.async_client``) sends the very same call; ``settle.lua``'s header says the rest.
        """
        k = self.request_keys(request_id)
        keys = [k[name] for name in _SETTLE_KEYS]
        args: list[Any] = [
            request_id,
            who,
            to.value,
            payload,
            repr(now),
            self.result_ttl_s,
            repr(ready_at or now),
            State.QUEUED.value,
            State.CLAIMED.value,
            State.FAILED.value,
            *gave_up,
            State.DELIVERED.value if delivered else "",
            *[s.value for s in from_states],
        ]
        return keys, args

    def cancel_call(self, request_id: str, now: float) -> tuple[list[str], list[Any]]:
        """``settle.lua``'s call that cancels a request wherever it waits (returns
        ``{1, from, CANCELLED}``, ``{0, state}`` when it had finished, ``{}`` when unknown)."""
        result = dumps(StoredResult(error=CANCELLED).stored())
        return self.settle_call(request_id, "", State.CANCELLED, result, now, CANCELLABLE)


def decision_calls(
    keys: Keys, decisions: Mapping[str, BaseModel]
) -> Iterator[tuple[list[str], list[str]]]:
    """``save_decision.lua``'s (KEYS, ARGV) for ``decisions``: one call per lane shard (its
    request hashes share a slot) and ``DECISION_CHUNK`` requests, each distinct record (the
    route choice shares one ``Decision`` per class of requests) serialized and sent once."""
    by_slot: dict[tuple[str, int], list[str]] = {}
    for rid in decisions:
        by_slot.setdefault((lane_of(rid), shard_of(rid)), []).append(rid)
    for ids in by_slot.values():
        for start in range(0, len(ids), DECISION_CHUNK):
            chunk = ids[start : start + DECISION_CHUNK]
            slots: dict[int, int] = {}  # id() of a record -> its 1-based place in ARGV
            records: list[str] = []
            picks: list[str] = []
            for rid in chunk:
                record = decisions[rid]
                place = slots.get(id(record))
                if place is None:
                    records.append(record.model_dump_json())
                    place = slots[id(record)] = len(records)
                picks.append(str(place))
            yield [keys.request(rid) for rid in chunk], [str(len(records)), *records, *picks]
