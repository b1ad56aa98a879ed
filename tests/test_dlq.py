"""``mixbatch dlq`` in-process through click's ``CliRunner``, against the real test Redis.

Dead letters are made the way production makes them: a real receiver on loopback answers 410,
``run_delivery`` gives up at once. After a replay the same receiver (now answering 200) gets
the result, signed, exactly once.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
from click.testing import CliRunner, Result

from config.settings import reset_settings
from routing.models import ErrorInfo, ServiceConfig
from routing.sinks import SinkContext
from routing.states import State
from routing.store.lanes import LaneStore
from tasks.cli.main import cli
from tests.test_sinks_webhook import (
    Receiver,
    deliver_once,
    finished,
    hook,
    serve_receiver,
    webhook_context,
)


@pytest.fixture
def invoke(redis_url: str, namespace: str, store: LaneStore) -> Iterator[Any]:
    runner = CliRunner()
    env: dict[str, str | None] = {
        "MIXBATCH_REDIS_URL": redis_url,
        "MIXBATCH_NAMESPACE": namespace,
        "MIXBATCH_LANES_FILE": None,
        "COLUMNS": "200",
    }

    def run(*args: str, extra: Mapping[str, str | None] | None = None) -> Result:
        reset_settings()
        try:
            return runner.invoke(cli, ["dlq", *args], env={**env, **(extra or {})})
        finally:
            reset_settings()

    yield run
    reset_settings()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with serve_receiver() as rec:
        yield rec


@pytest.fixture
def context(store: LaneStore, receiver: Receiver) -> Iterator[SinkContext]:
    """The service's sinks: the named webhook sink ``hook()`` is the receiver."""
    ctx = webhook_context(store, receiver.url)
    yield ctx
    ctx.close()


@pytest.fixture
def now() -> float:
    return time.time()


def dead(
    store: LaneStore, config: ServiceConfig, context: SinkContext, receiver: Receiver, now: float
) -> str:
    """A request whose webhook answered 410: dead-lettered on its first try."""
    receiver.answer(410)
    rid = finished(store, config, now, hook())
    assert deliver_once(store, context, rid, now + 1).status == "dead letter"
    return rid


def one_line_error(result: Result, code: int, *fragments: str) -> None:
    assert result.exit_code == code, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_list_when_empty(invoke: Any) -> None:
    result = invoke("list")
    assert result.exit_code == 0, result.output
    assert "no dead letters" in result.stdout
    assert json.loads(invoke("list", "--json").stdout) == []


def test_list_shows_id_lane_when_and_last_error(
    invoke: Any,
    store: LaneStore,
    service_config: ServiceConfig,
    context: SinkContext,
    receiver: Receiver,
    now: float,
) -> None:
    rid = dead(store, service_config, context, receiver, now)
    table = invoke("list")
    assert table.exit_code == 0, table.output
    assert rid in table.stdout and "standard" in table.stdout
    assert "receiver_rejected" in table.stdout and "410 Gone" in table.stdout
    assert time.strftime("%Y-%m-%d", time.gmtime(now)) in table.stdout
    [entry] = json.loads(invoke("list", "--json").stdout)
    assert (entry["id"], entry["lane"]) == (rid, "standard")
    assert entry["at"] == pytest.approx(now + 1)
    assert entry["error"]["code"] == "receiver_rejected"
    assert entry["error"]["status_code"] == 410


def test_replay_sends_it_again_and_it_is_applied_once(
    invoke: Any,
    store: LaneStore,
    service_config: ServiceConfig,
    context: SinkContext,
    receiver: Receiver,
    now: float,
) -> None:
    rid = dead(store, service_config, context, receiver, now)
    result = invoke("replay", rid)
    assert result.exit_code == 0, result.output
    assert "replayed 1 of 1" in result.stdout
    assert json.loads(invoke("list", "--json").stdout) == []
    assert store.lane_stats("standard").counts["dead_letters"] == 0
    assert rid in store.due_deliveries("standard", time.time() + 1), "back in the outbox"
    out = deliver_once(store, context, rid, time.time() + 1)
    assert out.status == "delivered" and out.attempt == 1
    assert [d.status for d in receiver.deliveries] == [410, 200]
    assert all(d.valid for d in receiver.deliveries)
    assert receiver.applied[rid]["id"] == rid
    assert store.status(rid).state is State.DELIVERED


def test_replay_all(
    invoke: Any,
    store: LaneStore,
    service_config: ServiceConfig,
    context: SinkContext,
    receiver: Receiver,
    now: float,
) -> None:
    ids = {dead(store, service_config, context, receiver, now) for _ in range(3)}
    result = invoke("replay", "--all")
    assert result.exit_code == 0, result.output
    assert "replayed 3 of 3" in result.stdout
    assert set(store.due_deliveries("standard", time.time() + 1)) == ids
    assert store.dlq.entries() == []


@pytest.mark.parametrize("args", [(), ("standard.01X", "--all")])
def test_replay_needs_one_id_or_all(invoke: Any, args: tuple[str, ...]) -> None:
    result = invoke("replay", *args)
    assert result.exit_code == 2
    assert "give one ID, or --all" in result.stderr


def test_replay_an_unknown_id(invoke: Any) -> None:
    one_line_error(
        invoke("replay", "standard.01NOPE"), 1, "no dead letter with id 'standard.01NOPE'"
    )


def test_replay_of_an_expired_result_says_so_and_keeps_the_entry(
    invoke: Any,
    store: LaneStore,
    service_config: ServiceConfig,
    context: SinkContext,
    receiver: Receiver,
    now: float,
) -> None:
    rid = dead(store, service_config, context, receiver, now)
    store.redis.delete(store.keys.request(rid))  # its TTL ran out
    result = invoke("replay", rid)
    assert result.exit_code == 1
    assert "its result has expired" in result.stderr and f"mixbatch dlq drop {rid}" in result.stderr
    assert "replayed 0 of 1" in result.stdout
    assert [e["id"] for e in store.dlq.entries()] == [rid]


def test_drop_forgets_the_dead_letter_but_keeps_the_result(
    invoke: Any,
    store: LaneStore,
    service_config: ServiceConfig,
    context: SinkContext,
    receiver: Receiver,
    now: float,
) -> None:
    rid = dead(store, service_config, context, receiver, now)
    result = invoke("drop", rid)
    assert result.exit_code == 0, result.output
    assert f"dropped {rid}" in result.stdout
    assert store.dlq.entries() == []
    assert store.lane_stats("standard").counts["dead_letters"] == 0
    kept = store.result(rid)
    assert kept is not None and kept.status is State.DONE
    assert store.due_deliveries("standard", time.time() + 10_000) == [], "not sent again"
    one_line_error(invoke("drop", rid), 1, "no dead letter with id")


def test_a_dead_letter_filed_by_the_store_is_listed(
    invoke: Any, store: LaneStore, service_config: ServiceConfig, now: float
) -> None:
    rid = finished(store, service_config, now, None)
    store.claim_delivery(rid, lease_s=30, now=now + 1)
    store.dlq.add(rid, ErrorInfo(code="x", message="why [not]"), now=now + 2)
    table = invoke("list")
    assert "x: why [not]" in table.stdout, "rich markup in errors is shown as text"


def test_dlq_help_lists_its_commands(invoke: Any) -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    for name in ("list", "replay", "drop"):
        assert name in result.stdout
