"""Provider-batch planning: which claimed requests go into which provider batch.

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

Byte counts are exact: a line's size is the length of the very bytes the batch adapters' writer
(``BatchAdapter.write_input``) produces, because both frame a line with ``line_frame`` and
serialise the body with ``body_bytes``. Bodies are serialised twice (once to size, once to
write) rather than kept, so memory holds one line at a time, not the whole group.

``PlannedBatch.fanout`` maps each line's wire ``custom_id`` to the ids of the requests it
answers. It is the only way back from a provider's result line to our requests (Anthropic ids
are rewritten to fit its ``custom_id`` pattern), so the caller stores it durably, with the
batch key, before it uploads anything.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from json.encoder import encode_basestring
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field

from routing.models import Claimed, Endpoint, Prepared

__all__ = [
    "ANTHROPIC_CAPS",
    "DEFAULT_TARGET_BYTES",
    "OPENAI_CAPS",
    "PROTOCOL_ENDPOINTS",
    "BatchCaps",
    "BatchProtocol",
    "Plan",
    "PlannedBatch",
    "anthropic_custom_id",
    "body_bytes",
    "file_overhead",
    "line_frame",
    "plan_batches",
]

BatchProtocol = Literal["openai", "anthropic", "gemini", "bedrock", "mistral"]

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
    "gemini": frozenset({Endpoint.GENERATE_CONTENT, Endpoint.EMBED_CONTENT}),
    "bedrock": frozenset({Endpoint.MESSAGES}),
    "mistral": frozenset({Endpoint.CHAT, Endpoint.EMBEDDINGS}),
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


_HEAD = b'{"custom_id":'
_TAIL = b"}\n"
_ANTHROPIC_OPEN = b'{"requests":['
_ANTHROPIC_CLOSE = b"]}"


def line_frame(protocol: BatchProtocol, endpoint: Endpoint) -> tuple[bytes, bytes, bytes]:
    """The bytes of an input line around its JSON ``custom_id`` and its canonical body.

    (before the custom_id, between it and the body, after the body with the newline). OpenAI
    lines are its batch input format; Anthropic lines are the ``{"custom_id", "params"}`` items
    of a Message Batches create, which its adapter joins with commas inside
    ``{"requests":[...]}``. Planning sizes lines with this frame and the adapters' writer
    writes them with it, so the two cannot drift apart.
    """
    if protocol == "openai":
        return (
            _HEAD,
            b',"method":"POST","url":' + _encode(endpoint.value).encode() + b',"body":',
            _TAIL,
        )
    return _HEAD, b',"params":', _TAIL


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
    answers, line senders first. ``estimated_bytes`` is the exact size of what the provider
    receives: the JSONL file (OpenAI), or the create request body the Anthropic adapter builds
    from the written lines. ``model`` is ``None`` only for an Anthropic batch that mixes models;
    ``models`` names them all.
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
    """Bytes a line adds around its body and custom_id: the JSONL keys and newline, or
    Anthropic's item keys and the comma (where the file has the newline) between items."""
    return sum(len(part) for part in line_frame(protocol, endpoint))


def file_overhead(protocol: BatchProtocol) -> int:
    """Bytes the provider receives beyond the written lines: Anthropic's ``{"requests":[...]}``,
    less the last line's newline, which no comma replaces."""
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
    room = caps.max_bytes - file_overhead(protocol)
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
    overhead = file_overhead(group.protocol)
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
        overhead = file_overhead(group.protocol)
        batches.extend(
            _make_batch(provider, endpoint, group, lines, span, kinds)
            for span in _ranges(lines, group.caps, target_bytes, overhead)
        )
    batches.sort(key=lambda b: (b.tightest_deadline, b.key))
    return Plan(batches=batches, rejected=rejected)
