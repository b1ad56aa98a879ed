"""The sandbox's batch protocols, driven by the official openai and anthropic SDKs on loopback.

Sandbox time runs ``time_scale`` times faster than real time, so a whole 24 h window passes in a
fraction of a second where a test needs it to.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import anthropic
import httpx
import openai
import pytest

from routing.sandbox import Knobs, expected_embeddings, expected_reply, response_text
from routing.sandbox.batch_openai import parse_openai_input
from routing.sandbox.batch_plan import (
    FINALIZING_SHARE,
    Plan,
    SandboxClock,
    line_fault,
    plan_batch,
)
from routing.sandbox.server import SandboxServer
from tests.test_sandbox import ant, http, oai

__all__ = ["ant", "http", "oai"]

CHAT: Final = "/v1/chat/completions"
OPENAI_TERMINAL = {"completed", "failed", "expired", "cancelled"}
OPENAI_NEXT = {
    "validating": {"in_progress", "failed", "cancelling"},
    "in_progress": {"finalizing", "expired", "cancelling"},
    "finalizing": {"completed"},
    "cancelling": {"cancelled"},
}
"""Allowed status transitions; a poll may skip some, which ``assert_monotonic`` allows for."""


@pytest.fixture(scope="module")
def srv() -> Iterator[SandboxServer]:
    with SandboxServer(knobs=Knobs(time_scale=20.0)) as server:
        yield server


@pytest.fixture(autouse=True)
def clean(srv: SandboxServer) -> None:
    srv.configure(**Knobs(time_scale=20.0).model_dump())
    srv.reset()


# --- helpers --------------------------------------------------------------------------------


def chat_body(text: str, model: str = "gpt-sandbox") -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}]}


def chat_lines(count: int, prefix: str = "req") -> list[dict[str, Any]]:
    return [
        {"custom_id": f"{prefix}-{i}", "method": "POST", "url": CHAT, "body": chat_body(f"q {i}")}
        for i in range(count)
    ]


def jsonl(items: list[Any]) -> bytes:
    return "".join(json.dumps(item) + "\n" for item in items).encode()


def upload(oai: openai.OpenAI, lines: list[Any]) -> str:
    return oai.files.create(file=("input.jsonl", jsonl(lines)), purpose="batch").id


def start_batch(oai: openai.OpenAI, lines: list[Any]) -> openai.types.Batch:
    return oai.batches.create(
        input_file_id=upload(oai, lines), endpoint=CHAT, completion_window="24h"
    )


def wait_openai(
    oai: openai.OpenAI, batch_id: str, until: set[str], timeout_s: float = 5.0
) -> tuple[openai.types.Batch, list[openai.types.Batch]]:
    """Poll until the batch reaches one of ``until``; returns it and every poll seen."""
    seen = [oai.batches.retrieve(batch_id)]
    deadline = time.monotonic() + timeout_s
    while seen[-1].status not in until:
        assert time.monotonic() < deadline, f"stuck in {seen[-1].status}"
        time.sleep(0.01)
        seen.append(oai.batches.retrieve(batch_id))
    return seen[-1], seen


def reachable(status: str) -> set[str]:
    found: set[str] = set()
    todo = [status]
    while todo:
        for nxt in OPENAI_NEXT.get(todo.pop(), set()) - found:
            found.add(nxt)
            todo.append(nxt)
    return found


def assert_path(statuses: list[str]) -> None:
    for before, after in itertools.pairwise(statuses):
        assert before == after or after in reachable(before), statuses


def assert_monotonic(polls: list[openai.types.Batch]) -> None:
    assert_path([poll.status for poll in polls])
    for before, after in itertools.pairwise(polls):
        counts_before, counts_after = before.request_counts, after.request_counts
        assert counts_before is not None and counts_after is not None
        assert counts_after.completed >= counts_before.completed
        assert counts_after.failed >= counts_before.failed
        assert counts_after.total >= counts_before.total


def read_jsonl(oai: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(line) for line in oai.files.content(file_id).read().splitlines()]


def msg_params(text: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": "claude-sandbox",
        "max_tokens": 32,
        "messages": [{"role": "user", "content": text}],
        **extra,
    }


def ant_requests(count: int, prefix: str = "a") -> list[dict[str, Any]]:
    return [{"custom_id": f"{prefix}-{i}", "params": msg_params(f"q {i}")} for i in range(count)]


def wait_anthropic(
    ant: anthropic.Anthropic, batch_id: str, timeout_s: float = 5.0
) -> anthropic.types.messages.MessageBatch:
    deadline = time.monotonic() + timeout_s
    batch = ant.messages.batches.retrieve(batch_id)
    while batch.processing_status != "ended":
        assert time.monotonic() < deadline, f"stuck in {batch.processing_status}"
        time.sleep(0.01)
        batch = ant.messages.batches.retrieve(batch_id)
    return batch


def results_by_id(ant: anthropic.Anthropic, batch_id: str) -> dict[str, Any]:
    return {r.custom_id: r.result for r in ant.messages.batches.results(batch_id)}


# --- the plan and the line faults, pure -----------------------------------------------------

TIMES_S = (0.0, 0.1, 0.3, 1.0, 1.85, 1.95, 2.0, 3.0, 86_399.0, 86_400.0, 1e6)


def ten_line_plan(**changes: Any) -> Plan:
    """The plan of a ten-line batch created at 0 under knobs ``changes``."""
    knobs = Knobs(**changes)
    return plan_batch(
        created_at=0.0,
        ranks=list(range(10)),
        knobs=knobs,
        validating_s=knobs.batch_validating_s,
        finalizing_share=FINALIZING_SHARE,
    )


@pytest.mark.parametrize(
    ("changes", "cancel_at_s", "last"),
    [
        ({}, None, "completed"),
        ({"batch_stuck_finalizing": True}, None, "finalizing"),
        ({"batch_expire": True}, None, "expired"),
        ({"batch_turnaround_s": 200_000.0}, None, "expired"),
        ({}, 0.5, "cancelled"),
        ({}, 0.1, "cancelled"),
    ],
)
def test_plan_phases_only_move_forward(
    changes: dict[str, Any], cancel_at_s: float | None, last: str
) -> None:
    plan = ten_line_plan(**changes)
    if cancel_at_s is not None:
        plan = plan.cancelled(cancel_at_s)
    seen = [plan.phase(t).value for t in TIMES_S]
    assert seen[0] == "validating"
    assert seen[-1] == last
    assert_path(seen)


@pytest.mark.parametrize(
    ("changes", "lines_run"),
    [
        ({}, 10),
        ({"batch_expire": True, "batch_expire_done_fraction": 0.3}, 3),
        ({"batch_turnaround_s": 200_000.0}, 4),
    ],
)
def test_plan_lines_run_before_the_end(changes: dict[str, Any], lines_run: int) -> None:
    plan = ten_line_plan(**changes)
    assert plan.ended_at is not None
    assert sum(plan.has_run(i, plan.ended_at) for i in range(10)) == lines_run


def test_line_faults_are_seeded_split_and_transient_only_for_500() -> None:
    ids = [f"id-{i}" for i in range(4000)]
    first = [line_fault(7, c, 0, 0.2) for c in ids]
    assert first == [line_fault(7, c, 0, 0.2) for c in ids]
    assert first != [line_fault(8, c, 0, 0.2) for c in ids]
    bad = [c for c, f in zip(ids, first, strict=True) if f == 400]
    flaky = [c for c, f in zip(ids, first, strict=True) if f == 500]
    fine = [c for c, f in zip(ids, first, strict=True) if f is None]
    assert abs(len(bad) / len(ids) - 0.1) < 0.02
    assert abs(len(flaky) / len(ids) - 0.1) < 0.02
    assert all(line_fault(7, c, k, 0.2) == 400 for c in bad for k in (1, 2, 3))
    healed = [line_fault(7, c, 1, 0.2) is None for c in flaky]
    assert sum(healed) / len(flaky) > 0.7
    assert all(line_fault(7, c, 3, 0.2) is None for c in fine)
    assert {line_fault(7, c, 0, 0.0) for c in ids} == {None}
    assert None not in {line_fault(7, c, 0, 1.0) for c in ids}


def test_clock_scales_and_never_goes_back() -> None:
    real, scale = [100.0], [1.0]
    clock = SandboxClock(lambda: scale[0], start=0.0, real=lambda: real[0])
    real[0] = 101.0
    assert clock.now() == 1.0
    scale[0], real[0] = 3600.0, 102.0
    assert clock.now() == 3601.0
    scale[0], real[0] = 0.5, 104.0
    assert clock.now() == 3602.0
    real[0] = 103.0
    assert clock.now() == 3602.0


def test_input_checks_without_lines() -> None:
    assert parse_openai_input(b"\n\n", CHAT)[1][0]["code"] == "empty_file"
    many = {"model": "e", "input": ["x"] * 50_001}
    line = {"custom_id": "e", "method": "POST", "url": "/v1/embeddings", "body": many}
    errors = parse_openai_input(jsonl([line]), "/v1/embeddings")[1]
    assert [(e["code"], e["line"]) for e in errors] == [("too_many_tasks", None)]


# --- OpenAI: full cycles --------------------------------------------------------------------


def test_openai_chat_batch_completes(oai: openai.OpenAI, srv: SandboxServer) -> None:
    lines = chat_lines(20)
    file = oai.files.create(file=("input.jsonl", jsonl(lines)), purpose="batch")
    assert file.purpose == "batch" and file.bytes == len(jsonl(lines))
    assert file.filename == "input.jsonl" and file.expires_at is not None
    raw = oai.batches.with_raw_response.create(
        input_file_id=file.id,
        endpoint=CHAT,
        completion_window="24h",
        metadata={"mixbatch": "tenant-a", "group": "g1"},
    )
    assert raw.headers["x-request-id"].startswith("req_")
    assert raw.headers["request-id"] == raw.headers["x-request-id"]
    assert raw.headers["x-mixbatch-sandbox"] == "1"
    created = raw.parse()
    assert created.id.startswith("batch_") and created.object == "batch"
    assert created.status == "validating"
    assert created.request_counts is not None and created.request_counts.total == 0
    assert created.expires_at == created.created_at + 86_400
    done, polls = wait_openai(oai, created.id, OPENAI_TERMINAL)
    assert_monotonic(polls)
    assert done.status == "completed"
    assert done.model == "gpt-sandbox"
    assert done.metadata == {"mixbatch": "tenant-a", "group": "g1"}
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed) == (20, 20)
    assert done.request_counts.failed == 0
    assert done.in_progress_at and done.finalizing_at and done.completed_at
    assert created.created_at <= done.in_progress_at <= done.finalizing_at <= done.completed_at
    assert done.error_file_id is None and done.errors is None
    assert done.usage is not None and done.usage.output_tokens > 0
    assert done.output_file_id is not None
    out = oai.files.retrieve(done.output_file_id)
    assert out.purpose == "batch_output"
    results = read_jsonl(oai, done.output_file_id)
    assert out.bytes == len(oai.files.content(done.output_file_id).read())
    assert sorted(r["custom_id"] for r in results) == sorted(line["custom_id"] for line in lines)
    assert [r["custom_id"] for r in results] != [line["custom_id"] for line in lines]
    bodies = {line["custom_id"]: line["body"] for line in lines}
    for result in results:
        assert result["id"].startswith("batch_req_") and result["error"] is None
        response = result["response"]
        assert response["status_code"] == 200 and response["request_id"].startswith("req_")
        assert response_text(CHAT, response["body"]) == expected_reply(
            CHAT, bodies[result["custom_id"]]
        )
    with oai.files.with_streaming_response.content(done.output_file_id) as streamed:
        streamed_bytes = b"".join(streamed.iter_bytes(chunk_size=100))
    assert streamed_bytes == oai.files.content(done.output_file_id).read()
    stats = srv.stats()["batches"]
    assert stats["created"] == {"openai": 1, "anthropic": 0}
    assert stats["lines_processed"]["openai"] == 20


def test_openai_embeddings_batch_from_a_path(
    oai: openai.OpenAI, srv: SandboxServer, tmp_path: Path
) -> None:
    bodies = {
        f"e-{i}": {"model": "embed-sandbox", "input": [f"alpha {i}", f"beta {i}"], "dimensions": 4}
        for i in range(6)
    }
    path = tmp_path / "embeddings.jsonl"
    path.write_bytes(
        jsonl(
            [
                {"custom_id": c, "method": "POST", "url": "/v1/embeddings", "body": b}
                for c, b in bodies.items()
            ]
        )
    )
    file = oai.files.create(file=path, purpose="batch")
    assert file.filename == "embeddings.jsonl"
    batch = oai.batches.create(
        input_file_id=file.id, endpoint="/v1/embeddings", completion_window="24h"
    )
    done, _ = wait_openai(oai, batch.id, OPENAI_TERMINAL)
    assert done.status == "completed"
    for result in read_jsonl(oai, done.output_file_id):
        vectors = [item["embedding"] for item in result["response"]["body"]["data"]]
        assert vectors == expected_embeddings(bodies[result["custom_id"]])


def test_timestamps_are_in_sandbox_time(oai: openai.OpenAI, srv: SandboxServer) -> None:
    srv.configure(time_scale=20_000.0, batch_turnaround_s=3600.0, batch_validating_s=600.0)
    started = time.monotonic()
    done, _ = wait_openai(oai, start_batch(oai, chat_lines(3)).id, OPENAI_TERMINAL)
    assert time.monotonic() - started < 5.0
    assert done.in_progress_at is not None and done.completed_at is not None
    assert done.in_progress_at - done.created_at in (600, 601)
    assert done.completed_at - done.created_at in (3600, 3601)


def test_openai_partial_failures(oai: openai.OpenAI, srv: SandboxServer) -> None:
    srv.configure(batch_line_fail_rate=0.5, seed=11)
    lines = chat_lines(24)
    predicted = {line["custom_id"]: line_fault(11, line["custom_id"], 0, 0.5) for line in lines}
    assert {None, 400, 500} <= set(predicted.values())
    done, polls = wait_openai(oai, start_batch(oai, lines).id, OPENAI_TERMINAL)
    assert_monotonic(polls)
    assert done.status == "completed"
    failing = {c for c, status in predicted.items() if status is not None}
    assert done.request_counts is not None
    assert done.request_counts.failed == len(failing)
    assert done.request_counts.completed == 24 - len(failing)
    assert {r["custom_id"] for r in read_jsonl(oai, done.output_file_id)} == set(
        predicted
    ) - failing
    errors = read_jsonl(oai, done.error_file_id)
    assert {r["custom_id"] for r in errors} == failing
    for record in errors:
        status = predicted[record["custom_id"]]
        assert record["error"] is None
        assert record["response"]["status_code"] == status
        kind = "invalid_request_error" if status == 400 else "server_error"
        assert record["response"]["body"]["error"]["type"] == kind
    retry = [line for line in lines if line["custom_id"] in failing]
    again, _ = wait_openai(oai, start_batch(oai, retry).id, OPENAI_TERMINAL)
    still = {
        r["custom_id"]: r["response"]["status_code"] for r in read_jsonl(oai, again.error_file_id)
    }
    for custom_id in failing:
        assert still.get(custom_id) == line_fault(11, custom_id, 1, 0.5)
        if predicted[custom_id] == 400:
            assert still[custom_id] == 400


def test_openai_expiry_keeps_finished_lines(oai: openai.OpenAI, srv: SandboxServer) -> None:
    srv.configure(batch_expire=True, batch_expire_done_fraction=0.3, time_scale=400_000.0)
    lines = chat_lines(10)
    done, polls = wait_openai(oai, start_batch(oai, lines).id, OPENAI_TERMINAL)
    assert_monotonic(polls)
    assert done.status == "expired"
    assert done.expired_at == done.expires_at
    assert done.completed_at is None and done.finalizing_at is None
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed) == (10, 3)
    kept = read_jsonl(oai, done.output_file_id)
    assert len(kept) == 3
    bodies = {line["custom_id"]: line["body"] for line in lines}
    for result in kept:
        body = result["response"]["body"]
        assert response_text(CHAT, body) == expected_reply(CHAT, bodies[result["custom_id"]])
    lost = read_jsonl(oai, done.error_file_id)
    assert len(lost) == 7
    assert {r["custom_id"] for r in kept} | {r["custom_id"] for r in lost} == set(bodies)
    assert all(r["response"] is None and r["error"]["code"] == "batch_expired" for r in lost)


def test_openai_cancel_keeps_finished_lines(oai: openai.OpenAI, srv: SandboxServer) -> None:
    srv.configure(time_scale=100.0, batch_turnaround_s=300.0)
    lines = chat_lines(20)
    batch = start_batch(oai, lines)
    running = oai.batches.retrieve(batch.id)
    while running.request_counts is None or running.request_counts.completed < 2:
        time.sleep(0.01)
        running = oai.batches.retrieve(batch.id)
    cancelling = oai.batches.cancel(batch.id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at is not None
    assert cancelling.request_counts is not None
    finished = cancelling.request_counts.completed
    assert 2 <= finished < 20
    done, polls = wait_openai(oai, batch.id, OPENAI_TERMINAL)
    assert_monotonic([running, cancelling, *polls])
    assert done.status == "cancelled" and done.cancelled_at is not None
    assert done.request_counts is not None and done.request_counts.completed == finished
    assert len(read_jsonl(oai, done.output_file_id)) == finished
    dropped = read_jsonl(oai, done.error_file_id)
    assert len(dropped) == 20 - finished
    assert all(r["error"]["code"] == "batch_cancelled" for r in dropped)
    with pytest.raises(openai.BadRequestError, match="Cannot cancel a batch with status"):
        oai.batches.cancel(batch.id)


def test_openai_validation_failure_lists_lines(oai: openai.OpenAI) -> None:
    good = chat_lines(1)[0]
    content = "\n".join(
        [
            json.dumps(good),
            "{not json",
            json.dumps({**good, "custom_id": "b", "url": "/v1/embeddings"}),
            json.dumps({**good, "custom_id": "c", "body": chat_body("x", model="gpt-other")}),
            json.dumps({**good, "body": chat_body("dup")}),
            "",
            json.dumps({**good, "custom_id": "e", "body": {"model": "gpt-sandbox"}}),
            json.dumps({"method": "POST", "url": CHAT, "body": chat_body("x")}),
            json.dumps({**good, "custom_id": "g", "method": "GET"}),
        ]
    ).encode()
    file = oai.files.create(file=("bad.jsonl", content), purpose="batch")
    batch = oai.batches.create(input_file_id=file.id, endpoint=CHAT, completion_window="24h")
    assert batch.status == "validating" and batch.errors is None
    done, polls = wait_openai(oai, batch.id, OPENAI_TERMINAL)
    assert_monotonic(polls)
    assert done.status == "failed" and done.failed_at is not None
    assert done.in_progress_at is None and done.output_file_id is None
    assert done.error_file_id is None
    assert done.request_counts is not None and done.request_counts.total == 0
    assert done.errors is not None and done.errors.data is not None
    found = [(e.line, e.code, e.param) for e in done.errors.data]
    assert found == [
        (2, "invalid_json_line", None),
        (3, "url_mismatch", "url"),
        (4, "model_mismatch", "body.model"),
        (5, "duplicate_custom_id", "custom_id"),
        (7, "invalid_request", "body.messages"),
        (8, "missing_required_parameter", "custom_id"),
        (9, "invalid_method", "method"),
    ]


def test_openai_refusals_at_the_call(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as not_jsonl:
        oai.files.create(file=("input.csv", b"a,b\n"), purpose="batch")
    assert not_jsonl.value.body == {
        "message": "Invalid file format for Batch API. Must be .jsonl",
        "type": "invalid_request_error",
        "param": "file",
        "code": None,
    }
    notes = oai.files.create(file=("notes.txt", b"hello"), purpose="user_data")
    file_id = upload(oai, chat_lines(1))
    cases: list[tuple[dict[str, Any], str]] = [
        ({"input_file_id": "file-nope"}, "input_file_id"),
        ({"input_file_id": notes.id}, "input_file_id"),
        ({"endpoint": "/v1/completions"}, "endpoint"),
        ({"endpoint": "/v1/messages"}, "endpoint"),
        ({"completion_window": "48h"}, "completion_window"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
        ({"metadata": {"k" * 65: "v"}}, "metadata"),
        ({"metadata": {"k": "v" * 513}}, "metadata.k"),
    ]
    for change, param in cases:
        args: dict[str, Any] = {
            "input_file_id": file_id,
            "endpoint": CHAT,
            "completion_window": "24h",
            **change,
        }
        with pytest.raises(openai.BadRequestError) as refused:
            oai.batches.create(**args)
        assert refused.value.param == param, change
    with pytest.raises(openai.NotFoundError):
        oai.batches.retrieve("batch_nope")
    with pytest.raises(openai.NotFoundError):
        oai.files.content("file-nope")


def test_openai_stuck_finalizing(oai: openai.OpenAI, srv: SandboxServer) -> None:
    srv.configure(batch_stuck_finalizing=True, time_scale=100.0)
    batch = start_batch(oai, chat_lines(4))
    stuck, polls = wait_openai(oai, batch.id, {"finalizing", *OPENAI_TERMINAL})
    assert stuck.status == "finalizing"
    time.sleep(0.2)
    later = oai.batches.retrieve(batch.id)
    assert_monotonic([*polls, later])
    assert later.status == "finalizing" and later.completed_at is None
    assert later.output_file_id is None and later.error_file_id is None
    assert later.request_counts is not None and later.request_counts.completed == 4
    with pytest.raises(openai.BadRequestError, match="finalizing"):
        oai.batches.cancel(batch.id)


def test_openai_listing_pages(oai: openai.OpenAI, srv: SandboxServer) -> None:
    file_id = upload(oai, chat_lines(2))
    created = [
        oai.batches.create(
            input_file_id=file_id,
            endpoint=CHAT,
            completion_window="24h",
            metadata={"mixbatch": f"n{i}"},
        ).id
        for i in range(5)
    ]
    first = oai.batches.list(limit=2)
    assert first.has_more is True and len(first.data) == 2
    assert [b.id for b in first.data] == [created[4], created[3]]
    envelope = first.model_dump()
    assert (envelope["first_id"], envelope["last_id"]) == (created[4], created[3])
    calls_before = srv.stats()["calls_by_endpoint"].get("/v1/batches", 0)
    listed = list(oai.batches.list(limit=2))
    assert [b.id for b in listed] == created[::-1]
    assert srv.stats()["calls_by_endpoint"]["/v1/batches"] - calls_before == 3
    assert listed[0].metadata == {"mixbatch": "n4"}
    tail = oai.batches.list(limit=2, after=created[1])
    assert [b.id for b in tail.data] == [created[0]] and tail.has_more is False
    more = [upload(oai, chat_lines(1, prefix=f"f{i}")) for i in range(2)]
    files = list(oai.files.list(limit=2, purpose="batch"))
    assert [f.id for f in files] == [*more[::-1], file_id]
    oldest_first = list(oai.files.list(limit=2, order="asc", purpose="batch"))
    assert [f.id for f in oldest_first] == [file_id, *more]
    deleted = oai.files.delete(more[0])
    assert deleted.deleted is True and deleted.id == more[0]
    with pytest.raises(openai.NotFoundError):
        oai.files.retrieve(more[0])
    assert [f.id for f in oai.files.list(after=more[1], purpose="batch")] == [file_id]


# --- Anthropic: full cycles -----------------------------------------------------------------


def test_anthropic_batch_ends_with_results(ant: anthropic.Anthropic, srv: SandboxServer) -> None:
    requests = ant_requests(12)
    raw = ant.messages.batches.with_raw_response.create(requests=requests)  # type: ignore[arg-type]
    assert raw.headers["request-id"].startswith("req_")
    created = raw.parse()
    assert created.id.startswith("msgbatch_") and created.type == "message_batch"
    assert created.processing_status == "in_progress"
    assert created.request_counts.processing == 12 and created.request_counts.succeeded == 0
    assert created.results_url is None and created.ended_at is None
    assert (created.expires_at - created.created_at).total_seconds() == 86_400
    with pytest.raises(anthropic.AnthropicError, match="results_url"):
        ant.messages.batches.results(created.id)
    ended = wait_anthropic(ant, created.id)
    assert ended.request_counts.succeeded == 12 and ended.request_counts.processing == 0
    assert ended.ended_at is not None and ended.archived_at is None
    assert ended.results_url == f"{srv.url}/v1/messages/batches/{created.id}/results"
    results = list(ant.messages.batches.results(created.id))
    assert [r.custom_id for r in results] != [r["custom_id"] for r in requests]
    params = {r["custom_id"]: r["params"] for r in requests}
    for item in results:
        assert item.result.type == "succeeded"
        text = response_text("/v1/messages", item.result.message.model_dump())
        assert text == expected_reply("/v1/messages", params[item.custom_id])
    assert srv.stats()["batches"]["lines_processed"]["anthropic"] == 12


def test_anthropic_partial_failures(ant: anthropic.Anthropic, srv: SandboxServer) -> None:
    srv.configure(batch_line_fail_rate=0.5, seed=5)
    requests = ant_requests(16)
    requests.append({"custom_id": "no-max-tokens", "params": {"model": "claude-sandbox"}})
    requests[-1]["params"]["messages"] = [{"role": "user", "content": "hi"}]
    batch = ant.messages.batches.create(requests=requests)  # type: ignore[arg-type]
    ended = wait_anthropic(ant, batch.id)
    predicted = {r["custom_id"]: line_fault(5, r["custom_id"], 0, 0.5) for r in requests[:-1]}
    results = results_by_id(ant, batch.id)
    assert ended.request_counts.errored == 1 + sum(s is not None for s in predicted.values())
    bad = results.pop("no-max-tokens")
    assert bad.type == "errored"
    assert bad.error.error.type == "invalid_request_error"
    assert bad.error.error.message == "max_tokens: Field required"
    for custom_id, result in results.items():
        status = predicted[custom_id]
        if status is None:
            assert result.type == "succeeded"
        else:
            assert result.type == "errored"
            kind = "invalid_request_error" if status == 400 else "api_error"
            assert result.error.error.type == kind
            assert result.error.request_id.startswith("req_")


def test_anthropic_expiry(ant: anthropic.Anthropic, srv: SandboxServer) -> None:
    srv.configure(batch_expire=True, batch_expire_done_fraction=0.5, time_scale=400_000.0)
    batch = ant.messages.batches.create(requests=ant_requests(8))  # type: ignore[arg-type]
    ended = wait_anthropic(ant, batch.id)
    counts = ended.request_counts
    assert (counts.succeeded, counts.expired, counts.processing) == (4, 4, 0)
    assert ended.ended_at == ended.expires_at
    kinds = sorted(r.type for r in results_by_id(ant, batch.id).values())
    assert kinds == ["expired"] * 4 + ["succeeded"] * 4


def test_anthropic_cancel(ant: anthropic.Anthropic, srv: SandboxServer) -> None:
    srv.configure(time_scale=100.0, batch_turnaround_s=300.0)
    batch = ant.messages.batches.create(requests=ant_requests(20))  # type: ignore[arg-type]
    with pytest.raises(anthropic.BadRequestError, match="still processing"):
        ant.messages.batches.delete(batch.id)
    time.sleep(0.5)
    canceling = ant.messages.batches.cancel(batch.id)
    assert canceling.processing_status == "canceling"
    assert canceling.cancel_initiated_at is not None
    assert canceling.request_counts.processing == 20
    ended = wait_anthropic(ant, batch.id)
    assert ended.cancel_initiated_at == canceling.cancel_initiated_at
    counts = ended.request_counts
    assert 0 < counts.succeeded < 20 and counts.succeeded + counts.canceled == 20
    results = results_by_id(ant, batch.id)
    assert sum(r.type == "canceled" for r in results.values()) == counts.canceled
    with pytest.raises(anthropic.BadRequestError, match="Cannot cancel"):
        ant.messages.batches.cancel(batch.id)


def test_anthropic_stuck_batch_never_ends_until_cancelled(
    ant: anthropic.Anthropic, srv: SandboxServer
) -> None:
    srv.configure(batch_stuck_finalizing=True, time_scale=1000.0)
    batch = ant.messages.batches.create(requests=ant_requests(3))  # type: ignore[arg-type]
    time.sleep(0.2)
    stuck = ant.messages.batches.retrieve(batch.id)
    assert stuck.processing_status == "in_progress" and stuck.results_url is None
    ant.messages.batches.cancel(batch.id)
    ended = wait_anthropic(ant, batch.id)
    assert ended.request_counts.succeeded == 3 and ended.request_counts.canceled == 0


def test_anthropic_refusals_at_the_call(ant: anthropic.Anthropic) -> None:
    cases = [
        ([{"custom_id": "x" * 65, "params": msg_params("a")}], "at most 64 characters"),
        ([{"custom_id": "has space", "params": msg_params("a")}], "should match pattern"),
        ([{"custom_id": "d", "params": msg_params("a")}] * 2, "Duplicate custom_id"),
        ([], "at least 1 item"),
        ([{"custom_id": "p"}], "requests.0.params: Field required"),
    ]
    for requests, message in cases:
        with pytest.raises(anthropic.BadRequestError, match=message) as refused:
            ant.messages.batches.create(requests=requests)  # type: ignore[arg-type]
        assert refused.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    with pytest.raises(anthropic.NotFoundError):
        ant.messages.batches.retrieve("msgbatch_nope")


def test_anthropic_listing_and_delete(ant: anthropic.Anthropic, srv: SandboxServer) -> None:
    srv.configure(time_scale=1000.0)
    requests: list[Any] = [ant_requests(1, prefix=f"mb{i}") for i in range(5)]
    created = [ant.messages.batches.create(requests=r).id for r in requests]
    newest_first = created[::-1]
    first = ant.messages.batches.list(limit=2)
    assert [b.id for b in first.data] == newest_first[:2]
    assert first.has_more is True
    assert (first.first_id, first.last_id) == (newest_first[0], newest_first[1])
    assert [b.id for b in ant.messages.batches.list(limit=2)] == newest_first
    older = ant.messages.batches.list(after_id=newest_first[1], limit=2)
    assert [b.id for b in older.data] == newest_first[2:4] and older.has_more is True
    newer = ant.messages.batches.list(before_id=created[0], limit=2)
    assert [b.id for b in newer.data] == newest_first[2:4] and newer.has_more is True
    backwards = [b.id for b in ant.messages.batches.list(before_id=created[0], limit=2)]
    assert backwards == newest_first[2:4] + newest_first[:2]
    wait_anthropic(ant, created[2])
    gone = ant.messages.batches.delete(created[2])
    assert (gone.id, gone.type) == (created[2], "message_batch_deleted")
    with pytest.raises(anthropic.NotFoundError):
        ant.messages.batches.retrieve(created[2])
    assert created[2] not in [b.id for b in ant.messages.batches.list()]
    after_gone = ant.messages.batches.list(after_id=created[2])
    assert [b.id for b in after_gone.data] == created[1::-1]


# --- faults, auth and admin -----------------------------------------------------------------


def test_rate_429_on_create_and_upload(
    oai: openai.OpenAI, ant: anthropic.Anthropic, srv: SandboxServer
) -> None:
    file_id = upload(oai, chat_lines(1))
    srv.configure(batch_rate_429=1.0, retry_after_s=3)
    with pytest.raises(openai.RateLimitError) as upload_limited:
        oai.files.create(file=("input.jsonl", jsonl(chat_lines(1))), purpose="batch")
    assert upload_limited.value.response.headers["retry-after"] == "3"
    with pytest.raises(openai.RateLimitError) as create_limited:
        oai.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h")
    assert create_limited.value.code == "rate_limit_exceeded"
    with pytest.raises(anthropic.RateLimitError) as ant_limited:
        ant.messages.batches.create(requests=ant_requests(1))  # type: ignore[arg-type]
    assert ant_limited.value.response.headers["retry-after"] == "3"
    assert srv.stats()["faults_by_kind"] == {"429": 3}
    assert list(oai.batches.list()) == []
    srv.configure(batch_rate_429=0.5, seed=3, retry_after_s=0.01)
    with openai.OpenAI(base_url=srv.openai_base_url, api_key="sk", max_retries=8) as patient:
        batch = patient.batches.create(
            input_file_id=file_id, endpoint=CHAT, completion_window="24h"
        )
    assert batch.status == "validating"


def test_batch_routes_check_the_key_and_shape_errors(srv: SandboxServer) -> None:
    with httpx.Client(base_url=srv.url) as bare:
        openai_shaped = bare.get("/v1/batches")
        anthropic_shaped = bare.get("/v1/messages/batches")
        bad_limit = bare.get("/v1/batches?limit=101", headers={"authorization": "Bearer k"})
    assert openai_shaped.status_code == 401
    assert set(openai_shaped.json()["error"]) == {"message", "type", "param", "code"}
    assert anthropic_shaped.status_code == 401
    assert anthropic_shaped.json()["error"]["type"] == "authentication_error"
    assert bad_limit.status_code == 400 and bad_limit.json()["error"]["param"] == "limit"


def test_results_route_waits_for_the_end(http: httpx.Client, srv: SandboxServer) -> None:
    srv.configure(time_scale=1.0, batch_turnaround_s=60.0)
    created = http.post(
        "/v1/messages/batches", json={"requests": ant_requests(1)}, headers={"x-api-key": "k"}
    )
    assert created.status_code == 200
    early = http.get(f"/v1/messages/batches/{created.json()['id']}/results")
    assert early.status_code == 400
    assert early.json()["error"]["type"] == "invalid_request_error"


def test_admin_knobs_stats_and_reset(http: httpx.Client, srv: SandboxServer) -> None:
    updated = http.post(
        "/sandbox/knobs", json={"time_scale": 1000.0, "batch_turnaround_s": 30.0}
    ).json()
    assert (updated["time_scale"], updated["batch_turnaround_s"]) == (1000.0, 30.0)
    for bad in ({"time_scale": 0}, {"batch_line_fail_rate": 2}, {"batch_expire": "maybe"}):
        assert http.post("/sandbox/knobs", json=bad).status_code == 400, bad
    created = http.post(
        "/v1/messages/batches", json={"requests": ant_requests(2)}, headers={"x-api-key": "k"}
    ).json()
    assert created["processing_status"] == "in_progress"
    time.sleep(0.1)
    stats = http.get("/sandbox/stats").json()["batches"]
    assert stats["created"] == {"openai": 0, "anthropic": 1}
    assert stats["lines_processed"] == {"openai": 0, "anthropic": 2}
    assert stats["lines_by_result"]["succeeded"] == 2
    http.post("/sandbox/reset")
    assert http.get(f"/v1/messages/batches/{created['id']}").status_code == 404
    assert srv.stats()["batches"]["created"] == {"openai": 0, "anthropic": 0}
    assert math.isclose(srv.knobs.time_scale, 1000.0)


def test_stats_count_custom_ids_sent_in_more_than_one_batch(
    http: httpx.Client, srv: SandboxServer
) -> None:
    """What the fault tests read to show no request was created twice."""
    for requests in (ant_requests(2), ant_requests(3), ant_requests(1)):
        reply = http.post(
            "/v1/messages/batches", json={"requests": requests}, headers={"x-api-key": "k"}
        )
        assert reply.status_code == 200
    assert srv.stats()["batches"]["custom_ids_resent"] == 2, "the first two ids, sent again"
    http.post("/sandbox/reset")
    assert srv.stats()["batches"]["custom_ids_resent"] == 0
