"""Provider-batch planning: grouping, caps, dedupe, deadline order, custom ids, the flush policy.

All pure: no Redis, no HTTP, no clock. Tables first, one test at the real 50,000-line cap.
"""

from __future__ import annotations

import io
import random
import re
from datetime import UTC, datetime
from typing import Any

import pytest

from routing.decide.flush import FLUSH_REASONS, check_window, should_flush, window_due
from routing.decide.planner import (
    ANTHROPIC_CAPS,
    OPENAI_CAPS,
    BatchCaps,
    BatchProtocol,
    Plan,
    PlannedBatch,
    anthropic_custom_id,
    plan_batches,
)
from routing.decide.route import provider_for
from routing.errors import ConfigError
from routing.jsonl import parse_batch_lines
from routing.models import Claimed, Endpoint, Prepared
from routing.providers import OpenAIBatchAdapter

NOW = 1_700_000_000.0
PROTOCOLS: dict[str, BatchProtocol] = {
    "openai": "openai",
    "groq": "openai",
    "anthropic": "anthropic",
}
CHAT, EMB, RESP, MSG = Endpoint.CHAT, Endpoint.EMBEDDINGS, Endpoint.RESPONSES, Endpoint.MESSAGES
ANTHROPIC_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


def default_body(endpoint: Endpoint, model: str, text: str) -> dict[str, Any]:
    if endpoint is EMB:
        return {"model": model, "input": text}
    if endpoint is RESP:
        return {"model": model, "input": text}
    if endpoint is MSG:
        return {"model": model, "max_tokens": 16, "messages": [{"role": "user", "content": text}]}
    return {"model": model, "messages": [{"role": "user", "content": text}]}


def claimed(
    n: int,
    *,
    lane: str = "bulk",
    endpoint: Endpoint = CHAT,
    model: str = "gpt-4o-mini",
    deadline: float | None = None,
    body: dict[str, Any] | None = None,
    tenant: str = "t1",
    account: str | None = None,
) -> Claimed:
    """A claimed request with a well-formed id (``lane.`` and 26 Crockford characters)."""
    request = Prepared.model_construct(
        tenant=tenant,
        custom_id=None,
        lane=lane,
        deadline=NOW + 3600 + n if deadline is None else deadline,
        endpoint=endpoint,
        model=model,
        body=default_body(endpoint, model, f"request {n}") if body is None else body,
        metadata={"account": account} if account else {},
        callback=None,
        max_attempts=3,
        created_at=NOW,
    )
    return Claimed.model_construct(
        id=f"{lane}.01J{n:023d}", token="tok", attempts=0, request=request
    )


def account_of(request: Prepared) -> str:
    return request.metadata.get("account") or provider_for(request)


def plan(
    items: list[Claimed],
    *,
    caps: dict[str, BatchCaps] | None = None,
    target_bytes: int = 20 * 1024 * 1024,
    dedupe: bool = True,
) -> Plan:
    table = {
        "openai": OPENAI_CAPS,
        "groq": OPENAI_CAPS,
        "anthropic": ANTHROPIC_CAPS,
        **(caps or {}),
    }
    return plan_batches(
        items,
        provider_of=account_of,
        protocol_of=PROTOCOLS.__getitem__,
        caps_of=table.__getitem__,
        target_bytes=target_bytes,
        dedupe=dedupe,
    )


def lookup_of(items: list[Claimed]) -> Any:
    return {c.id: c.request for c in items}.__getitem__


def jsonl_of(batch: PlannedBatch, items: list[Claimed]) -> bytes:
    fh = io.BytesIO()
    written = OpenAIBatchAdapter.write_input(batch, lookup_of(items), fh)
    assert written == len(fh.getvalue())
    return fh.getvalue()


# -- grouping -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("specs", "expected"),
    [
        pytest.param(
            [(CHAT, "gpt-4o-mini", None)] * 3,
            {("openai", CHAT, "gpt-4o-mini"): 3},
            id="one-group",
        ),
        pytest.param(
            [(CHAT, "gpt-4o-mini", None), (CHAT, "gpt-4o", None), (CHAT, "gpt-4o-mini", None)],
            {("openai", CHAT, "gpt-4o-mini"): 2, ("openai", CHAT, "gpt-4o"): 1},
            id="openai-one-model-per-file",
        ),
        pytest.param(
            [(CHAT, "gpt-4o-mini", None), (EMB, "gpt-4o-mini", None), (RESP, "gpt-4o-mini", None)],
            {
                ("openai", CHAT, "gpt-4o-mini"): 1,
                ("openai", EMB, "gpt-4o-mini"): 1,
                ("openai", RESP, "gpt-4o-mini"): 1,
            },
            id="by-endpoint",
        ),
        pytest.param(
            [(CHAT, "llama", "groq"), (CHAT, "llama", None), (CHAT, "llama", "groq")],
            {("groq", CHAT, "llama"): 2, ("openai", CHAT, "llama"): 1},
            id="by-account",
        ),
        pytest.param(
            [(MSG, "claude-haiku-4-5", None), (MSG, "claude-sonnet-4-5", None)],
            {("anthropic", MSG, None): 2},
            id="anthropic-mixes-models",
        ),
    ],
)
def test_grouping(
    specs: list[tuple[Endpoint, str, str | None]],
    expected: dict[tuple[str, Endpoint, str | None], int],
) -> None:
    items = [claimed(i, endpoint=e, model=m, account=a) for i, (e, m, a) in enumerate(specs)]
    result = plan(items)
    assert result.rejected == {}
    got = {(b.provider, b.endpoint, b.model): b.line_count for b in result.batches}
    assert got == expected
    for batch in result.batches:
        assert batch.protocol == PROTOCOLS[batch.provider]
        if batch.protocol == "openai":
            assert len(batch.models) == 1


def test_mixed_anthropic_batch_names_its_models() -> None:
    items = [claimed(0, endpoint=MSG, model="b-model"), claimed(1, endpoint=MSG, model="a-model")]
    (batch,) = plan(items).batches
    assert batch.model is None
    assert batch.models == ("a-model", "b-model")


# -- caps and target size ------------------------------------------------------------------------


def small_caps(max_lines: int, max_bytes: int, **extra: Any) -> dict[str, BatchCaps]:
    return {
        "openai": BatchCaps(
            max_lines=max_lines, max_bytes=max_bytes, one_model_per_batch=True, **extra
        )
    }


LINE = len(jsonl_of(plan([claimed(0)]).batches[0], [claimed(0)]))
"""Bytes of one default chat line; every default line has the same length."""


@pytest.mark.parametrize(
    ("n", "max_lines", "max_bytes", "target", "sizes"),
    [
        pytest.param(10, 4, 10**9, 10**9, [4, 4, 2], id="lines-cap"),
        pytest.param(10, 100, 3 * LINE, 10**9, [3, 3, 3, 1], id="bytes-cap"),
        pytest.param(10, 100, 3 * LINE - 1, 10**9, [2, 2, 2, 2, 2], id="bytes-cap-exclusive"),
        pytest.param(10, 100, 10**9, 5 * LINE, [5, 5], id="target"),
        pytest.param(10, 3, 10**9, 5 * LINE, [3, 3, 3, 1], id="lines-tighter-than-target"),
        pytest.param(10, 100, 2 * LINE, 5 * LINE, [2, 2, 2, 2, 2], id="bytes-tighter-than-target"),
        pytest.param(3, 100, 10**9, 1, [1, 1, 1], id="target-below-one-line"),
        pytest.param(4, 4, 4 * LINE, 4 * LINE, [4], id="exactly-full"),
    ],
)
def test_caps_and_target(
    n: int, max_lines: int, max_bytes: int, target: int, sizes: list[int]
) -> None:
    items = [claimed(i) for i in range(n)]
    result = plan(items, caps=small_caps(max_lines, max_bytes), target_bytes=target)
    assert [b.line_count for b in result.batches] == sizes
    for batch in result.batches:
        assert batch.line_count <= max_lines
        assert batch.estimated_bytes <= max_bytes
        assert batch.estimated_bytes == batch.line_count * LINE
    assert sorted(i for b in result.batches for i in b.request_ids) == sorted(c.id for c in items)


@pytest.mark.parametrize(
    ("inputs", "cap", "sizes"),
    [
        pytest.param([3, 3, 3], 6, [2, 1], id="splits"),
        pytest.param([1, 5, 1, 1], 6, [2, 2], id="fills"),
        pytest.param([["a", "b"], "c", [1, 2, 3]], 4, [3], id="token-array-is-one"),
    ],
)
def test_embedding_inputs_cap(inputs: list[Any], cap: int, sizes: list[int]) -> None:
    def body(i: int, given: Any) -> dict[str, Any]:
        if isinstance(given, int):
            return {"model": "e", "input": [f"text {i}.{k}" for k in range(given)]}
        return {"model": "e", "input": given}

    items = [claimed(i, endpoint=EMB, model="e", body=body(i, g)) for i, g in enumerate(inputs)]
    caps = small_caps(100, 10**9, max_embedding_inputs=cap)
    assert [b.line_count for b in plan(items, caps=caps).batches] == sizes


def test_real_openai_line_cap() -> None:
    items = [
        claimed(i, endpoint=EMB, model="e", body={"model": "e", "input": "x"}, deadline=NOW + 60)
        for i in range(50_001)
    ]
    result = plan(items, dedupe=False)
    assert [b.line_count for b in result.batches] == [50_000, 1]
    assert result.batches[0].estimated_bytes < 20 * 1024 * 1024
    assert len(set(result.batches[0].request_ids)) == 50_000


# -- dedupe and fanout ---------------------------------------------------------------------------

HELLO = [{"role": "user", "content": "hello"}]


@pytest.mark.parametrize(
    ("bodies", "tenants", "dedupe", "lines"),
    [
        pytest.param(
            [{"model": "gpt-4o-mini", "messages": HELLO}] * 3,
            ["t1"] * 3,
            True,
            [[0, 1, 2]],
            id="identical",
        ),
        pytest.param(
            [
                {"model": "gpt-4o-mini", "messages": HELLO, "temperature": 0},
                {"temperature": 0, "messages": HELLO, "model": "gpt-4o-mini"},
            ],
            ["t1", "t1"],
            True,
            [[0, 1]],
            id="key-order-ignored",
        ),
        pytest.param(
            [{"model": "gpt-4o-mini", "messages": HELLO}] * 2,
            ["t1", "t2"],
            True,
            [[0, 1]],
            id="across-tenants",
        ),
        pytest.param(
            [
                {"model": "gpt-4o-mini", "messages": HELLO},
                {"model": "gpt-4o-mini", "messages": HELLO, "temperature": 1},
            ],
            ["t1", "t1"],
            True,
            [[0], [1]],
            id="different-bodies",
        ),
        pytest.param(
            [{"model": "gpt-4o-mini", "messages": HELLO}] * 2,
            ["t1", "t1"],
            False,
            [[0], [1]],
            id="dedupe-off",
        ),
    ],
)
def test_dedupe_and_fanout(
    bodies: list[dict[str, Any]], tenants: list[str], dedupe: bool, lines: list[list[int]]
) -> None:
    items = [
        claimed(i, body=b, tenant=t) for i, (b, t) in enumerate(zip(bodies, tenants, strict=True))
    ]
    (batch,) = plan(items, dedupe=dedupe).batches
    want = {items[group[0]].id: tuple(items[i].id for i in group) for group in lines}
    assert batch.fanout == want
    assert batch.line_count == len(lines)
    assert sorted(batch.request_ids) == sorted(c.id for c in items)
    assert batch.tenants == tuple(sorted(set(tenants)))
    parsed = parse_batch_lines(jsonl_of(batch, items).decode().splitlines())
    assert [p.custom_id for p in parsed] == list(want)


def test_dedupe_keeps_the_most_urgent_id_and_separate_models_apart() -> None:
    body = {"model": "gpt-4o-mini", "messages": HELLO}
    later, sooner = (
        claimed(1, body=body, deadline=NOW + 900),
        claimed(2, body=body, deadline=NOW + 60),
    )
    other = claimed(3, model="gpt-4o", body={"model": "gpt-4o", "messages": HELLO})
    result = plan([later, sooner, other])
    by_model = {b.model: b for b in result.batches}
    assert by_model["gpt-4o-mini"].fanout == {sooner.id: (sooner.id, later.id)}
    assert by_model["gpt-4o-mini"].request_ids_for(sooner.id) == (sooner.id, later.id)
    assert by_model["gpt-4o"].fanout == {other.id: (other.id,)}


# -- keys and order ------------------------------------------------------------------------------


def test_batch_keys_are_stable_and_distinct() -> None:
    items = [claimed(i, deadline=NOW + 100) for i in range(20)]
    caps = small_caps(5, 10**9)
    first = [b.key for b in plan(items, caps=caps).batches]
    shuffled = items[:]
    random.Random(7).shuffle(shuffled)
    assert [b.key for b in plan(shuffled, caps=caps).batches] == first
    assert len(set(first)) == 4
    assert all(re.fullmatch(r"[0-9a-f]{20}", key) for key in first)
    fewer = [b.key for b in plan(items[1:], caps=caps).batches]
    assert fewer[0] != first[0]


def test_earliest_deadline_first_within_a_group_and_across_batches() -> None:
    deadlines = [NOW + d for d in (500, 100, 900, 300, 700, 200)]
    items = [claimed(i, deadline=d) for i, d in enumerate(deadlines)]
    items.append(claimed(99, model="gpt-4o", deadline=NOW + 50))
    result = plan(items, caps=small_caps(2, 10**9))
    deadline_of = {c.id: c.request.deadline - NOW for c in items}
    order = [[deadline_of[cid] for cid in b.fanout] for b in result.batches]
    assert order == [[50], [100, 200], [300, 500], [700, 900]]
    assert [b.tightest_deadline - NOW for b in result.batches] == [50, 100, 300, 700]


def test_a_planned_batch_survives_a_json_round_trip() -> None:
    body = {"model": "gpt-4o-mini", "messages": HELLO}
    items = [claimed(1, body=body), claimed(2, body=body), claimed(3, endpoint=MSG)]
    for batch in plan(items).batches:
        stored = batch.model_dump_json()
        assert PlannedBatch.model_validate_json(stored) == batch


def test_same_id_twice_is_planned_once() -> None:
    item = claimed(1)
    (batch,) = plan([item, item]).batches
    assert batch.request_ids == (item.id,)


# -- rejections ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("caps", "item", "reason"),
    [
        pytest.param(
            small_caps(10, 10**9, max_line_bytes=200),
            claimed(1, body={"model": "m", "messages": [{"role": "user", "content": "x" * 300}]}),
            "over the provider's 200-byte cap",
            id="max-line-bytes",
        ),
        pytest.param(
            small_caps(10, 300),
            claimed(1, body={"model": "m", "messages": [{"role": "user", "content": "x" * 300}]}),
            "does not fit the provider's 300-byte cap",
            id="max-bytes",
        ),
        pytest.param(
            small_caps(10, 10**9, max_embedding_inputs=2),
            claimed(1, endpoint=EMB, body={"model": "e", "input": ["a", "b", "c"]}),
            "3 embedding inputs",
            id="embedding-inputs",
        ),
        pytest.param(
            None,
            claimed(1, endpoint=MSG, account="openai"),
            "endpoint /v1/messages cannot go in a openai batch",
            id="wrong-protocol",
        ),
        pytest.param(
            None,
            claimed(1, body={"model": "m", "temperature": float("nan")}),
            "body is not plain JSON",
            id="nan",
        ),
    ],
)
def test_rejected_with_reason(
    caps: dict[str, BatchCaps] | None, item: Claimed, reason: str
) -> None:
    fine = claimed(2, endpoint=item.request.endpoint, model=item.request.model)
    result = plan([item, fine], caps=caps)
    assert list(result.rejected) == [item.id]
    assert reason in result.rejected[item.id]
    assert [b.request_ids for b in result.batches] == [(fine.id,)]


def test_twins_of_an_oversized_line_are_rejected_too() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "x" * 300}]}
    items = [claimed(i, model="m", body=body) for i in range(3)]
    result = plan(items, caps=small_caps(10, 300))
    assert set(result.rejected) == {c.id for c in items}
    assert result.batches == []


# -- Anthropic custom ids ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_id", "expected"),
    [
        ("bulk.01JD3ABCDEFGHJKMNPQRSTVWXY", "bulk-01JD3ABCDEFGHJKMNPQRSTVWXY"),
        ("my_lane-2.01JD3ABCDEFGHJKMNPQRSTVWXY", "my_lane-2-01JD3ABCDEFGHJKMNPQRSTVWXY"),
        ("a" * 32 + ".01JD3ABCDEFGHJKMNPQRSTVWXY", "a" * 32 + "-01JD3ABCDEFGHJKMNPQRSTVWXY"),
        ("bulk.short", None),
        ("Bulk.01JD3ABCDEFGHJKMNPQRSTVWXY", None),
        ("a" * 33 + ".01JD3ABCDEFGHJKMNPQRSTVWXY", None),
        ("bulk-01JD3ABCDEFGHJKMNPQRSTVWXY", None),
        ("req 1/ünïcode", None),
        ("", None),
    ],
)
def test_anthropic_custom_id(request_id: str, expected: str | None) -> None:
    got = anthropic_custom_id(request_id)
    assert ANTHROPIC_ID.match(got)
    if expected is None:
        assert re.fullmatch(r"h-[0-9a-f]{48}", got)
    else:
        assert got == expected
    assert anthropic_custom_id(request_id) == got


def test_anthropic_custom_ids_do_not_collide() -> None:
    ids = [
        "bulk.01JD3ABCDEFGHJKMNPQRSTVWXY",
        "bulk-01JD3ABCDEFGHJKMNPQRSTVWXY",
        "bulk_01JD3ABCDEFGHJKMNPQRSTVWXY",
    ]
    ids += [f"l{i}.01J{i:023d}" for i in range(500)] + [f"x{i}" for i in range(500)]
    assert len({anthropic_custom_id(i) for i in ids}) == len(ids)


# -- the flush policy (routing.decide.flush) ----------------------------------------------------

FLUSH = {
    "target_bytes": 1000,
    "turnaround_s": 3600.0,
    "margin_s": 600.0,
    "max_wait_s": 900.0,
    "windows_due": False,
    "wait_step_s": 2.0,
}


@pytest.mark.parametrize(
    ("size", "lines", "deadline", "changes", "flush", "reason"),
    [
        pytest.param(0, 0, NOW + 60, {}, False, "empty", id="empty"),
        pytest.param(10, 1, NOW + 86_400, {}, False, "waiting", id="plenty-of-slack"),
        pytest.param(10, 1, NOW + 4201, {}, True, "deadline", id="one-step-too-close"),
        pytest.param(10, 1, NOW + 4202, {}, False, "waiting", id="exactly-on-time"),
        pytest.param(10, 1, NOW - 5, {}, True, "deadline", id="already-late"),
        pytest.param(1000, 5, NOW + 86_400, {}, True, "size", id="target-reached"),
        pytest.param(10, 5, NOW + 86_400, {"max_lines": 5}, True, "lines", id="line-cap"),
        pytest.param(10, 1, NOW + 86_400, {"windows_due": True}, True, "window", id="window"),
        pytest.param(
            10, 1, NOW + 86_400, {"oldest_enqueued_at": NOW - 900}, True, "max_wait", id="max-wait"
        ),
        pytest.param(
            10, 1, NOW + 86_400, {"oldest_enqueued_at": NOW - 899}, False, "waiting", id="not-yet"
        ),
        pytest.param(10, 1, None, {}, False, "waiting", id="no-deadline"),
        pytest.param(
            5000, 1, NOW + 100, {"windows_due": True}, True, "deadline", id="deadline-named-first"
        ),
    ],
)
def test_should_flush(
    size: int,
    lines: int,
    deadline: float | None,
    changes: dict[str, Any],
    flush: bool,
    reason: str,
) -> None:
    got, why = should_flush(size, lines, deadline, NOW, **{**FLUSH, **changes})
    assert (got, why.split(":")[0]) == (flush, reason)
    assert reason in FLUSH_REASONS


# -- submit windows ------------------------------------------------------------------------------


def ts(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    ("expr", "last_run", "now", "due"),
    [
        ("0 23 * * *", "2026-03-02 22:00", "2026-03-02 22:59:59", False),
        ("0 23 * * *", "2026-03-02 22:00", "2026-03-02 23:00:00", True),
        ("0 23 * * *", "2026-03-02 23:00:05", "2026-03-02 23:00:30", False),
        ("0 23 * * *", "2026-03-01 23:00:05", "2026-03-02 08:00", False),
        ("0 23 * * *", "2026-02-27 23:00:05", "2026-03-02 08:00", True),
        ("0 23 * * *", None, "2026-03-02 23:00:40", True),
        ("0 23 * * *", None, "2026-03-02 23:01:00", False),
        ("0 23 * * *", "2026-03-02 23:30", "2026-03-02 23:00", False),
        ("*/15 * * * *", "2026-03-02 10:14", "2026-03-02 10:15", True),
        ("*/15 * * * *", "2026-03-02 10:15:01", "2026-03-02 10:29:59", False),
        ("30 2 * * mon-fri", "2026-03-06 03:00", "2026-03-09 02:30", True),
        ("30 2 * * mon-fri", "2026-03-06 03:00", "2026-03-08 23:59", False),
        ("0 0 13 * fri", "2026-03-10 00:00", "2026-03-13 00:00", True),
        ("0 0 13 * fri", "2026-03-14 00:00", "2026-03-19 23:00", False),
        ("0 0 13 * fri", "2026-03-14 00:00", "2026-03-20 00:00", True),
        ("0 0 * * 7", "2026-03-07 12:00", "2026-03-08 00:00", True),
        ("0 0 29 feb *", "2025-01-01 00:00", "2026-03-02 00:00", False),
        ("0 0 29 feb *", "2023-01-01 00:00", "2026-03-02 00:00", True),
        ("@daily", "2026-03-01 23:00", "2026-03-02 00:00", True),
        ("@hourly", "2026-03-02 10:00:30", "2026-03-02 10:59", False),
        ("0,30 9-17/4 1 jan-mar,dec *", "2026-02-01 09:00", "2026-02-01 09:30", True),
        ("0,30 9-17/4 1 jan-mar,dec *", "2026-02-01 09:30", "2026-02-01 12:59", False),
        ("0,30 9-17/4 1 jan-mar,dec *", "2026-02-01 09:30", "2026-02-01 13:00", True),
        ("0,30 9-17/4 1 jan-mar,dec *", "2026-03-02 00:00", "2026-11-30 23:59", False),
    ],
)
def test_window_due(expr: str, last_run: str | None, now: str, due: bool) -> None:
    last = None if last_run is None else ts(last_run)
    assert window_due(expr, last, ts(now)) is due


@pytest.mark.parametrize(
    ("expr", "problem"),
    [
        ("0 23 * *", "5 fields"),
        ("0 23 * * * *", "5 fields"),
        ("60 * * * *", "minute '60': 60 is outside 0-59"),
        ("* 24 * * *", "hour"),
        ("* * 0 * *", "day of month"),
        ("* * * 13 *", "month"),
        ("* * * * 8", "day of week"),
        ("*/0 * * * *", "step"),
        ("5-1 * * * *", "backwards"),
        ("x * * * *", "not a number"),
        ("* * * smarch *", "not a number"),
        ("0 0 31 feb *", "never"),
        ("@fortnightly", "5 fields"),
    ],
)
def test_invalid_window_names_the_expression(expr: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        window_due(expr, None, NOW)
    assert repr(expr) in str(info.value)
    assert problem in str(info.value)
    with pytest.raises(ConfigError):
        check_window(expr)


def test_window_in_another_timezone() -> None:
    from zoneinfo import ZoneInfo

    paris = ZoneInfo("Europe/Paris")
    assert window_due("0 23 * * *", ts("2026-03-02 21:00"), ts("2026-03-02 22:00"), tz=paris)
    assert not window_due("0 23 * * *", ts("2026-03-02 21:00"), ts("2026-03-02 22:00"))
