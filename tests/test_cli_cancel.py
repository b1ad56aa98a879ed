"""``mixbatch cancel`` by id, by a file's custom_ids, and by lane, through the real command and a
real Redis: what ends CANCELLED, what keeps its outcome, the confirmation, and the refusals
(unknown ids or custom_ids are listed and nothing at all is cancelled)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from config.settings import reset_settings
from routing.models import StoredResult
from routing.states import State
from routing.store.lanes import LaneStore
from tasks.cli.main import cli

Invoke = Callable[..., Result]


def batch_line(custom_id: str, text: str = "hello") -> str:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]}
    return json.dumps(
        {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}
    )


def write(path: Path, custom_ids: Sequence[str]) -> Path:
    path.write_text("".join(batch_line(c) + "\n" for c in custom_ids))
    return path


@pytest.fixture
def invoke(redis_url: str, namespace: str, store: LaneStore) -> Iterator[Invoke]:
    base = {"MIXBATCH_REDIS_URL": redis_url, "MIXBATCH_NAMESPACE": namespace, "COLUMNS": "200"}

    def run(*args: str, input: str | None = None, env: Mapping[str, str] | None = None) -> Result:
        reset_settings()
        try:
            return CliRunner().invoke(cli, list(args), input=input, env={**base, **(env or {})})
        finally:
            reset_settings()

    yield run


def submitted(invoke: Invoke, path: Path, *args: str) -> dict[str, str]:
    """custom_id -> request id of a file submitted through the CLI."""
    result = invoke("submit", str(path), "--json", *args)
    assert result.exit_code == 0, result.output
    return {t["custom_id"]: t["id"] for t in json.loads(result.stdout)}


def states(store: LaneStore, ids: Sequence[str]) -> list[State]:
    return [store.status(rid).state for rid in ids]


def one_error(result: Result, code: int, *fragments: str) -> str:
    assert result.exit_code == code, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(("error:", "Error:")), lines
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def finish_one(store: LaneStore, lane: str) -> str:
    [claimed] = store.claim(lane, 1, lease_s=60)
    answer = StoredResult.model_validate({"status_code": 200, "body": {"ok": True}})
    assert store.finish(claimed.id, claimed.token, State.DONE, answer)
    return claimed.id


# -- by id -----------------------------------------------------------------------------------


def test_cancel_ids_cancels_what_waits_and_keeps_what_finished(
    invoke: Invoke, store: LaneStore, tmp_path: Path
) -> None:
    ids = submitted(invoke, write(tmp_path / "in.jsonl", ["a", "b", "c"]), "--lane", "bulk")
    done = finish_one(store, "bulk")  # the earliest deadline first: one of the three
    claimed = store.claim("bulk", 1, lease_s=60)[0].id
    queued = next(rid for rid in ids.values() if rid not in (done, claimed))

    result = invoke("cancel", queued, claimed, done, "--yes", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["requested"] == 3 and report["cancelled"] == 2
    by_id = {r["id"]: r for r in report["requests"]}
    assert by_id[queued]["state"] == "cancelled"
    assert by_id[claimed]["state"] == "cancelled"
    assert by_id[done]["state"] == "done"
    assert store.status(queued).state is State.CANCELLED
    assert store.status(claimed).state is State.CANCELLED
    assert store.status(done).state is State.DONE, "a finished request keeps its outcome"
    assert store.result(queued) is not None, "the cancel is an outcome, delivered like any other"

    again = invoke("cancel", queued, "--yes")
    assert again.exit_code == 0, again.output
    assert "cancelled 0 of 1 requests given, 1 already cancelled" in " ".join(again.stdout.split())


def test_cancel_unknown_ids_lists_them_and_cancels_nothing(
    invoke: Invoke, store: LaneStore, tmp_path: Path
) -> None:
    ids = list(submitted(invoke, write(tmp_path / "in.jsonl", ["a", "b"])).values())
    ghost = "standard.01JD3ABCDEFGHJKMNPQRSTVWXY"
    one_error(invoke("cancel", *ids, ghost, "--yes"), 1, "1 ids given", repr(ghost), "nothing")
    assert states(store, ids) == [State.QUEUED, State.QUEUED]
    one_error(invoke("cancel", "not-an-id", "--yes"), 2, "'not-an-id'")


# -- by file ---------------------------------------------------------------------------------


def test_cancel_file_by_custom_id_for_its_tenant(
    invoke: Invoke, store: LaneStore, tmp_path: Path
) -> None:
    path = write(tmp_path / "in.jsonl", ["doc-1", "doc-2", "doc-3"])
    mine = submitted(invoke, path, "--tenant", "t1")
    theirs = submitted(invoke, path, "--tenant", "t2")  # the same custom_ids, another tenant
    result = invoke("cancel", "--file", str(path), "--tenant", "t1", "--yes", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["cancelled"] == 3
    assert {r["custom_id"]: r["id"] for r in report["requests"]} == mine
    assert states(store, list(mine.values())) == [State.CANCELLED] * 3
    assert states(store, list(theirs.values())) == [State.QUEUED] * 3


def test_cancel_file_with_unknown_custom_ids_lists_them_and_touches_nothing(
    invoke: Invoke, store: LaneStore, tmp_path: Path
) -> None:
    ids = submitted(invoke, write(tmp_path / "sent.jsonl", ["doc-1", "doc-2"]))
    wider = write(tmp_path / "wider.jsonl", ["doc-1", "doc-9", "doc-2", "doc-8"])
    message = one_error(
        invoke("cancel", "--file", str(wider), "--yes"),
        1,
        "2 custom_ids",
        "wider.jsonl",
        "'doc-9', 'doc-8'",
        "nothing was cancelled",
    )
    assert "doc-1" not in message
    assert states(store, list(ids.values())) == [State.QUEUED, State.QUEUED]

    other_tenant = invoke("cancel", "--file", str(tmp_path / "sent.jsonl"), "--tenant", "x")
    one_error(other_tenant, 1, "2 custom_ids", "tenant 'x'", "'doc-1', 'doc-2'")
    assert states(store, list(ids.values())) == [State.QUEUED, State.QUEUED]


def test_cancel_file_with_a_malformed_line_names_it(invoke: Invoke, tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(batch_line("a") + "\n{oops\n")
    one_error(invoke("cancel", "--file", str(path), "--yes"), 2, "bad.jsonl", "line 2")


# -- by lane ---------------------------------------------------------------------------------


def test_cancel_lane_takes_everything_queued_there_only(
    invoke: Invoke, store: LaneStore, tmp_path: Path
) -> None:
    bulk = submitted(
        invoke, write(tmp_path / "b.jsonl", ["b1", "b2", "b3", "b4"]), "--lane", "bulk"
    )
    urgent = submitted(invoke, write(tmp_path / "u.jsonl", ["u1"]), "--lane", "urgent")
    running = store.claim("bulk", 1, lease_s=60)[0].id  # in flight: not "queued"
    queued = [rid for rid in bulk.values() if rid != running]

    result = invoke("cancel", "--lane", "bulk", "--yes", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert sorted(r["id"] for r in report["requests"]) == sorted(queued)
    assert states(store, queued) == [State.CANCELLED] * 3
    assert store.status(running).state is State.CLAIMED
    assert states(store, list(urgent.values())) == [State.QUEUED]
    assert store.lane_stats("bulk").depth == 0

    empty = invoke("cancel", "--lane", "bulk", "--yes")
    assert empty.exit_code == 0, empty.output
    assert "cancelled 0 of 0 requests queued in lane bulk" in empty.stdout


def test_cancel_lane_unknown_is_bad_input(invoke: Invoke) -> None:
    one_error(invoke("cancel", "--lane", "nope", "--yes"), 2, "'nope'")


# -- confirmation and usage ------------------------------------------------------------------


def test_cancel_asks_first_and_no_means_nothing(
    invoke: Invoke, store: LaneStore, tmp_path: Path
) -> None:
    ids = list(submitted(invoke, write(tmp_path / "in.jsonl", ["a", "b"])).values())
    refused = invoke("cancel", *ids, input="n\n")
    assert refused.exit_code == 1
    assert "cancel 2 requests given?" in refused.stderr
    assert refused.stdout == ""
    assert states(store, ids) == [State.QUEUED, State.QUEUED]

    no_answer = invoke("cancel", *ids)  # no terminal to ask: aborted, not assumed
    assert no_answer.exit_code == 1
    assert states(store, ids) == [State.QUEUED, State.QUEUED]

    agreed = invoke("cancel", *ids, "--json", input="y\n")
    assert agreed.exit_code == 0, agreed.output
    assert json.loads(agreed.stdout)["cancelled"] == 2, "the prompt stays off stdout"
    assert states(store, ids) == [State.CANCELLED, State.CANCELLED]


@pytest.mark.parametrize(
    "args",
    [(), ("some.id", "--lane", "bulk"), ("--lane", "bulk", "--file", "{file}")],
    ids=["nothing", "ids-and-lane", "lane-and-file"],
)
def test_cancel_needs_exactly_one_way_to_name_requests(
    invoke: Invoke, tmp_path: Path, args: tuple[str, ...]
) -> None:
    path = write(tmp_path / "in.jsonl", ["a"])
    result = invoke("cancel", *[a.replace("{file}", str(path)) for a in args], "--yes")
    assert result.exit_code == 2, result.output
    assert "one of them" in result.stderr


def test_cancel_against_an_unreachable_redis_exits_3(invoke: Invoke) -> None:
    result = invoke(
        "cancel", "--lane", "bulk", "--yes", env={"MIXBATCH_REDIS_URL": "redis://:pw@127.0.0.1:1/0"}
    )
    message = one_error(result, 3, "127.0.0.1:1")
    assert ":pw@" not in message
