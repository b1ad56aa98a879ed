"""The pure parts of ``routing.models``, ``routing.keys`` and ``routing.states``, as tables.

Every decision here takes ``now`` as an argument, so each row is one fact about the rules.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from pydantic import ValidationError

from routing.callbacks import CeleryCallback, RetiredCallback, SinkCallback
from routing.errors import (
    BodyTooLarge,
    DeadlineInPast,
    InvalidRequest,
    UnknownEndpoint,
    UnknownLane,
)
from routing.keys import Keys, lane_of, new_request_id, ulid
from routing.models import (
    Endpoint,
    LaneSpec,
    Prepared,
    Request,
    Result,
    ServiceConfig,
    coerce_request,
    parse_duration_s,
    prepare,
    resolve_deadline,
)
from routing.states import FINISHED, LEASED, TERMINAL, TRANSITIONS, State, can_transition

NOW = 1_700_000_000.0
CHAT_BODY: dict[str, Any] = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "hi"}],
}


def utc(year: int, month: int, day: int) -> float:
    return datetime(year, month, day, tzinfo=UTC).timestamp()


@pytest.fixture
def config() -> ServiceConfig:
    return ServiceConfig(
        lanes=(
            LaneSpec(name="urgent", deadline_s=60, priority=100),
            LaneSpec(name="standard", deadline_s=3600, priority=50),
            LaneSpec(name="bulk", deadline_s=86400, priority=10),
        ),
        max_body_bytes=300,
        default_max_attempts=3,
    )


# -- parse_duration_s -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,expected",
    [
        ("90", 90.0),
        ("90s", 90.0),
        ("250ms", 0.25),
        ("15m", 900.0),
        ("6h", 21600.0),
        ("1.5h", 5400.0),
        ("1d", 86400.0),
        ("2w", 1_209_600.0),
        (" 2 m ", 120.0),
        ("0", 0.0),
        (90, 90.0),
        (1.5, 1.5),
        (timedelta(minutes=2), 120.0),
        (timedelta(milliseconds=5), 0.005),
    ],
)
def test_parse_duration_s(text: str | float | timedelta, expected: float) -> None:
    assert parse_duration_s(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["", "  ", "abc", "-5m", "5 minutes", "5y", "1h30m", "m", "1e3s"])
def test_parse_duration_s_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration_s(text)


@pytest.mark.parametrize("value", [True, False])
def test_parse_duration_s_refuses_booleans(value: bool) -> None:
    # bool is an int subclass: `deadline = true` in a lanes file must not mean one second.
    with pytest.raises((ValueError, TypeError)):
        parse_duration_s(value)


# -- resolve_deadline -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value,expected",
    [
        (None, NOW + 3600),
        ("6h", NOW + 21600),
        ("90", NOW + 90),
        ("90s", NOW + 90),
        (timedelta(minutes=5), NOW + 300),
        (1_800_000_000.5, 1_800_000_000.5),
        (1_800_000_000, 1_800_000_000.0),
        (datetime(2030, 1, 1), utc(2030, 1, 1)),
        (datetime(2030, 1, 1, tzinfo=UTC), utc(2030, 1, 1)),
        (datetime(2030, 1, 1, 2, tzinfo=timezone(timedelta(hours=2))), utc(2030, 1, 1)),
        ("2030-01-01T00:00:00Z", utc(2030, 1, 1)),
        ("2030-01-01T00:00:00+00:00", utc(2030, 1, 1)),
        ("2030-01-01T02:00:00+02:00", utc(2030, 1, 1)),
        ("2030-01-01T00:00:00", utc(2030, 1, 1)),
        ("2030-01-01", utc(2030, 1, 1)),
    ],
)
def test_resolve_deadline(
    value: datetime | float | str | timedelta | None, expected: float
) -> None:
    got = resolve_deadline(value, NOW, 3600.0)
    assert isinstance(got, float)
    assert got == pytest.approx(expected)


@pytest.mark.parametrize("value", ["tomorrow", "", "soon-ish", "2030-13-45", "-5m"])
def test_resolve_deadline_garbage_names_the_field(value: str) -> None:
    with pytest.raises(InvalidRequest, match=r"^deadline: ") as info:
        resolve_deadline(value, NOW, 3600.0)
    assert info.value.field == "deadline"
    assert repr(value) in str(info.value)


# -- prepare ----------------------------------------------------------------------------------


def req(**fields: Any) -> Request:
    fields.setdefault("body", dict(CHAT_BODY))
    return Request(**fields)


@pytest.mark.parametrize(
    "fields,error,field,pattern",
    [
        ({"lane": "fast"}, UnknownLane, "lane", r"'fast'.*\(lanes: urgent, standard, bulk\)"),
        ({"lane": ""}, UnknownLane, "lane", r"''"),
        ({"endpoint": "/v1/completions"}, UnknownEndpoint, "endpoint", r"'/v1/completions'"),
        ({"endpoint": "v1/embeddings"}, UnknownEndpoint, "endpoint", r"/v1/chat/completions"),
        ({"deadline": NOW - 1}, DeadlineInPast, "deadline", r"already past"),
        ({"deadline": NOW}, DeadlineInPast, "deadline", r"already past"),
        ({"deadline": datetime(2000, 1, 1)}, DeadlineInPast, "deadline", r"2000-01-01"),
        ({"deadline": "0s"}, DeadlineInPast, "deadline", r"already past"),
        ({"deadline": "next week"}, InvalidRequest, "deadline", r"'next week'"),
        (
            {"body": {"model": "m", "input": "x" * 400}},
            BodyTooLarge,
            "body",
            r"over the cap of 300",
        ),
        ({"body": {"messages": []}}, InvalidRequest, "model", r"missing"),
        ({"body": {"model": ""}}, InvalidRequest, "model", r"missing"),
        ({"body": {"model": 5}}, InvalidRequest, "model", r"missing"),
        ({"model": "a", "body": {"model": "b"}}, InvalidRequest, "model", r"'a' differs.*'b'"),
    ],
)
def test_prepare_refuses(
    config: ServiceConfig,
    fields: dict[str, Any],
    error: type[InvalidRequest],
    field: str,
    pattern: str,
) -> None:
    with pytest.raises(error, match=pattern) as info:
        prepare(req(**fields), config, NOW)
    assert type(info.value) is error
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")


@pytest.mark.parametrize(
    "lane,deadline,expected",
    [
        ("urgent", None, NOW + 60),
        ("standard", None, NOW + 3600),
        ("bulk", None, NOW + 86400),
        ("bulk", "15m", NOW + 900),
        ("urgent", NOW + 5, NOW + 5),
    ],
)
def test_prepare_deadline_defaults_to_the_lane(
    config: ServiceConfig, lane: str, deadline: str | float | None, expected: float
) -> None:
    prepared = prepare(req(lane=lane, deadline=deadline), config, NOW)
    assert prepared.lane == lane
    assert prepared.deadline == pytest.approx(expected)
    assert prepared.created_at == NOW


@pytest.mark.parametrize("given,expected", [(None, 3), (1, 1), (7, 7)])
def test_prepare_max_attempts(config: ServiceConfig, given: int | None, expected: int) -> None:
    assert prepare(req(max_attempts=given), config, NOW).max_attempts == expected


def test_prepare_takes_the_model_from_the_body_or_puts_it_there(config: ServiceConfig) -> None:
    from_body = prepare(req(), config, NOW)
    assert from_body.model == "gpt-4o-mini"
    assert from_body.body == CHAT_BODY

    body = {"input": "hello"}
    given = prepare(
        req(model="text-embedding-3-small", endpoint="/v1/embeddings", body=body), config, NOW
    )
    assert given.model == "text-embedding-3-small"
    assert given.body == {"input": "hello", "model": "text-embedding-3-small"}
    assert body == {"input": "hello"}, "the caller's body must not be changed"
    assert given.endpoint is Endpoint.EMBEDDINGS

    same = prepare(req(model="gpt-4o-mini"), config, NOW)
    assert same.body == CHAT_BODY


def test_prepare_keeps_the_rest(config: ServiceConfig) -> None:
    prepared = prepare(
        req(
            tenant="acme",
            custom_id="doc-1",
            endpoint="/v1/messages",
            body={"model": "claude", "max_tokens": 5, "messages": []},
            metadata={"team": "search"},
            callback={"kind": "celery", "task": "app.tasks.save", "queue": "results"},
        ),
        config,
        NOW,
    )
    assert (prepared.tenant, prepared.custom_id) == ("acme", "doc-1")
    assert prepared.endpoint is Endpoint.MESSAGES
    assert prepared.metadata == {"team": "search"}
    assert isinstance(prepared.callback, CeleryCallback)
    assert (prepared.callback.task, prepared.callback.queue) == ("app.tasks.save", "results")


def test_a_sink_callback_names_a_sink_the_service_published(config: ServiceConfig) -> None:
    """The producer checks the name against the sinks the service publishes with its config;
    the callback holds the name and nothing else (no URL, no host, no credential)."""
    item = req(callback={"sink": "crm"})
    with pytest.raises(InvalidRequest) as info:
        prepare(item, config, NOW)
    assert info.value.field == "callback.sink"
    assert "the service has no sink 'crm' (its sinks: none;" in str(info.value)
    published = config.model_copy(update={"sinks": ("answers", "crm")})
    prepared = prepare(item, published, NOW)
    assert isinstance(prepared.callback, SinkCallback) and prepared.callback.sink == "crm"
    assert prepared.model_dump(mode="json")["callback"] == {"sink": "crm"}


def test_a_stored_callback_of_an_older_version_still_reads(config: ServiceConfig) -> None:
    """What the store kept before named sinks parses (the delivery then refuses it, saying
    why); only what a producer submits is strict."""
    prepared = prepare(req(), config, NOW)
    stored = prepared.model_dump(mode="json")
    stored["callback"] = {"kind": "sql", "url": "sqlite:////tmp/x.db", "table": "t"}
    again = Prepared.model_validate(stored)
    assert isinstance(again.callback, RetiredCallback)
    assert "inline sql callbacks are no longer accepted" in again.callback.reason
    assert again.model_dump(mode="json")["callback"] == stored["callback"], "kept as written"


def test_body_cap_counts_compact_json_bytes(config: ServiceConfig) -> None:
    # {"model":"m","input":"..."} is 24 bytes of framing: 276 characters of input fit exactly.
    assert prepare(req(body={"model": "m", "input": "x" * 276}), config, NOW)
    with pytest.raises(BodyTooLarge):
        prepare(req(body={"model": "m", "input": "x" * 277}), config, NOW)
    with pytest.raises(BodyTooLarge, match="over the cap"):
        prepare(req(body={"model": "m", "input": "é" * 150}), config, NOW)


@pytest.mark.parametrize(
    "item,field",
    [
        ({"body": CHAT_BODY, "colour": "red"}, "colour"),
        ({}, "body"),
        ({"body": CHAT_BODY, "tenant": ""}, "tenant"),
        ({"body": CHAT_BODY, "max_attempts": 0}, "max_attempts"),
        ({"body": CHAT_BODY, "custom_id": ""}, "custom_id"),
        ({"body": CHAT_BODY, "callback": {"kind": "carrier-pigeon"}}, "callback"),
        ({"body": CHAT_BODY, "callback": {"kind": "webhook", "url": "https://x"}}, "callback"),
        ({"body": CHAT_BODY, "callback": {"sink": "a b"}}, "callback"),
        ({"body": CHAT_BODY, "callback": {"kind": "celery", "task": "mixbatch.x"}}, "callback"),
    ],
)
def test_coerce_request_names_the_field(item: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        coerce_request(item)
    assert info.value.field is not None
    assert info.value.field.split(".")[0] == field
    assert str(info.value).startswith(f"{field}")


def test_coerce_request_passes_a_request_through() -> None:
    request = Request(body=CHAT_BODY)
    assert coerce_request(request) is request
    assert coerce_request({"body": CHAT_BODY}) == request


def test_service_config_lane_lookup_and_priority(config: ServiceConfig) -> None:
    assert config.lane("bulk").deadline_s == 86400
    assert [s.name for s in config.by_priority()] == ["urgent", "standard", "bulk"]
    with pytest.raises(
        UnknownLane, match=r"lane: unknown lane 'x' \(lanes: urgent, standard, bulk\)"
    ):
        config.lane("x")


# -- LaneSpec ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["urgent", "a", "0", "bulk-2", "eu_west", "a" * 32, "9lives"])
def test_lane_name_accepted(name: str) -> None:
    assert LaneSpec(name=name, deadline_s=1).name == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "Urgent",
        "-bulk",
        "_bulk",
        "a" * 33,
        "bulk.eu",  # a request id is LANE.ULID: a dot in the lane would break lane_of
        "bulk{x}",  # braces would break the {lane:NAME} hash tag
        "bulk:x",
        "bulk x",
        "bulk\n",  # `$` matches before a trailing newline: the pattern must anchor at the very end
        "bulk\nx",
        "ürgent",
    ],
)
def test_lane_name_refused(name: str) -> None:
    with pytest.raises(ValidationError, match="lane name"):
        LaneSpec(name=name, deadline_s=1)


@pytest.mark.parametrize(
    "fields",
    [
        {"deadline_s": 0},
        {"deadline_s": -1},
        {"deadline_s": 1, "max_queued": -1},
        {"deadline_s": 1, "on_deadline": "drop"},
        {"deadline_s": 1, "colour": "red"},
    ],
)
def test_lane_spec_refuses_bad_fields(fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        LaneSpec(name="x", **fields)


# -- ids and keys -----------------------------------------------------------------------------


def test_ulid_shape() -> None:
    value = ulid(NOW)
    assert len(value) == 26
    assert re.fullmatch(r"[0-9A-HJKMNP-TV-Z]{26}", value)
    assert ulid(NOW) != value, "80 random bits: two ids of the same millisecond differ"


@pytest.mark.parametrize(
    "earlier,later",
    [
        (NOW, NOW + 0.001),
        (NOW, NOW + 1),
        (NOW, NOW + 86400 * 365),
        (0.0, 0.001),
        (1_000_000_000.0, 4_000_000_000.0),
    ],
)
def test_ulid_sorts_by_time(earlier: float, later: float) -> None:
    for _ in range(20):
        assert ulid(earlier) < ulid(later)


def test_request_ids_of_a_lane_sort_by_creation() -> None:
    ids = [new_request_id("bulk", NOW + i * 0.002) for i in range(50)]
    assert ids == sorted(ids)
    assert all(i.startswith("bulk.") for i in ids)


@pytest.mark.parametrize(
    "request_id,lane",
    [
        ("urgent.01J0000000000000000000000", "urgent"),
        ("bulk-2.X", "bulk-2"),
        ("a.b.c", "a"),
        (new_request_id("standard", NOW), "standard"),
    ],
)
def test_lane_of(request_id: str, lane: str) -> None:
    assert lane_of(request_id) == lane


@pytest.mark.parametrize("request_id", ["", "urgent", "urgent.", ".01J", "."])
def test_lane_of_refuses(request_id: str) -> None:
    with pytest.raises(InvalidRequest, match="is not a mixbatch request id") as info:
        lane_of(request_id)
    assert info.value.field == "id"


def test_keys_of_a_request_carry_its_lane_tag() -> None:
    keys = Keys("ns")
    rid = new_request_id("urgent", NOW)
    tag = "ns:{lane:urgent}"
    assert keys.request(rid) == f"{tag}:r:{rid}"
    assert keys.request(rid).startswith(keys.request_prefix("urgent"))
    assert keys.notify(rid).startswith(tag + ":")
    for make in (keys.queue, keys.queue_age, keys.delayed, keys.leases, keys.outbox):
        assert make("urgent").startswith(tag + ":")
    assert len({keys.queue("urgent"), keys.delayed("urgent"), keys.leases("urgent")}) == 3


def test_idempotency_key_is_per_tenant_and_bounded() -> None:
    keys = Keys("ns")
    assert keys.idempotency("a", "x") != keys.idempotency("b", "x")
    assert keys.idempotency("a", "x") == keys.idempotency("a", "x")
    long_a, long_b = keys.idempotency("a", "x" * 500), keys.idempotency("a", "x" * 499 + "y")
    assert long_a != long_b
    assert len(long_a) < 120


@pytest.mark.parametrize(
    "build,expected",
    [
        (lambda k: k.batch_group("p|/v1/x|m"), "ns:{batches}:pending:p|/v1/x|m"),
        (lambda k: k.batch_group("g", "tok"), "ns:{batches}:pending:g:tok"),
        (lambda k: k.batch_group("g", "size"), "ns:{batches}:pending:g:size"),
        (lambda k: k.batch_group("g", "meta"), "ns:{batches}:pending:g:meta"),
        (lambda k: k.batches("groups"), "ns:{batches}:groups"),
        (lambda k: k.batches("windows"), "ns:{batches}:windows"),
        (lambda k: k.batch("bk"), "ns:{batches}:b:bk"),
        (lambda k: k.batches("intents"), "ns:{batches}:intents"),
        (lambda k: k.batches("inflight"), "ns:{batches}:inflight"),
        (lambda k: k.batches("byid"), "ns:{batches}:byid"),
        (lambda k: k.obs_list("b", "acct|/v1/x|m"), "ns:{obs}:b:acct|/v1/x|m"),
        (lambda k: k.obs_list("r", "index"), "ns:{obs}:r:index"),
        (lambda k: k.obs_seen("bk"), "ns:{obs}:seen:bk"),
        (lambda k: k.obs("inflight"), "ns:{obs}:inflight"),
        (lambda k: k.obs("headroom"), "ns:{obs}:headroom"),
        (lambda k: k.obs_list("g", "aliases"), "ns:{obs}:g:aliases"),
        (lambda k: k.obs_pattern(), "ns:{obs}:*"),
        (lambda k: k.stream_marker("results", "s.1"), "ns:stream-once:{results}:results:s.1"),
        (lambda k: k.stream_marker("{t:a}:r", "s.1"), "ns:stream-once:{t:a}:{t:a}:r:s.1"),
        (lambda k: k.stream_marker("x}y{z}", "s.1"), "ns:stream-once:{z}:x}y{z}:s.1"),
        (lambda k: k.redbeat_prefix(), "ns:redbeat:"),
        (lambda k: k.legacy_dead_letters(), "ns:dlq"),
        (lambda k: k.dead_letters("bulk"), "ns:{lane:bulk}:dlq"),
        (lambda k: k.dead_letters("bulk", "entries"), "ns:{lane:bulk}:dlq:entries"),
        (lambda k: k.dead_letter_lanes(), "ns:dlq:lanes"),
    ],
)
def test_keys_are_byte_identical_to_what_is_stored(build: Any, expected: str) -> None:
    """Key names are data: a renamed key orphans what a running deployment has stored."""
    assert build(Keys("ns")) == expected


# -- states -----------------------------------------------------------------------------------


def test_every_state_has_a_transition_row() -> None:
    assert set(TRANSITIONS) == set(State)
    for src, dsts in TRANSITIONS.items():
        assert src not in dsts, f"{src} -> itself"
        assert dsts <= set(State)


def test_named_sets() -> None:
    assert {State.CLAIMED, State.RUNNING} == LEASED
    assert {State.DONE, State.FAILED, State.EXPIRED, State.CANCELLED} == FINISHED
    assert {State.DELIVERED} == TERMINAL
    assert not (LEASED & FINISHED) and not (FINISHED & TERMINAL) and not (LEASED & TERMINAL)
    for state in TERMINAL:
        assert not TRANSITIONS[state]
    for state in FINISHED:
        assert TRANSITIONS[state] == {State.DELIVERED}, "an outcome never changes"


def test_every_state_is_reachable_from_queued() -> None:
    seen, todo = {State.QUEUED}, [State.QUEUED]
    while todo:
        for nxt in TRANSITIONS[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    assert seen == set(State)


@pytest.mark.parametrize(
    "src,dst,allowed",
    [
        (State.QUEUED, State.CLAIMED, True),
        (State.QUEUED, State.CANCELLED, True),
        (State.QUEUED, State.EXPIRED, True),
        (State.QUEUED, State.DONE, False),
        (State.QUEUED, State.RUNNING, False),
        (State.CLAIMED, State.RUNNING, True),
        (State.CLAIMED, State.SUBMITTED, True),
        (State.CLAIMED, State.QUEUED, True),
        (State.RUNNING, State.DONE, True),
        (State.RUNNING, State.QUEUED, True),
        (State.SUBMITTED, State.DONE, True),
        (State.SUBMITTED, State.FAILED, True),
        (State.SUBMITTED, State.CLAIMED, False),
        (State.DONE, State.DELIVERED, True),
        (State.DONE, State.QUEUED, False),
        (State.DONE, State.FAILED, False),
        (State.CANCELLED, State.DONE, False),
        (State.DELIVERED, State.DONE, False),
        (State.DELIVERED, State.QUEUED, False),
    ],
)
def test_can_transition(src: State, dst: State, allowed: bool) -> None:
    assert can_transition(src, dst) is allowed


def test_state_values_are_stable() -> None:
    # The Lua scripts and stored hashes see these strings; renaming one is a data migration.
    assert {s.value for s in State} == {
        "queued",
        "claimed",
        "submitted",
        "running",
        "done",
        "failed",
        "expired",
        "cancelled",
        "delivered",
    }


# -- Result -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "status,finished_at,ok,latency,missed",
    [
        (State.DONE, NOW + 10, True, 10.0, False),
        (State.DONE, NOW + 100, True, 100.0, True),
        (State.FAILED, NOW + 1, False, 1.0, False),
        (State.CANCELLED, None, False, None, False),
    ],
)
def test_result_properties(
    status: State, finished_at: float | None, ok: bool, latency: float | None, missed: bool
) -> None:
    result = Result(
        id="standard.X",
        lane="standard",
        status=status,
        deadline=NOW + 60,
        created_at=NOW,
        finished_at=finished_at,
    )
    assert result.ok is ok
    assert result.latency_s == latency
    assert result.missed_deadline is missed
