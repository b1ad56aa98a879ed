"""The collector's hot path: a finish with no sink to call is delivered in its own script, a
failed line is billed only where the account bills failed lines, result lines parse the same
with or without orjson. A real Redis and the real batch route's handles (``test_batch_engine``).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from routing.decide.cost import failed_cost, parse_prices
from routing.engine.batch_collect import _Finishes
from routing.jsonl import loads
from routing.models import ErrorInfo, Request, Route, StoredResult, prepare
from routing.providers.batch_jobs import LineResult
from routing.states import State
from routing.store.batches import BatchRecord, Member
from routing.store.ledger import totals
from tests.test_batch_engine import PRICES, BatchRoute, route, sandbox

__all__ = ["route", "sandbox"]

USAGE = {"prompt_tokens": 1_000_000, "completion_tokens": 0, "total_tokens": 1_000_000}
BILLING = parse_prices(
    '[providers.openai]\nbills_failed_lines = true\n[providers.openai.models."gpt-4o-mini"]\n'
    "input_usd_per_mtok = 2.0\noutput_usd_per_mtok = 8.0\n"
)


def _record(route: BatchRoute, members: list[Member]) -> BatchRecord:
    return BatchRecord(
        key="k1",
        provider="openai",
        protocol="openai",
        endpoint="/v1/chat/completions",
        model="gpt-4o-mini",
        created_at=route.clock(),
        lines=len(members),
        batch_id="batch_1",
        members={f"c{n}": [m] for n, m in enumerate(members)},
        order=[f"c{n}" for n in range(len(members))],
    )


def _staged(route: BatchRoute, n: int, **fields: Any) -> list[Member]:
    ids = route.submit(n, "openai", lane="bulk", **fields)
    route.staged(ids)
    holders = route.store.holders(ids)
    return [Member(id=i, token=holders[i][2], deadline=holders[i][0].deadline) for i in ids]


def _apply(route: BatchRoute, members: list[Member], line: LineResult) -> dict[str, int]:
    counts = {"done": 0, "failed": 0, "requeued": 0}
    holders = route.store.holders([m.id for m in members])
    pending = _Finishes(route.h, _record(route, members))
    for m in members:
        pending.apply(m, line, holders[m.id][0], counts)
    pending.flush(counts)
    return counts


def _ok(custom_id: str = "c0") -> LineResult:
    body = {"choices": [{"message": {"content": "ok"}}], "usage": USAGE}
    return LineResult(custom_id=custom_id, status_code=200, body=body)


def test_a_finish_with_no_sink_is_delivered_in_the_same_script(route: BatchRoute) -> None:
    members = _staged(route, 3)
    assert _apply(route, members, _ok())["done"] == 3
    for m in members:
        status = route.store.status(m.id)
        assert status.state is State.DELIVERED
        result = route.store.result(m.id)
        assert result is not None and result.status_code == 200 and result.cost_usd
    counts = route.store.lane_stats("bulk").counts
    assert counts.get("delivered") == 3 and not counts.get("done") and not counts.get("submitted")
    k = route.store.request_keys(members[0].id)
    assert route.store.redis.zcard(k["outbox"]) == 0, "nothing left for a deliver message"
    assert route.dispatched == []


def test_a_finish_with_a_callback_still_goes_through_the_outbox(route: BatchRoute) -> None:
    callback = {"kind": "celery", "task": "app.save", "queue": "app.answers"}
    members = _staged(route, 2, callback=callback)
    _apply(route, members, _ok())
    assert route.states([m.id for m in members]) == {State.DONE}
    assert sorted(route.dispatched) == sorted(m.id for m in members)
    k = route.store.request_keys(members[0].id)
    assert route.store.redis.zcard(k["outbox"]) == 2


def test_store_finish_many_delivers_only_where_asked(route: BatchRoute) -> None:
    members = _staged(route, 2)
    items = [(m.id, m.token, State.DONE, StoredResult(status_code=200)) for m in members]
    won = route.store.finish_many(items, now=route.clock(), delivered=[True, False])
    assert won == [True, True]
    assert [route.store.status(m.id).state for m in members] == [State.DELIVERED, State.DONE]
    counts = route.store.lane_stats("bulk").counts
    assert counts.get("delivered") == 1 and counts.get("done") == 1


def _failed_line() -> LineResult:
    error = ErrorInfo(code="invalid_request_error", message="bad", status_code=400)
    body = {"error": {"code": "invalid_request_error", "message": "bad"}, "usage": USAGE}
    return LineResult(custom_id="c0", status_code=400, body=body, error=error)


@pytest.mark.parametrize(
    ("table", "billed"),
    [(None, 0.0), (PRICES, 0.0), (BILLING, 2.0)],
    ids=["no-pricer", "openai-does-not-bill", "account-bills-failed-lines"],
)
def test_a_failed_line_is_billed_only_where_the_account_bills_it(
    route: BatchRoute, table: Any, billed: float
) -> None:
    if table is not None:
        route.h = dataclasses.replace(
            route.h,
            failed_price=lambda p, m, u: failed_cost(table, p, m, u, Route.BATCH),
        )
    (member,) = _staged(route, 1)
    assert _apply(route, [member], _failed_line())["failed"] == 1
    result = route.store.result(member.id)
    assert result is not None and result.error is not None
    assert (result.cost_usd or 0.0) == pytest.approx(billed)
    spent = totals(route.store).get("route", {}).get("batch", {}).get("cost", 0.0)
    assert spent == pytest.approx(billed)


@pytest.mark.parametrize(
    "text",
    ['{"a": 1, "b": [1.5, "x", null, true]}', '{"u": "\\u00e9\\ud83d\\ude00"}', '{"n": NaN}'],
)
def test_result_lines_parse_as_json_does(text: str) -> None:
    got, want = loads(text), json.loads(text)
    assert json.dumps(got) == json.dumps(want)


def test_a_line_that_is_no_json_is_refused() -> None:
    with pytest.raises(ValueError):
        loads("{not json")


def test_submit_rows_keep_every_character(route: BatchRoute) -> None:
    """The chunk's rows go to submit_many.lua as orjson's UTF-8 (json's ``\\u`` escapes where
    orjson is missing or refuses): the stored body reads back exactly as it was submitted."""
    content = 'café 😀 \u2028 "quoted" \\ back\nslash \x00 nul'
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}]}
    item = prepare(Request(endpoint="/v1/chat/completions", body=body), route.config, route.clock())
    (ticket,) = route.store.submit_many([item], route.config, now=route.clock())
    assert route.store.prepared(ticket.id).body == body
