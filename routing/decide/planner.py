"""Provider-batch planning: which claimed requests go into which provider batch, and the files.

Everything here is pure: requests, caps and ``now`` come in as arguments and a plan comes out,
so the aggregator's choices can be table-tested and benchmarked without Redis, HTTP or a clock.

How a plan is made (``plan_batches``):

1. Requests are grouped by provider account, endpoint and, where the provider wants one model
   per file (OpenAI), model. Anthropic batches may mix models, so their groups do not split on it.
2. Inside a group requests are ordered earliest deadline first (ties by id), so when a group is
   larger than one batch the most urgent requests ride in the first one.
3. Identical requests (same endpoint, model and canonical JSON body) are sent once: the line
   carries the first (most urgent) request's id as its ``custom_id`` and the answer fans out to
   every requester through ``PlannedBatch.fanout``. Pass ``dedupe=False`` where identical
   bodies are meant to be sampled independently (temperature > 0 evals).
4. Lines are packed in order into batches of about ``target_bytes``, never past the provider's
   caps on lines, bytes and embedding inputs. A line that alone breaks a cap is not planned; its
   requests come back in ``Plan.rejected`` with the reason, for the caller to fail them.

Byte counts are exact: a line's size is the length of the very bytes ``write_openai_jsonl`` (or ``write_anthropic_body``) will write, because both serialise the
body with the same encoder. Bodies are serialised twice (once to size, once to write) rather than
kept, so memory holds one line at a time, not the whole group.

``PlannedBatch.fanout`` maps each line's wire ``custom_id`` to the ids of the requests it
answers. It is the only way back from a provider's result line to our requests (Anthropic ids
are rewritten to fit its ``custom_id`` pattern), so the caller stores it durably, with the
batch key, before it uploads anything.

Flush policy (``should_flush``) and submit windows (``window_due``, a small 5-field cron matcher)
live here too, for the same reason: the aggregator asks, these functions answer.
"""

from __future__ import annotations

import calendar
import functools
import hashlib
import json
import re
import sys
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, tzinfo
from json.encoder import encode_basestring
from typing import Any, BinaryIO, Final, Literal

from pydantic import BaseModel, ConfigDict, Field

from routing.errors import ConfigError
from routing.models import Claimed, Endpoint, Prepared

__all__ = [
    "ANTHROPIC_CAPS",
    "DEFAULT_TARGET_BYTES",
    "FLUSH_REASONS",
    "OPENAI_CAPS",
    "PROTOCOL_ENDPOINTS",
    "BatchCaps",
    "BatchProtocol",
    "Plan",
    "PlannedBatch",
    "anthropic_custom_id",
    "anthropic_requests",
    "body_bytes",
    "check_window",
    "openai_lines",
    "plan_batches",
    "should_flush",
    "window_due",
    "write_anthropic_body",
    "write_openai_jsonl",
]

BatchProtocol = Literal["openai", "anthropic"]

MB: Final = 1_000_000
"""Provider limits are read as decimal megabytes: the smaller reading, so a batch never lands in
the 5 % between 200 * 10**6 and 200 * 2**20 bytes that one reading allows and the other does not."""

DEFAULT_TARGET_BYTES: Final = 20 * 1024 * 1024


class BatchCaps(BaseModel):
    """What one provider accepts in one batch; ``None`` means the provider sets no such cap."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_lines: int = Field(gt=0)
    max_bytes: int = Field(gt=0)
    one_model_per_batch: bool
    max_line_bytes: int | None = Field(default=None, gt=0)
    max_embedding_inputs: int | None = Field(default=None, gt=0)


OPENAI_CAPS: Final = BatchCaps(
    max_lines=50_000,
    max_bytes=200 * MB,
    one_model_per_batch=True,
    max_embedding_inputs=50_000,
)
"""OpenAI Batch API (reference §0, §1.1, §1.2): 50,000 lines, 200 MB input file, one model per
file, and embedding batches at most 50,000 inputs in total."""

ANTHROPIC_CAPS: Final = BatchCaps(
    max_lines=100_000,
    max_bytes=256 * MB,
    one_model_per_batch=False,
)
"""Anthropic Message Batches (reference §2.1): 100,000 requests and 256 MB for the whole create
body (a 413 past it); models may differ between requests."""

PROTOCOL_ENDPOINTS: Final[dict[str, frozenset[Endpoint]]] = {
    "openai": frozenset({Endpoint.CHAT, Endpoint.EMBEDDINGS, Endpoint.RESPONSES}),
    "anthropic": frozenset({Endpoint.MESSAGES}),
}
"""Endpoints each batch protocol can carry; anything else is a routing mistake, rejected."""

_encode = json.JSONEncoder(
    ensure_ascii=False, separators=(",", ":"), sort_keys=True, allow_nan=False
).encode


def body_bytes(body: dict[str, Any]) -> bytes:
    """The canonical JSON of a body: sorted keys, no spaces, UTF-8.

    Canonical so that two requests that differ only in key order dedupe, and so that the size
    the planner counts is the size the builder writes. ``allow_nan=False`` because providers
    reject ``NaN`` in JSON; such a body is rejected at planning rather than failing a batch.
    """
    return _encode(body).encode()


_OPENAI_HEAD = b'{"custom_id":'
_OPENAI_MID = b',"method":"POST","url":'
_OPENAI_BODY = b',"body":'
_OPENAI_TAIL = b"}\n"
_ANTHROPIC_HEAD = b'{"custom_id":'
_ANTHROPIC_PARAMS = b',"params":'
_ANTHROPIC_TAIL = b"}"
_ANTHROPIC_OPEN = b'{"requests":['
_ANTHROPIC_CLOSE = b"]}"

_ANTHROPIC_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_REQUEST_ID = re.compile(r"^([a-z0-9][a-z0-9_-]{0,31})\.([0-9A-HJKMNP-TV-Z]{26})$")


def anthropic_custom_id(request_id: str) -> str:
    """An id matching Anthropic's ``^[a-zA-Z0-9_-]{1,64}$`` for one of our request ids.

    A mixbatch id ``lane.ULID`` becomes ``lane-ULID`` (at most 59 characters, still readable in
    Anthropic's console); anything else becomes ``h-`` and 48 hex digits of its BLAKE2b hash.
    The two forms cannot collide: the first always has ``-`` 27 characters from the end, the
    second a hex digit. The way back is the batch's stored ``fanout``, never string surgery.
    """
    match = _REQUEST_ID.match(request_id)
    if match:
        return f"{match[1]}-{match[2]}"
    return "h-" + hashlib.blake2b(request_id.encode(), digest_size=24).hexdigest()


class PlannedBatch(BaseModel):
    """One provider batch to create: what goes in it and how its answers map back.

    ``fanout`` is ordered as the lines are written (earliest deadline first); each value starts
    with the request whose body the line sends. ``request_ids`` lists every request the batch
    answers, line senders first. ``estimated_bytes`` is the exact size of the JSONL file
    (OpenAI) or of the create request body (Anthropic) that the writers here produce. ``model``
    is ``None`` only for an Anthropic batch that mixes models; ``models`` names them all.
    """

    model_config = ConfigDict(frozen=True)

    key: str
    provider: str
    protocol: BatchProtocol
    endpoint: Endpoint
    model: str | None
    models: tuple[str, ...]
    lanes: tuple[str, ...]
    tenants: tuple[str, ...]
    request_ids: tuple[str, ...]
    line_count: int
    estimated_bytes: int
    tightest_deadline: float
    fanout: dict[str, tuple[str, ...]]

    def request_ids_for(self, custom_id: str) -> tuple[str, ...]:
        """Every request a provider result line answers; ``KeyError`` for an id not ours."""
        return self.fanout[custom_id]


class Plan(BaseModel):
    """Batches to submit, most urgent first, and requests that cannot go in any batch."""

    batches: list[PlannedBatch]
    rejected: dict[str, str]


def _embedding_inputs(body: dict[str, Any]) -> int:
    """How many inputs an embeddings body carries, for OpenAI's 50,000-inputs-a-batch cap."""
    given = body.get("input")
    if isinstance(given, list) and given and not isinstance(given[0], int):
        return len(given)
    return 1


def _batch_key(provider: str, endpoint: Endpoint, models: Sequence[str], ids: list[str]) -> str:
    """Same account, endpoint, models and ids give the same key, whatever order they came in."""
    digest = hashlib.blake2b(digest_size=10)
    digest.update(f"{provider}\0{endpoint.value}\0{','.join(models)}\0".encode())
    digest.update("\n".join(sorted(ids)).encode())
    return digest.hexdigest()


def _envelope(protocol: BatchProtocol, endpoint: Endpoint) -> int:
    """Bytes a line adds around its body and custom_id: JSONL keys and newline, or Anthropic's
    item keys and the comma that separates items."""
    if protocol == "openai":
        url = len(_encode(endpoint.value).encode())
        return len(_OPENAI_HEAD) + len(_OPENAI_MID) + url + len(_OPENAI_BODY) + len(_OPENAI_TAIL)
    return len(_ANTHROPIC_HEAD) + len(_ANTHROPIC_PARAMS) + len(_ANTHROPIC_TAIL) + 1


def _file_overhead(protocol: BatchProtocol) -> int:
    """Bytes a batch adds once: Anthropic's ``{"requests":[...]}`` less the comma not written."""
    if protocol == "openai":
        return 0
    return len(_ANTHROPIC_OPEN) + len(_ANTHROPIC_CLOSE) - 1


@dataclass(slots=True)
class _Group:
    """One group's requests as parallel columns, in input order, each body measured once.

    Columns rather than an object per request: at 100,000 requests the allocations, and the
    garbage-collector passes they trigger, cost more than the planning itself; numbers sit in
    arrays, 8 bytes each, rather than as Python objects in lists. Bodies are
    measured in the order the caller holds them (the order they were loaded, so close together
    in memory) rather than after the deadline sort has scattered the accesses.
    """

    protocol: BatchProtocol
    caps: BatchCaps
    ids: list[str] = field(default_factory=list)
    deadlines: array[float] = field(default_factory=lambda: array("d"))
    body_sizes: array[int] = field(default_factory=lambda: array("q"))
    digests: list[bytes] = field(default_factory=list)
    inputs: array[int] = field(default_factory=lambda: array("q"))
    tags: array[int] = field(default_factory=lambda: array("q"))
    """Index of each request's (model, lane, tenant) in the plan's list of kinds, so a batch
    finds its models, lanes and tenants from a set of small ints."""


@dataclass(slots=True)
class _Lines:
    """A group's unique lines in deadline order, as columns; indexes below are into ``_Group``."""

    custom_ids: list[str] = field(default_factory=list)
    sizes: array[int] = field(default_factory=lambda: array("q"))
    deadlines: array[float] = field(default_factory=lambda: array("d"))
    inputs: array[int] = field(default_factory=lambda: array("q"))
    ids: list[str] = field(default_factory=list)
    tags: array[int] = field(default_factory=lambda: array("q"))
    twins: dict[int, list[int]] = field(default_factory=dict)
    """Line index to the group rows of the further requests it answers (duplicates only)."""


def _refusal(size: int, inputs: int, caps: BatchCaps, room: int) -> str | None:
    """Why a line cannot go in any batch of this provider, or ``None`` if it can."""
    if caps.max_line_bytes is not None and size > caps.max_line_bytes:
        return f"line of {size} bytes is over the provider's {caps.max_line_bytes}-byte cap"
    if size > room:
        return f"line of {size} bytes does not fit the provider's {caps.max_bytes}-byte cap"
    if caps.max_embedding_inputs is not None and inputs > caps.max_embedding_inputs:
        return f"{inputs} embedding inputs; a batch takes at most {caps.max_embedding_inputs}"
    return None


def _build_lines(
    group: _Group, endpoint: Endpoint, *, dedupe: bool, rejected: dict[str, str]
) -> _Lines:
    """The group's rows, earliest deadline first, as unique lines; oversized ones rejected.

    This loop runs once per request, so the cap checks are folded into two comparisons and the
    reasons are worked out only for the rare line that fails them.
    """
    caps, protocol = group.caps, group.protocol
    order = sorted(range(len(group.ids)), key=group.ids.__getitem__)
    order.sort(key=group.deadlines.__getitem__)
    lines = _Lines()
    by_body: dict[bytes, int] = {}
    refused: dict[bytes, str] = {}
    room = caps.max_bytes - _file_overhead(protocol)
    size_limit = min(room, caps.max_line_bytes or room)
    inputs_limit = caps.max_embedding_inputs or sys.maxsize
    envelope = _envelope(protocol, endpoint)
    openai = protocol == "openai"
    ids, digests, body_sizes, all_inputs = group.ids, group.digests, group.body_sizes, group.inputs
    for row in order:
        request_id = ids[row]
        digest = digests[row]
        if dedupe:
            index = by_body.get(digest)
            if index is not None:
                lines.twins.setdefault(index, []).append(row)
                continue
            if digest in refused:
                rejected[request_id] = refused[digest]
                continue
        custom_id = request_id if openai else anthropic_custom_id(request_id)
        size = body_sizes[row] + envelope + len(encode_basestring(custom_id).encode())
        inputs = all_inputs[row]
        if size > size_limit or inputs > inputs_limit:
            reason = _refusal(size, inputs, caps, room) or "over the provider's caps"
            rejected[request_id] = refused[digest] = reason
            continue
        if dedupe:
            by_body[digest] = len(lines.sizes)
        lines.custom_ids.append(custom_id)
        lines.sizes.append(size)
        lines.deadlines.append(group.deadlines[row])
        lines.inputs.append(inputs)
        lines.ids.append(request_id)
        lines.tags.append(group.tags[row])
    return lines


def _ranges(
    lines: _Lines, caps: BatchCaps, target_bytes: int, overhead: int
) -> Iterator[tuple[int, int]]:
    """Pack lines in order: a batch closes before the line that would pass a cap or the target."""
    limit = min(target_bytes, caps.max_bytes)
    max_inputs = caps.max_embedding_inputs
    max_lines = caps.max_lines
    start = 0
    size = overhead
    inputs = 0
    for i, (line_size, line_inputs) in enumerate(zip(lines.sizes, lines.inputs, strict=True)):
        if i > start and (
            i - start >= max_lines
            or size + line_size > limit
            or (max_inputs is not None and inputs + line_inputs > max_inputs)
        ):
            yield start, i
            start, size, inputs = i, overhead, 0
        size += line_size
        inputs += line_inputs
    if start < len(lines.sizes):
        yield start, len(lines.sizes)


def _make_batch(
    provider: str,
    endpoint: Endpoint,
    group: _Group,
    lines: _Lines,
    span: tuple[int, int],
    kinds: list[tuple[str, str, str]],
) -> PlannedBatch:
    start, end = span
    overhead = _file_overhead(group.protocol)
    ids = lines.ids[start:end]
    fanout: dict[str, tuple[str, ...]] = dict(
        zip(lines.custom_ids[start:end], [(i,) for i in ids], strict=True)
    )
    tags = set(lines.tags[start:end])
    for index, rows in lines.twins.items():
        if start <= index < end:
            twin_ids = [group.ids[row] for row in rows]
            fanout[lines.custom_ids[index]] += tuple(twin_ids)
            ids.extend(twin_ids)
            tags.update(group.tags[row] for row in rows)
    present = [kinds[tag] for tag in tags]
    models = tuple(sorted({model for model, _, _ in present}))
    # model_construct: every field is built here from validated requests, and re-validating a
    # 50,000-entry fanout would cost more than the rest of planning.
    return PlannedBatch.model_construct(
        key=_batch_key(provider, endpoint, models, ids),
        provider=provider,
        protocol=group.protocol,
        endpoint=endpoint,
        model=models[0] if len(models) == 1 else None,
        models=models,
        lanes=tuple(sorted({lane for _, lane, _ in present})),
        tenants=tuple(sorted({tenant for _, _, tenant in present})),
        request_ids=tuple(ids),
        line_count=end - start,
        estimated_bytes=overhead + sum(lines.sizes[start:end]),
        tightest_deadline=min(lines.deadlines[start:end]),
        fanout=fanout,
    )


def plan_batches(
    items: Sequence[Claimed],
    *,
    provider_of: Callable[[Prepared], str],
    protocol_of: Callable[[str], BatchProtocol],
    caps_of: Callable[[str], BatchCaps],
    target_bytes: int = DEFAULT_TARGET_BYTES,
    dedupe: bool = True,
) -> Plan:
    """Group, order, dedupe and chunk claimed requests into provider batches.

    ``provider_of`` names the account a request goes to; ``protocol_of`` and ``caps_of`` describe
    that account. A batch aims at ``target_bytes`` (smaller files start sooner and lose less when
    one fails) and never passes the account's caps. A request id given twice is planned once.
    Batches come back most urgent first; ``rejected`` maps request ids to why they were left out.
    """
    if target_bytes <= 0:
        raise ValueError(f"target_bytes must be positive, not {target_bytes}")
    rejected: dict[str, str] = {}
    accounts: dict[str, tuple[BatchProtocol, BatchCaps]] = {}
    groups: dict[tuple[str, Endpoint, str], _Group] = {}
    kind_tags: dict[tuple[str, str, str], int] = {}
    seen: set[str] = set()
    encode, blake2b = _encode, hashlib.blake2b
    for claimed in items:
        request_id = claimed.id
        if request_id in seen:
            continue
        seen.add(request_id)
        req = claimed.request
        provider = provider_of(req)
        account = accounts.get(provider)
        if account is None:
            account = accounts[provider] = (protocol_of(provider), caps_of(provider))
        protocol, caps = account
        endpoint = req.endpoint
        if endpoint not in PROTOCOL_ENDPOINTS[protocol]:
            rejected[request_id] = (
                f"endpoint {endpoint.value} cannot go in a {protocol} batch "
                f"(provider account {provider!r})"
            )
            continue
        try:
            body = encode(req.body).encode()
        except (ValueError, TypeError) as exc:
            rejected[request_id] = f"body is not plain JSON: {exc}"
            continue
        key = (provider, endpoint, req.model if caps.one_model_per_batch else "")
        group = groups.get(key)
        if group is None:
            group = groups[key] = _Group(protocol, caps)
        kind = (req.model, req.lane, req.tenant)
        tag = kind_tags.get(kind)
        if tag is None:
            tag = kind_tags[kind] = len(kind_tags)
        group.ids.append(request_id)
        group.deadlines.append(req.deadline)
        group.body_sizes.append(len(body))
        group.digests.append(blake2b(body, digest_size=16).digest() if dedupe else b"")
        group.inputs.append(_embedding_inputs(req.body) if endpoint is Endpoint.EMBEDDINGS else 0)
        group.tags.append(tag)

    kinds = list(kind_tags)
    batches: list[PlannedBatch] = []
    for (provider, endpoint, _), group in groups.items():
        lines = _build_lines(group, endpoint, dedupe=dedupe, rejected=rejected)
        overhead = _file_overhead(group.protocol)
        batches.extend(
            _make_batch(provider, endpoint, group, lines, span, kinds)
            for span in _ranges(lines, group.caps, target_bytes, overhead)
        )
    batches.sort(key=lambda b: (b.tightest_deadline, b.key))
    return Plan(batches=batches, rejected=rejected)


def _representative(
    batch: PlannedBatch, lookup: Callable[[str], Prepared]
) -> Iterator[tuple[str, bytes]]:
    for custom_id, ids in batch.fanout.items():
        yield custom_id, body_bytes(lookup(ids[0]).body)


def openai_lines(batch: PlannedBatch, lookup: Callable[[str], Prepared]) -> Iterator[bytes]:
    """The batch's OpenAI JSONL input file, one line (with its newline) at a time.

    ``lookup`` gives the stored request for an id; only the first id of each fanout entry is
    looked up, since the line sends that request's body for all of them.
    """
    if batch.protocol != "openai":
        raise ValueError(f"batch {batch.key} is an {batch.protocol} batch, not openai")
    return input_lines(batch, lookup)


def input_lines(batch: PlannedBatch, lookup: Callable[[str], Prepared]) -> Iterator[bytes]:
    """Lines in the OpenAI batch input format for a batch of either protocol.

    Both batch adapters take this file: the OpenAI one uploads it, the Anthropic one turns each
    line into a ``{"custom_id", "params"}`` request (its custom_ids are already Anthropic-safe).
    """
    middle = _OPENAI_MID + _encode(batch.endpoint.value).encode() + _OPENAI_BODY
    for custom_id, body in _representative(batch, lookup):
        yield b"".join(
            (_OPENAI_HEAD, encode_basestring(custom_id).encode(), middle, body, _OPENAI_TAIL)
        )


def write_openai_jsonl(batch: PlannedBatch, lookup: Callable[[str], Prepared], fh: BinaryIO) -> int:
    """Stream the JSONL file into ``fh`` (a tempfile, say); returns the bytes written.

    The count equals ``batch.estimated_bytes`` unless a request's body changed since planning.
    """
    written = 0
    for line in openai_lines(batch, lookup):
        fh.write(line)
        written += len(line)
    return written


def anthropic_requests(
    batch: PlannedBatch, lookup: Callable[[str], Prepared]
) -> Iterator[dict[str, Any]]:
    """The ``requests[]`` items of an Anthropic Message Batches create call, one at a time."""
    if batch.protocol != "anthropic":
        raise ValueError(f"batch {batch.key} is an {batch.protocol} batch, not anthropic")
    for custom_id, ids in batch.fanout.items():
        yield {"custom_id": custom_id, "params": lookup(ids[0]).body}


def write_anthropic_body(
    batch: PlannedBatch, lookup: Callable[[str], Prepared], fh: BinaryIO
) -> int:
    """Stream the whole create body ``{"requests":[...]}`` into ``fh``; returns bytes written.

    These are the bytes ``estimated_bytes`` counts against the 256 MB cap. Sending the dicts of
    ``anthropic_requests`` through another JSON encoder gives a slightly different size.
    """
    if batch.protocol != "anthropic":
        raise ValueError(f"batch {batch.key} is an {batch.protocol} batch, not anthropic")
    fh.write(_ANTHROPIC_OPEN)
    written = len(_ANTHROPIC_OPEN)
    for i, (custom_id, body) in enumerate(_representative(batch, lookup)):
        item = b"".join(
            (
                b"," if i else b"",
                _ANTHROPIC_HEAD,
                encode_basestring(custom_id).encode(),
                _ANTHROPIC_PARAMS,
                body,
                _ANTHROPIC_TAIL,
            )
        )
        fh.write(item)
        written += len(item)
    fh.write(_ANTHROPIC_CLOSE)
    return written + len(_ANTHROPIC_CLOSE)


# -- flush policy -------------------------------------------------------------------------------

FLUSH_REASONS: Final = ("deadline", "size", "lines", "window", "max_wait", "waiting", "empty")
"""The first word of every ``should_flush`` reason, for metrics and tests."""


def should_flush(
    group_size_bytes: int,
    group_lines: int,
    tightest_deadline: float | None,
    now: float,
    *,
    target_bytes: int,
    turnaround_s: float,
    margin_s: float,
    max_wait_s: float,
    windows_due: bool,
    oldest_enqueued_at: float | None = None,
    wait_step_s: float = 0.0,
    max_lines: int | None = None,
) -> tuple[bool, str]:
    """Whether a waiting group should be submitted now, and why, as ``"<reason>: <detail>"``.

    Waiting fills batches (fewer, larger files) but spends deadline slack. The group goes when
    waiting one more step (``wait_step_s``, the aggregator's period) plus the provider's expected
    turnaround and a safety margin would pass its tightest deadline; when it reached its target
    size or line cap; when a submit window is due; or when its oldest request waited
    ``max_wait_s``. The deadline is checked first, since it is the reason that must not be lost.
    """
    if group_lines <= 0:
        return False, "empty: nothing waiting"
    if tightest_deadline is not None:
        finish = now + wait_step_s + turnaround_s + margin_s
        if finish > tightest_deadline:
            return True, (
                f"deadline: waiting {wait_step_s:g}s more, turnaround {turnaround_s:g}s and "
                f"margin {margin_s:g}s would end {finish - tightest_deadline:.0f}s past the "
                "tightest deadline"
            )
    if group_size_bytes >= target_bytes:
        return True, f"size: {group_size_bytes} bytes reached the {target_bytes}-byte target"
    if max_lines is not None and group_lines >= max_lines:
        return True, f"lines: {group_lines} lines reached the cap of {max_lines}"
    if windows_due:
        return True, "window: a submit window is due"
    if oldest_enqueued_at is not None and now - oldest_enqueued_at >= max_wait_s:
        return True, (
            f"max_wait: the oldest request waited {now - oldest_enqueued_at:.0f}s "
            f"(max_wait {max_wait_s:g}s)"
        )
    slack = "" if tightest_deadline is None else f", {tightest_deadline - now:.0f}s to deadline"
    return False, f"waiting: {group_lines} lines, {group_size_bytes} of {target_bytes} bytes{slack}"


# -- submit windows: 5-field cron ----------------------------------------------------------------

_CRON_FIELDS: Final = (
    ("minute", 0, 59),
    ("hour", 0, 23),
    ("day of month", 1, 31),
    ("month", 1, 12),
    ("day of week", 0, 7),
)
_MONTH_NAMES: Final = {n.lower(): i for i, n in enumerate(calendar.month_abbr) if n}
_DAY_NAMES: Final = {"sun": 0, "mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6}
_CRON_MACROS: Final = {
    "@hourly": "0 * * * *",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@weekly": "0 0 * * 0",
    "@monthly": "0 0 1 * *",
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
}
_LOOKBACK_DAYS: Final = 8 * 366
"""How far back ``window_due`` looks for a missed window: long enough for a Feb 29 window."""


@dataclass(frozen=True, slots=True)
class _Cron:
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]
    any_day: bool
    any_weekday: bool

    def day_matches(self, d: date) -> bool:
        """Vixie cron's rule: with both day fields restricted, either one may match."""
        if d.month not in self.months:
            return False
        dom = d.day in self.days
        dow = d.isoweekday() % 7 in self.weekdays
        if self.any_day or self.any_weekday:
            return dom and dow
        return dom or dow


def _cron_value(text: str, names: dict[str, int], lo: int, hi: int) -> int:
    value = names.get(text.lower()) if names else None
    if value is None:
        if not text.isdigit():
            raise ValueError(f"{text!r} is not a number")
        value = int(text)
    if not lo <= value <= hi:
        raise ValueError(f"{value} is outside {lo}-{hi}")
    return value


def _cron_field(text: str, name: str, lo: int, hi: int) -> frozenset[int]:
    names = _MONTH_NAMES if name == "month" else _DAY_NAMES if name == "day of week" else {}
    values: set[int] = set()
    for part in text.split(","):
        span, _, step_text = part.partition("/")
        step = 1
        if step_text:
            if not step_text.isdigit() or int(step_text) == 0:
                raise ValueError(f"step {step_text!r} must be a positive number")
            step = int(step_text)
        if span == "*":
            start, end = lo, hi
        elif "-" in span:
            a, _, b = span.partition("-")
            start, end = _cron_value(a, names, lo, hi), _cron_value(b, names, lo, hi)
            if start > end:
                raise ValueError(f"range {span!r} runs backwards")
        else:
            start = _cron_value(span, names, lo, hi)
            end = hi if step_text else start
        values.update(range(start, end + 1, step))
    return frozenset(values)


@functools.lru_cache(maxsize=256)
def _parse_cron(expr: str) -> _Cron:
    fields = _CRON_MACROS.get(expr.strip().lower(), expr).split()
    if len(fields) != 5:
        raise ConfigError(
            f"submit window {expr!r}: a crontab needs 5 fields "
            "(minute hour day-of-month month day-of-week), or @hourly/@daily/@weekly/..."
        )
    parsed: list[frozenset[int]] = []
    for text, (name, lo, hi) in zip(fields, _CRON_FIELDS, strict=True):
        try:
            parsed.append(_cron_field(text, name, lo, hi))
        except ValueError as exc:
            raise ConfigError(f"submit window {expr!r}: {name} {text!r}: {exc}") from None
    minutes, hours, days, months, weekdays = parsed
    weekdays = frozenset(d % 7 for d in weekdays)
    any_day, any_weekday = fields[2].startswith("*"), fields[4].startswith("*")
    longest = {m: calendar.monthrange(2024, m)[1] for m in months}
    if any_weekday and not any(d <= longest[m] for m in months for d in days):
        raise ConfigError(
            f"submit window {expr!r}: that day of month never occurs, so it never fires"
        )
    return _Cron(minutes, hours, days, months, weekdays, any_day, any_weekday)


def _latest_fire(cron: _Cron, now: datetime, earliest: date) -> datetime | None:
    """The last minute at or before ``now`` that the crontab names, searching back to ``earliest``."""
    day = now.date()
    bound = now.hour * 60 + now.minute
    hours = sorted(cron.hours, reverse=True)
    minutes = sorted(cron.minutes, reverse=True)
    while day >= earliest:
        if cron.day_matches(day):
            for hour in hours:
                if hour * 60 > bound:
                    continue
                for minute in minutes:
                    if hour * 60 + minute <= bound:
                        return datetime(
                            day.year, day.month, day.day, hour, minute, tzinfo=now.tzinfo
                        )
        day -= timedelta(days=1)
        bound = 23 * 60 + 59
    return None


def check_window(crontab_expr: str) -> None:
    """Raise ``ConfigError`` naming ``crontab_expr`` if it is not a usable submit window."""
    _parse_cron(crontab_expr)


def window_due(crontab_expr: str, last_run: float | None, now: float, *, tz: tzinfo = UTC) -> bool:
    """Whether a submit window such as ``"0 23 * * *"`` has come since ``last_run``.

    Due when a minute the crontab names lies in ``(last_run, now]``, so a window missed while
    the aggregator was down is still honoured once. With no ``last_run`` it is due only during a
    named minute itself. Times are read in ``tz`` (UTC by default). An invalid expression
    raises ``ConfigError`` naming it, so a bad lanes file fails at load, not at 23:00.
    """
    cron = _parse_cron(crontab_expr)
    now_dt = datetime.fromtimestamp(now, tz)
    if last_run is None:
        start = now_dt.replace(second=0, microsecond=0)
        return (
            cron.day_matches(start.date())
            and start.hour in cron.hours
            and start.minute in cron.minutes
        )
    if last_run >= now:
        return False
    earliest = max(
        datetime.fromtimestamp(last_run, tz).date(),
        (now_dt - timedelta(days=_LOOKBACK_DAYS)).date(),
    )
    fire = _latest_fire(cron, now_dt, earliest)
    return fire is not None and fire.timestamp() > last_run
