"""The ``mixbatch`` command against a real Redis: submit, status, lanes, results, help, sandbox.

Most commands run in-process through click's ``CliRunner`` (fast); the settings are cached per
process, so every invocation is wrapped in ``reset_settings()``. The sandbox, which blocks,
runs as a real subprocess and is spoken to with the official openai SDK.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import click
import openai
import pytest
from click.testing import CliRunner, Result

from config.settings import reset_settings
from routing.models import ServiceConfig, StoredResult
from routing.sandbox import expected_reply
from routing.states import State
from routing.store.lanes import LaneStore
from tasks.cli.main import cli
from tasks.cli.output import EXAMPLES

ROOT = Path(__file__).resolve().parent.parent
LANES = ("urgent", "standard", "bulk")
COMMANDS = (
    "submit",
    "estimate",
    "status",
    "results",
    "cancel",
    "lanes",
    "costs",
    "explain",
    "sandbox",
    "demo",
    "up",
)
#: Commands that run in the foreground until stopped and print logs: no --json, and say so.
LONG_RUNNING = ("up", "sandbox", "metrics", "flower")
SIX_HOURS_S = 6 * 3600.0

Invoke = Callable[..., Result]


# -- helpers -------------------------------------------------------------------------------


def chat_body(text: str, model: str = "gpt-4o-mini") -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}]}


def batch_line(
    custom_id: str, text: str = "hello", url: str = "/v1/chat/completions", **extra: Any
) -> str:
    obj = {"custom_id": custom_id, "method": "POST", "url": url, "body": chat_body(text), **extra}
    return json.dumps(obj)


def write_jsonl(path: Path, lines: Sequence[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def depths(store: LaneStore) -> dict[str, int]:
    return {lane: store.lane_stats(lane).depth for lane in LANES}


PROGRESS_PREFIXES = ("enqueueing into ", "waiting for answers")


def assert_clean_error(result: Result, code: int, *fragments: str) -> str:
    """A non-zero exit with one red line on stderr, no traceback, naming ``fragments``.

    A progress bar left on stderr before the error is tolerated; the error itself must be
    a single line (a log file or a pipe must not get it folded at 80 columns).
    """
    assert isinstance(result.exception, SystemExit), (
        f"uncaught {result.exception!r}; stderr={result.stderr!r}"
    )
    assert result.exit_code == code, (result.exit_code, result.stderr)
    assert "Traceback" not in result.output
    lines = [
        ln
        for ln in result.stderr.splitlines()
        if ln.strip() and not ln.startswith(PROGRESS_PREFIXES)
    ]
    assert lines, "no error message on stderr"
    message = "".join(lines)  # what rich folded, put back together
    assert message.startswith(("error:", "Error:")), message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert len(lines) == 1, f"expected a one-line error, got {lines!r}"
    return message


def tickets_of(result: Result) -> list[dict[str, Any]]:
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert isinstance(data, list)
    return data


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture
def base_env(redis_url: str, namespace: str) -> dict[str, str | None]:
    """The CLI's environment: our Redis and namespace, everything else at its default.

    ``COLUMNS`` is unset so rich formats for an 80-column pipe, as it does in a log file.
    """
    return {
        "MIXBATCH_REDIS_URL": redis_url,
        "MIXBATCH_NAMESPACE": namespace,
        "MIXBATCH_LANES_FILE": None,
        "MIXBATCH_MAX_BODY_BYTES": None,
        "COLUMNS": None,
    }


@pytest.fixture
def invoke(base_env: dict[str, str | None], store: LaneStore) -> Iterator[Invoke]:
    """Run ``mixbatch ARGS`` in-process; ``env`` entries override the base environment."""
    runner = CliRunner()

    def run(*args: str, env: Mapping[str, str | None] | None = None) -> Result:
        reset_settings()
        try:
            return runner.invoke(cli, list(args), env={**base_env, **(env or {})})
        finally:
            reset_settings()

    yield run
    reset_settings()


@pytest.fixture
def batch3(tmp_path: Path) -> Path:
    return write_jsonl(
        tmp_path / "batch.jsonl",
        [batch_line("doc-1", "one"), batch_line("doc-2", "two"), batch_line("doc-3", "three")],
    )


# -- submit --------------------------------------------------------------------------------


def test_submit_enqueues_every_line_and_is_idempotent(
    invoke: Invoke, store: LaneStore, batch3: Path
) -> None:
    before = time.time()
    result = invoke("submit", str(batch3), "--lane", "bulk", "--deadline", "6h", "--tenant", "t1")
    assert result.exit_code == 0, result.output
    assert "enqueued 3 requests into bulk (0 already there)" in result.stdout

    stats = store.lane_stats("bulk")
    assert stats.depth == 3
    assert stats.counts.get(State.QUEUED.value) == 3
    assert stats.nearest_deadline_s is not None
    assert SIX_HOURS_S - 60 < stats.nearest_deadline_s <= SIX_HOURS_S
    assert depths(store) == {"urgent": 0, "standard": 0, "bulk": 3}

    again = invoke("submit", str(batch3), "--lane", "bulk", "--deadline", "6h", "--tenant", "t1")
    assert again.exit_code == 0, again.output
    assert "enqueued 0 requests into bulk (3 already there)" in again.stdout
    assert store.lane_stats("bulk").depth == 3

    # the same custom_ids are per tenant: another tenant's file is new work
    other = invoke("submit", str(batch3), "--lane", "bulk", "--tenant", "t2")
    assert other.exit_code == 0, other.output
    assert "enqueued 3 requests into bulk (0 already there)" in other.stdout
    assert store.lane_stats("bulk").depth == 6
    assert time.time() - before < 30


def test_submit_json_prints_the_tickets(invoke: Invoke, store: LaneStore, batch3: Path) -> None:
    now = time.time()
    args = ("submit", str(batch3), "--lane", "bulk", "--deadline", "6h", "--tenant", "t1", "--json")
    tickets = tickets_of(invoke(*args))
    assert [t["custom_id"] for t in tickets] == ["doc-1", "doc-2", "doc-3"]
    assert len({t["id"] for t in tickets}) == 3
    for ticket in tickets:
        assert ticket["lane"] == "bulk"
        assert ticket["duplicate"] is False
        assert ticket["id"].startswith("bulk.")
        assert now + SIX_HOURS_S - 60 < ticket["deadline"] < now + SIX_HOURS_S + 60
        info = store.status(ticket["id"])
        assert info.state is State.QUEUED
        assert info.tenant == "t1"
        assert info.custom_id == ticket["custom_id"]
        assert store.prepared(ticket["id"]).body["messages"][0]["role"] == "user"

    again = tickets_of(invoke(*args))
    assert [t["id"] for t in again] == [t["id"] for t in tickets]
    assert all(t["duplicate"] for t in again)
    assert store.lane_stats("bulk").depth == 3


def test_submit_default_lane_and_deadline(invoke: Invoke, store: LaneStore, batch3: Path) -> None:
    tickets = tickets_of(invoke("submit", str(batch3), "--json"))
    assert {t["lane"] for t in tickets} == {"standard"}
    assert depths(store) == {"urgent": 0, "standard": 3, "bulk": 0}
    nearest = store.lane_stats("standard").nearest_deadline_s
    assert nearest is not None
    assert 3500 < nearest <= 3600  # the standard lane's default deadline is 1h


def test_submit_wait_returns_the_answers(invoke: Invoke, store: LaneStore, batch3: Path) -> None:
    """``--wait`` blocks until every request finished; here a thread plays the worker."""
    stop = threading.Event()

    def worker() -> None:
        done = 0
        while done < 3 and not stop.is_set():
            for claimed in store.claim("bulk", 10, lease_s=60):
                answer = {"status_code": 200, "body": {"echo": claimed.request.custom_id}}
                assert store.finish(
                    claimed.id, claimed.token, State.DONE, StoredResult.model_validate(answer)
                )
                done += 1
            time.sleep(0.02)

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    try:
        result = invoke("submit", str(batch3), "--lane", "bulk", "--wait", "--json")
    finally:
        stop.set()
        thread.join(10)
    assert result.exit_code == 0, result.output
    answers = json.loads(result.stdout)
    assert [a["custom_id"] for a in answers] == ["doc-1", "doc-2", "doc-3"]
    assert all(a["status"] == "done" for a in answers)
    assert [a["body"] for a in answers] == [{"echo": f"doc-{i}"} for i in (1, 2, 3)]


BAD_INPUTS: list[Any] = [
    pytest.param(
        [batch_line("a"), '{"custom_id": "b", "url": ', batch_line("c")],
        (),
        {},
        ("line 2", "not JSON"),
        id="malformed-json",
    ),
    pytest.param(
        [batch_line("a"), "[1, 2]"],
        (),
        {},
        ("line 2", "JSON object"),
        id="not-an-object",
    ),
    pytest.param(
        [batch_line("a"), json.dumps({"custom_id": "b", "url": "/v1/chat/completions"})],
        (),
        {},
        ("line 2", "body"),
        id="missing-body",
    ),
    pytest.param(
        [batch_line("a"), batch_line("b", method="GET")],
        (),
        {},
        ("line 2", "GET"),
        id="not-post",
    ),
    pytest.param(
        [batch_line("a"), batch_line("b")],
        ("--lane", "nope"),
        {},
        ("'nope'", "lane"),
        id="unknown-lane",
    ),
    pytest.param(
        [batch_line("a"), batch_line("b"), batch_line("c", url="/v1/completions")],
        (),
        {},
        ("line 3", "/v1/completions"),
        id="unknown-endpoint",
    ),
    pytest.param(
        [batch_line("a"), batch_line("b")],
        ("--deadline", "2001-01-01T00:00:00Z"),
        {},
        ("deadline", "2001-01-01", "past"),
        id="deadline-in-past",
    ),
    pytest.param(
        [batch_line("a"), batch_line("b")],
        ("--deadline", "tomorrow"),
        {},
        ("deadline", "'tomorrow'"),
        id="deadline-unparseable",
    ),
    pytest.param(
        [batch_line("a"), batch_line("b", "x" * 1000)],
        (),
        {"MIXBATCH_MAX_BODY_BYTES": "200"},
        ("200", "MIXBATCH_MAX_BODY_BYTES"),
        id="body-over-cap",
    ),
    pytest.param(
        [batch_line("a"), batch_line("b"), batch_line("a", "again")],
        (),
        {},
        ("'a'", "line 3", "line 1"),
        id="duplicate-custom-id",
    ),
    pytest.param(
        [
            batch_line("a"),
            json.dumps(
                {
                    "custom_id": "b",
                    "method": "POST",
                    "url": "/v1/embeddings",
                    "body": {"input": "x"},
                }
            ),
        ],
        (),
        {},
        ("model",),
        id="no-model",
    ),
]


@pytest.mark.parametrize(("lines", "args", "env", "fragments"), BAD_INPUTS)
def test_submit_bad_input_is_one_line_and_enqueues_nothing(
    invoke: Invoke,
    store: LaneStore,
    tmp_path: Path,
    lines: list[str],
    args: tuple[str, ...],
    env: dict[str, str],
    fragments: tuple[str, ...],
) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    result = invoke("submit", str(path), *args, env=env)
    assert result.exit_code == 2, result.output
    assert depths(store) == {"urgent": 0, "standard": 0, "bulk": 0}
    assert result.stdout == ""
    assert_clean_error(result, 2, *fragments)


def test_submit_body_over_cap_names_the_file_line(
    invoke: Invoke, store: LaneStore, tmp_path: Path
) -> None:
    """The submit help promises "a bad line is named": a too-big body on line 3 says line 3,
    not the 0-based index of the parsed item (blank line 2 is skipped by the parser)."""
    path = write_jsonl(tmp_path / "big.jsonl", [batch_line("a"), "", batch_line("b", "x" * 1000)])
    result = invoke("submit", str(path), env={"MIXBATCH_MAX_BODY_BYTES": "200"})
    assert_clean_error(result, 2, "line 3", "MIXBATCH_MAX_BODY_BYTES")
    assert depths(store)["standard"] == 0


def test_submit_error_names_a_path_with_brackets_verbatim(
    invoke: Invoke, store: LaneStore, tmp_path: Path
) -> None:
    """Error text is data, not rich markup: ``[draft]`` in a file name must survive."""
    path = write_jsonl(tmp_path / "batch[draft].jsonl", [batch_line("a"), "{oops"])
    result = invoke("submit", str(path))
    assert_clean_error(result, 2, "batch[draft].jsonl", "line 2")
    assert depths(store)["standard"] == 0


def test_submit_truncated_line_names_its_column(
    invoke: Invoke, store: LaneStore, tmp_path: Path
) -> None:
    """A line cut off mid-write: the column is where the line ends (27), not "column 1" of the
    newline that follows it."""
    truncated = '{"custom_id": "b", "url": '
    assert len(truncated) == 26
    path = write_jsonl(tmp_path / "cut.jsonl", [batch_line("a"), truncated])
    result = invoke("submit", str(path))
    assert result.exit_code == 2, result.output
    assert depths(store)["standard"] == 0
    assert_clean_error(result, 2, "line 2", "column 27")


def test_submit_missing_file_is_a_usage_error(invoke: Invoke, tmp_path: Path) -> None:
    result = invoke("submit", str(tmp_path / "absent.jsonl"))
    assert result.exit_code == 2
    assert "absent.jsonl" in result.stderr
    assert "Traceback" not in result.output


def test_submit_into_a_full_lane_exits_4_and_enqueues_nothing(
    invoke: Invoke, store: LaneStore, tmp_path: Path
) -> None:
    lanes_file = tmp_path / "lanes.toml"
    lanes_file.write_text(
        '[lanes.standard]\ndeadline = "1h"\npriority = 50\n\n'
        '[lanes.bulk]\ndeadline = "24h"\npriority = 10\nmax_queued = 2\n'
    )
    env = {"MIXBATCH_LANES_FILE": str(lanes_file)}
    path = write_jsonl(tmp_path / "three.jsonl", [batch_line(f"f-{i}") for i in range(3)])
    result = invoke("submit", str(path), "--lane", "bulk", env=env)
    assert result.exit_code == 4, result.output
    assert store.lane_stats("bulk").depth == 0, "a refused file must leave the lane untouched"
    assert_clean_error(result, 4, "'bulk'", "full")

    # a file that fits still goes in
    two = write_jsonl(tmp_path / "two.jsonl", [batch_line(f"g-{i}") for i in range(2)])
    ok = invoke("submit", str(two), "--lane", "bulk", env=env)
    assert ok.exit_code == 0, ok.output
    assert store.lane_stats("bulk").depth == 2

    # the lane is now at its cap, but resubmitting the same file adds nothing: not "full"
    again = invoke("submit", str(two), "--lane", "bulk", env=env)
    assert again.exit_code == 0, again.output
    assert "enqueued 0 requests into bulk (2 already there)" in again.stdout
    assert store.lane_stats("bulk").depth == 2


@pytest.fixture
def dead_redis_url() -> str:
    return f"redis://:secret@127.0.0.1:{free_port()}/0"


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(("submit", "{file}", "--lane", "bulk"), id="submit"),
        pytest.param(("status",), id="status"),
        pytest.param(("status", "bulk.01JD3ABCDEFGHJKMNPQRSTVWXY"), id="status-id"),
        pytest.param(("lanes",), id="lanes"),
        pytest.param(("results",), id="results"),
    ],
)
def test_unreachable_redis_exits_3_without_the_password(
    invoke: Invoke, batch3: Path, dead_redis_url: str, args: tuple[str, ...]
) -> None:
    argv = [a.replace("{file}", str(batch3)) for a in args]
    result = invoke(*argv, env={"MIXBATCH_REDIS_URL": dead_redis_url})
    port = dead_redis_url.rsplit(":", 1)[1].split("/")[0]
    message = assert_clean_error(result, 3, f"127.0.0.1:{port}")
    assert "secret" not in result.output
    assert "***" in message


# -- submit --callback ----------------------------------------------------------------------


@pytest.fixture
def sinks_file(tmp_path: Path) -> Path:
    path = tmp_path / "sinks.toml"
    path.write_text('[sinks.answers]\nkind = "stream"\nkey = "app:answers"\n')
    return path


@pytest.mark.parametrize(
    ("spec", "stored"),
    [
        ("sink:answers", {"sink": "answers"}),
        (
            "celery:app.tasks.save_answer@answers",
            {"kind": "celery", "task": "app.tasks.save_answer", "queue": "answers"},
        ),
        ("celery:app.tasks.save_answer", {"kind": "celery", "task": "app.tasks.save_answer"}),
    ],
    ids=["sink", "celery-with-queue", "celery"],
)
def test_submit_with_a_callback_stores_it_on_every_request(
    invoke: Invoke,
    store: LaneStore,
    batch3: Path,
    sinks_file: Path,
    spec: str,
    stored: dict[str, Any],
) -> None:
    env = {"MIXBATCH_SINKS_FILE": str(sinks_file)}
    tickets = tickets_of(invoke("submit", str(batch3), "--callback", spec, "--json", env=env))
    assert len(tickets) == 3
    for ticket in tickets:
        callback = store.prepared(ticket["id"]).callback
        assert callback is not None
        assert callback.model_dump(exclude_none=True) == stored


@pytest.mark.parametrize(
    ("spec", "fragments"),
    [
        ("webhook:https://example.com/x", ("--callback", "sink:NAME", "celery:TASK")),
        ("sink:", ("--callback", "sink:NAME")),
        ("celery:@q", ("--callback",)),
        ("sink:nope", ("--callback", "'nope'", "answers")),
        ("celery:mixbatch.deliver", ("--callback", "mixbatch")),
    ],
    ids=["unknown-kind", "no-sink-name", "no-task", "unknown-sink", "our-own-task"],
)
def test_submit_with_a_bad_callback_is_one_line_and_enqueues_nothing(
    invoke: Invoke,
    store: LaneStore,
    batch3: Path,
    sinks_file: Path,
    spec: str,
    fragments: tuple[str, ...],
) -> None:
    env = {"MIXBATCH_SINKS_FILE": str(sinks_file)}
    result = invoke("submit", str(batch3), "--callback", spec, env=env)
    assert_clean_error(result, 2, *fragments)
    assert depths(store) == {"urgent": 0, "standard": 0, "bulk": 0}


# -- status --------------------------------------------------------------------------------


def test_status_of_one_request(invoke: Invoke, store: LaneStore, batch3: Path) -> None:
    tickets = tickets_of(
        invoke("submit", str(batch3), "--lane", "bulk", "--tenant", "t1", "--json")
    )
    rid = tickets[0]["id"]

    table = invoke("status", rid)
    assert table.exit_code == 0, table.output
    for fragment in (rid, "queued", "t1", "doc-1", "bulk", "UTC"):
        assert fragment in table.stdout

    data = json.loads(invoke("status", rid, "--json").stdout)
    assert data["id"] == rid
    assert data["state"] == "queued"
    assert data["lane"] == "bulk"
    assert data["tenant"] == "t1"
    assert data["custom_id"] == "doc-1"
    assert data["attempts"] == 0
    assert data["deadline"] == pytest.approx(tickets[0]["deadline"])

    claimed = store.claim("bulk", 1, lease_s=60)
    assert len(claimed) == 1
    rid = claimed[0].id
    data = json.loads(invoke("status", rid, "--json").stdout)
    assert data["state"] == "claimed"
    assert data["attempts"] == 1


def test_status_per_lane_counts(invoke: Invoke, store: LaneStore, batch3: Path) -> None:
    assert invoke("submit", str(batch3), "--lane", "bulk").exit_code == 0
    urgent = write_jsonl(batch3.with_name("u.jsonl"), [batch_line("u-1")])
    assert invoke("submit", str(urgent), "--lane", "urgent").exit_code == 0

    counts = json.loads(invoke("status", "--json").stdout)
    assert list(counts) == ["urgent", "standard", "bulk"]  # by priority
    assert counts["bulk"]["queued"] == 3
    assert counts["urgent"]["queued"] == 1
    assert counts["standard"].get("queued", 0) == 0

    table = invoke("status")
    assert table.exit_code == 0, table.output
    assert "requests per state" in table.stdout
    rows = {ln.split()[1]: ln for ln in table.stdout.splitlines() if ln.split()[1:2]}
    assert "bulk" in rows and "3" in rows["bulk"].split()
    assert "urgent" in rows and "1" in rows["urgent"].split()


def test_status_of_an_empty_namespace(invoke: Invoke) -> None:
    result = invoke("status", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"urgent": {}, "standard": {}, "bulk": {}}


@pytest.mark.parametrize(
    ("request_id", "code", "fragments"),
    [
        ("bulk.01JD3ABCDEFGHJKMNPQRSTVWXY", 1, ("'bulk.01JD3ABCDEFGHJKMNPQRSTVWXY'",)),
        ("not-an-id", 2, ("'not-an-id'",)),
    ],
)
def test_status_of_an_unknown_id(
    invoke: Invoke, request_id: str, code: int, fragments: tuple[str, ...]
) -> None:
    assert_clean_error(invoke("status", request_id), code, *fragments)
    assert_clean_error(invoke("status", request_id, "--json"), code, *fragments)


# -- lanes ---------------------------------------------------------------------------------


def test_lanes_depth_age_and_deadline(invoke: Invoke, store: LaneStore, batch3: Path) -> None:
    assert invoke("submit", str(batch3), "--lane", "bulk", "--deadline", "6h").exit_code == 0
    store.claim("bulk", 1, lease_s=60)

    result = invoke("lanes", "--json")
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout)
    assert [s["lane"] for s in stats] == ["urgent", "standard", "bulk"]
    by_lane = {s["lane"]: s for s in stats}
    bulk = by_lane["bulk"]
    assert bulk["depth"] == 2
    assert bulk["leased"] == 1
    assert bulk["delayed"] == 0
    assert 0 <= bulk["oldest_age_s"] < 30
    assert SIX_HOURS_S - 60 < bulk["nearest_deadline_s"] <= SIX_HOURS_S
    for lane in ("urgent", "standard"):
        assert by_lane[lane]["depth"] == 0
        assert by_lane[lane]["oldest_age_s"] is None
        assert by_lane[lane]["nearest_deadline_s"] is None

    table = invoke("lanes")
    assert table.exit_code == 0, table.output
    bulk_row = next(ln for ln in table.stdout.splitlines() if " bulk " in ln)
    cells = bulk_row.replace("│", " ").split()
    assert cells[:5] == ["bulk", "10", "2", "0", "1"]
    assert "6.0h" in cells  # nearest deadline
    assert cells[-1] == "1000000"  # max_queued
    urgent_row = next(ln for ln in table.stdout.splitlines() if " urgent " in ln)
    assert urgent_row.replace("│", " ").split()[:5] == ["urgent", "100", "0", "0", "0"]


def test_lanes_follow_the_lanes_file(invoke: Invoke, tmp_path: Path) -> None:
    lanes_file = tmp_path / "lanes.toml"
    lanes_file.write_text('[lanes.nightly]\ndeadline = "12h"\npriority = 1\nmax_queued = 5\n')
    result = invoke("lanes", "--json", env={"MIXBATCH_LANES_FILE": str(lanes_file)})
    assert result.exit_code == 0, result.output
    assert [s["lane"] for s in json.loads(result.stdout)] == ["nightly"]


def test_missing_lanes_file_is_a_config_error(invoke: Invoke, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.toml"
    result = invoke("lanes", env={"MIXBATCH_LANES_FILE": str(missing)})
    assert_clean_error(result, 2, "MIXBATCH_LANES_FILE", "nowhere.toml")


def test_bad_setting_is_a_config_error(invoke: Invoke) -> None:
    """A malformed MIXBATCH_ variable is bad configuration: exit 2, one line naming it."""
    result = invoke("lanes", env={"MIXBATCH_MAX_BODY_BYTES": "lots"})
    assert_clean_error(result, 2, "MIXBATCH_MAX_BODY_BYTES")


# -- results -------------------------------------------------------------------------------


@pytest.fixture
def finished(invoke: Invoke, store: LaneStore, batch3: Path) -> dict[str, Any]:
    """doc-1 DONE, doc-2 FAILED, doc-3 still claimed; returns what was stored."""
    tickets = tickets_of(invoke("submit", str(batch3), "--lane", "bulk", "--json"))
    ids = {t["custom_id"]: t["id"] for t in tickets}
    claimed = {c.id: c for c in store.claim("bulk", 3, lease_s=60)}
    assert set(claimed) == set(ids.values())
    body = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
    }
    error = {"code": "invalid_request", "message": "the provider refused it"}
    one, two = claimed[ids["doc-1"]], claimed[ids["doc-2"]]
    assert store.finish(
        one.id,
        one.token,
        State.DONE,
        StoredResult.model_validate({"status_code": 200, "body": body}),
    )
    assert store.finish(
        two.id, two.token, State.FAILED, StoredResult.model_validate({"error": error})
    )
    return {"ids": ids, "body": body, "error": error}


def check_output_lines(lines: list[dict[str, Any]], finished: dict[str, Any]) -> None:
    ids = finished["ids"]
    assert [ln["custom_id"] for ln in lines] == ["doc-1", "doc-2"]  # finished order
    for ln in lines:
        assert set(ln) == {"id", "custom_id", "response", "error"}
        assert ln["id"] == ids[ln["custom_id"]]
    done, failed = lines
    assert done["error"] is None
    assert done["response"]["status_code"] == 200
    assert done["response"]["body"] == finished["body"]
    assert failed["error"] == finished["error"]
    assert failed["response"] is None


def test_results_out_writes_the_openai_batch_output_format(
    invoke: Invoke, finished: dict[str, Any], tmp_path: Path
) -> None:
    out = tmp_path / "answers.jsonl"
    result = invoke("results", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert f"wrote 2 results to {out}" in result.stderr.replace("\n", "")
    text = out.read_text()
    assert text.endswith("\n")
    check_output_lines([json.loads(ln) for ln in text.splitlines()], finished)


def test_results_to_stdout_and_filters(invoke: Invoke, finished: dict[str, Any]) -> None:
    result = invoke("results")
    assert result.exit_code == 0, result.output
    check_output_lines([json.loads(ln) for ln in result.stdout.splitlines()], finished)

    recent = invoke("results", "--lane", "bulk", "--since", "1h")
    assert recent.stdout == result.stdout

    assert invoke("results", "--lane", "urgent").stdout == ""
    assert invoke("results", "--lane", "bulk", "--lane", "urgent").stdout == result.stdout


def test_status_of_finished_requests(
    invoke: Invoke, store: LaneStore, finished: dict[str, Any]
) -> None:
    ids = finished["ids"]
    done = json.loads(invoke("status", ids["doc-1"], "--json").stdout)
    assert done["state"] == "done"
    assert done["outcome"] == "done"
    assert done["error"] is None
    failed = json.loads(invoke("status", ids["doc-2"], "--json").stdout)
    assert failed["state"] == "failed"
    assert failed["error"]["code"] == "invalid_request"
    table = invoke("status", ids["doc-2"])
    assert table.exit_code == 0, table.output
    assert "failed" in table.stdout
    assert "invalid_request" in table.stdout

    counts = json.loads(invoke("status", "--json").stdout)["bulk"]
    assert (counts["done"], counts["failed"], counts["claimed"]) == (1, 1, 1)
    assert counts.get("queued", 0) == 0


def test_results_json_is_one_document(
    invoke: Invoke, finished: dict[str, Any], tmp_path: Path
) -> None:
    result = invoke("results", "--json")
    assert result.exit_code == 0, result.output
    check_output_lines(json.loads(result.stdout), finished)

    out = tmp_path / "answers.jsonl"
    summary = invoke("results", "--out", str(out), "--json")
    assert summary.exit_code == 0, summary.output
    assert json.loads(summary.stdout) == {"results": 2, "out": str(out)}
    check_output_lines([json.loads(ln) for ln in out.read_text().splitlines()], finished)


def test_results_unknown_lane(invoke: Invoke) -> None:
    assert_clean_error(invoke("results", "--lane", "nope"), 2, "'nope'")


def test_results_bad_since_is_a_clean_error(invoke: Invoke) -> None:
    assert_clean_error(invoke("results", "--since", "soon"), 2, "'soon'")


# -- help ----------------------------------------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_help_shows_an_example(command: str) -> None:
    runner = CliRunner()
    for flag in ("--help", "-h"):
        result = runner.invoke(cli, [command, flag])
        assert result.exit_code == 0, result.output
        lines = result.stdout.splitlines()
        at = next(i for i, ln in enumerate(lines) if ln.strip() == "Example:")
        assert lines[at + 1].strip() == EXAMPLES[command]
        assert lines[at + 1].strip().startswith(f"mixbatch {command}")


def test_group_help_lists_every_command() -> None:
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0, result.output
    for command in COMMANDS:
        assert f"  {command} " in result.stdout
    assert set(COMMANDS) <= set(cli.commands)
    assert set(EXAMPLES) <= set(cli.commands)
    assert isinstance(cli, click.Group)


def _commands(group: click.Group, prefix: str = "") -> Iterator[tuple[str, click.Command]]:
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _commands(command, f"{prefix}{name} ")
        else:
            yield f"{prefix}{name}", command


def test_every_command_that_prints_takes_json() -> None:
    """CLI parity: every command has --json, except the long-running ones, whose help says
    why (they print logs)."""
    seen = dict(_commands(cli))
    assert {"cancel", "estimate", "dlq replay", "dlq drop", "results", "demo"} <= set(seen)
    for name, command in seen.items():
        flags = {opt for p in command.params for opt in getattr(p, "opts", [])}
        if name in LONG_RUNNING:
            help_text = " ".join((command.help or "").split())
            assert "long-running" in help_text, (name, help_text)
            continue
        assert "--json" in flags, f"`mixbatch {name}` has no --json"


def test_up_without_a_procfile_is_a_config_error(invoke: Invoke, tmp_path: Path) -> None:
    missing = tmp_path / "Procfile.none"
    assert_clean_error(invoke("up", "--procfile", str(missing)), 2, "Procfile")


# -- sandbox -------------------------------------------------------------------------------


def test_sandbox_port_in_use_is_a_clean_error(invoke: Invoke) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = invoke("sandbox", "--port", str(port))
    assert_clean_error(result, 2, str(port))


def test_sandbox_serves_the_openai_sdk(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "sandbox.log"
    with log.open("w") as log_fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tasks.cli.main", "sandbox", "--port", str(port)],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log_fh,
            stderr=subprocess.STDOUT,
        )
        try:
            body = chat_body("what is 2+2?")
            with openai.OpenAI(
                base_url=f"http://127.0.0.1:{port}/v1", api_key="anything", max_retries=0, timeout=5
            ) as client:
                deadline = time.monotonic() + 20
                while True:
                    assert proc.poll() is None, log.read_text()
                    try:
                        reply = client.chat.completions.create(**body)
                        break
                    except openai.APIConnectionError:
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.05)
            assert reply.choices[0].message.content == expected_reply("/v1/chat/completions", body)
            assert reply.model == "gpt-4o-mini"
            proc.send_signal(signal.SIGINT)  # Ctrl-C: a graceful stop and exit status 0
            assert proc.wait(timeout=15) == 0, log.read_text()
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    output = log.read_text()
    assert "SANDBOX" in output
    assert f"127.0.0.1:{port}" in output
    assert "Traceback" not in output


def test_service_config_fixture_matches_the_default_lanes(service_config: ServiceConfig) -> None:
    """The CLI reads config/lanes.toml while the fixtures publish it: they must agree."""
    assert [s.name for s in service_config.by_priority()] == list(LANES)


@pytest.mark.timeout(300)
def test_demo_json_prints_the_summary_on_stdout(tmp_path: Path) -> None:
    """The demo end to end (its own embedded Redis, sandbox, workers), its summary as JSON;
    progress stays on stderr."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIXBATCH_")}
    env["MIXBATCH_DATA_DIR"] = str(tmp_path / ".mixbatch")
    done = subprocess.run(
        [sys.executable, "-m", "tasks.cli.main", "demo", "--requests", "6", "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        timeout=280,
    )
    assert done.returncode == 0, (done.stdout.decode(), done.stderr.decode()[-3000:])
    summary = json.loads(done.stdout)
    assert summary["requests"] == 6 and summary["matched"] == 6 and summary["unfinished"] == 0
    assert summary["sandbox"] is True
    assert sum(row["requests"] for row in summary["rows"]) == 6
    assert {row["lane"] for row in summary["rows"]} == set(LANES)
