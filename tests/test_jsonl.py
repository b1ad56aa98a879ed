"""The OpenAI batch input format in, the OpenAI batch output format out; errors name the line."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest

from routing.errors import InvalidRequest, MalformedInput
from routing.jsonl import BatchLine, output_line, parse_batch_lines, read_batch_file, write_output
from routing.models import ErrorInfo, Result, Route
from routing.states import State

NOW = 1_700_000_000.0


def line(**fields: Any) -> str:
    obj: dict[str, Any] = {
        "custom_id": "req-1",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
    }
    for key, value in fields.items():
        if value is None:
            obj.pop(key, None)
        else:
            obj[key] = value
    return json.dumps(obj)


def malformed(lines: list[str], source: str = "batch.jsonl") -> MalformedInput:
    with pytest.raises(MalformedInput) as info:
        parse_batch_lines(lines, source=source)
    return info.value


def test_a_good_file() -> None:
    lines = [
        line(custom_id="a"),
        line(custom_id="b", url="/v1/embeddings", body={"model": "e", "input": "x"}),
        line(custom_id="c", method=None),
        line(custom_id="d", method="post", url="/v1/responses", body={"model": "m"}),
        line(custom_id="e", url="/v1/messages", body={"model": "claude", "max_tokens": 1}),
    ]
    parsed = parse_batch_lines(lines)
    assert [p.custom_id for p in parsed] == ["a", "b", "c", "d", "e"]
    assert [p.url for p in parsed] == [
        "/v1/chat/completions",
        "/v1/embeddings",
        "/v1/chat/completions",
        "/v1/responses",
        "/v1/messages",
    ]
    assert parsed[2].method == "POST"
    assert parsed[1].body == {"model": "e", "input": "x"}
    assert all(isinstance(p, BatchLine) for p in parsed)


def test_read_batch_file_takes_a_handle_with_newlines_and_blank_lines() -> None:
    handle = io.StringIO(line(custom_id="a") + "\n\n   \n" + line(custom_id="b") + "\n\n")
    assert [p.custom_id for p in read_batch_file(handle, "in.jsonl")] == ["a", "b"]
    assert parse_batch_lines([]) == []
    assert parse_batch_lines(["", "\n", "\t\n"]) == []


def test_each_parsed_line_knows_its_line_number() -> None:
    """Checks that come later (``prepare`` in ``mixbatch submit``) name the line through it."""
    parsed = parse_batch_lines(["", line(custom_id="a"), "   ", line(custom_id="b")])
    assert [p.line for p in parsed] == [2, 4]


@pytest.mark.parametrize("bad", ["{", "not json", '{"custom_id": "x",}', "{'a': 1}"])
def test_malformed_json_names_the_line(bad: str) -> None:
    err = malformed([line(custom_id="a"), "", line(custom_id="b"), bad, line(custom_id="c")])
    assert err.line == 4
    assert err.source == "batch.jsonl"
    assert str(err).startswith("batch.jsonl, line 4: not JSON")
    assert "column" in str(err)
    assert isinstance(err, InvalidRequest)


@pytest.mark.parametrize("bad", ["[1, 2]", '"text"', "42", "null", "true"])
def test_not_an_object(bad: str) -> None:
    err = malformed([line(), bad])
    assert err.line == 2
    assert str(err) == "batch.jsonl, line 2: each line must be a JSON object"


@pytest.mark.parametrize(
    "fields,field",
    [
        ({"body": None}, "body"),
        ({"url": None}, "url"),
        ({"custom_id": None}, "custom_id"),
        ({"body": "text"}, "body"),
        ({"body": [1]}, "body"),
        ({"custom_id": 7}, "custom_id"),
        ({"extra": 1}, "extra"),
    ],
)
def test_missing_or_bad_field_names_line_and_field(fields: dict[str, Any], field: str) -> None:
    err = malformed([line(custom_id="ok"), line(**fields)])
    assert err.line == 2
    assert str(err).startswith(f"batch.jsonl, line 2: {field}"), str(err)


@pytest.mark.parametrize("method", ["GET", "DELETE", "put"])
def test_wrong_method(method: str) -> None:
    err = malformed([line(method=method)])
    assert err.line == 1
    assert f"method {method!r}" in str(err)
    assert "only POST" in str(err)


@pytest.mark.parametrize(
    "url", ["/v1/completions", "/v1/chat/completions/", "https://api.openai.com/v1/embeddings", ""]
)
def test_unknown_url(url: str) -> None:
    err = malformed([line(custom_id="a"), line(custom_id="b", url=url)])
    assert err.line == 2
    assert f"url {url!r} is not a supported endpoint" in str(err)
    assert "/v1/chat/completions" in str(err), "the message lists what is supported"


def test_duplicate_custom_id_names_both_lines() -> None:
    err = malformed(
        [line(custom_id="a"), "", line(custom_id="dup"), line(custom_id="b"), line(custom_id="dup")]
    )
    assert err.line == 5
    assert str(err) == "batch.jsonl, line 5: custom_id 'dup' repeats line 3"


def test_blank_lines_keep_the_numbering() -> None:
    err = malformed(["", "\n", line(custom_id="a"), "   ", "oops"])
    assert err.line == 5


def test_the_first_bad_line_is_reported() -> None:
    err = malformed([line(custom_id="a"), "{", line(method="GET")])
    assert err.line == 2


def test_default_source_name() -> None:
    with pytest.raises(MalformedInput, match=r"^input, line 1: "):
        parse_batch_lines(["{"])


# -- output ------------------------------------------------------------------------------------


def result(**fields: Any) -> Result:
    base: dict[str, Any] = {
        "id": "standard.01J0",
        "custom_id": "req-1",
        "lane": "standard",
        "status": State.DONE,
        "deadline": NOW + 60,
        "created_at": NOW,
        "finished_at": NOW + 5,
    }
    return Result(**{**base, **fields})


def test_output_line_for_a_done_result() -> None:
    body = {"id": "chatcmpl-1", "choices": [{"message": {"content": "hello"}}]}
    done = result(status_code=200, body=body, route=Route.BATCH, usage={"total_tokens": 3})
    assert output_line(done) == {
        "id": "standard.01J0",
        "custom_id": "req-1",
        "response": {"status_code": 200, "request_id": "standard.01J0", "body": body},
        "error": None,
    }


def test_output_line_for_a_done_result_without_status_code() -> None:
    out = output_line(result(body={"data": []}))
    assert out["response"] == {
        "status_code": 200,
        "request_id": "standard.01J0",
        "body": {"data": []},
    }
    assert out["error"] is None


def test_output_line_for_a_failed_result() -> None:
    failed = result(
        status=State.FAILED,
        error=ErrorInfo(code="server_error", message="boom", retryable=True, status_code=500),
    )
    assert output_line(failed) == {
        "id": "standard.01J0",
        "custom_id": "req-1",
        "response": None,
        "error": {"code": "server_error", "message": "boom"},
    }


def test_output_line_for_a_failed_result_with_a_provider_error_body() -> None:
    body = {"error": {"message": "bad model", "type": "invalid_request_error"}}
    out = output_line(
        result(
            status=State.FAILED,
            status_code=400,
            body=body,
            error=ErrorInfo(code="invalid_request_error", message="bad model", status_code=400),
        )
    )
    assert out["response"] == {"status_code": 400, "request_id": "standard.01J0", "body": body}
    assert out["error"] is None


def test_write_output_is_one_compact_json_object_a_line() -> None:
    results = [
        result(id="standard.A", custom_id="a", status_code=200, body={"ok": True}),
        result(
            id="standard.B",
            custom_id="b",
            status=State.CANCELLED,
            error=ErrorInfo(code="cancelled", message="cancelled by the caller"),
        ),
    ]
    text = "".join(write_output(results))
    lines = text.splitlines(keepends=True)
    assert len(lines) == 2
    assert all(raw.endswith("\n") and ", " not in raw for raw in lines)
    parsed = [json.loads(raw) for raw in lines]
    assert [p["custom_id"] for p in parsed] == ["a", "b"]
    assert parsed[0]["response"]["body"] == {"ok": True}
    assert parsed[1]["error"]["code"] == "cancelled"
