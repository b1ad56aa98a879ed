"""The Prometheus endpoint against a real Redis: what each family counts, that counters live in
Redis (a fresh process, or a worker started later, reads the same totals), a Redis outage as
``mixbatch_redis_up 0``, ``mixbatch metrics`` served over HTTP, and a taken port refused with
one sentence by both the command and the worker option.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from config.ops import reset_ops_settings
from config.settings import reset_settings
from routing.models import Request, Route, ServiceConfig, StoredResult, prepare
from routing.states import State
from routing.store.batches import BatchRecord, BatchRegistry, Member
from routing.store.lanes import LaneStore
from routing.store.ledger import Cost
from routing.store.ledger import record as record_cost
from tasks.cli.main import cli
from tasks.cli.metrics import build_registry, families, render_text
from tasks.cli.observability import Observer, lane_view, parse_counts
from tasks.cli.stack import LocalStack

ROOT = Path(__file__).resolve().parent.parent
BODY: dict[str, Any] = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Samples:
    """Every sample of an exposition text, keyed by (name, sorted labels)."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(found: Samples, name: str, **labels: str) -> float:
    return found[(name, tuple(sorted(labels.items())))]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def finish_one(
    store: LaneStore,
    config: ServiceConfig,
    lane: str,
    route: Route,
    outcome: State,
    now: float,
    *,
    late: bool = False,
) -> str:
    """Submit, claim, start on ``route`` and finish one request; ``late`` finishes past its deadline."""
    prepared = prepare(Request(lane=lane, body=dict(BODY)), config, now)
    [ticket] = store.submit_many([prepared], config, now=now)
    [claimed] = store.claim(lane, 1, lease_s=60, now=now)
    assert store.start(claimed, state=State.RUNNING, route=route, lease_s=60, now=now)
    at = prepared.deadline + 5 if late else now + 1
    assert store.finish(
        ticket.id, claimed.token, outcome, StoredResult.model_validate({"body": {}}), now=at
    )
    if outcome is State.DONE:
        record_cost(
            store,
            prepared,
            route,
            Cost(cost_usd=0.5, saved_usd=0.25, estimated_usd=0.5, priced=True),
        )
    return ticket.id


@pytest.fixture
def populated(store: LaneStore, service_config: ServiceConfig) -> LaneStore:
    """Two done and one failed realtime requests in urgent (one late), a done batch request in
    bulk, a queued request cancelled before it had a route, one waiting, one batch in flight."""
    now = time.time()
    finish_one(store, service_config, "urgent", Route.REALTIME, State.DONE, now)
    finish_one(store, service_config, "urgent", Route.REALTIME, State.DONE, now, late=True)
    finish_one(store, service_config, "urgent", Route.REALTIME, State.FAILED, now)
    finish_one(store, service_config, "bulk", Route.BATCH, State.DONE, now)
    cancelled = prepare(Request(lane="standard", body=dict(BODY)), service_config, now)
    [ticket] = store.submit_many([cancelled], service_config, now=now)
    assert store.cancel(ticket.id) is State.CANCELLED
    waiting = prepare(
        Request(lane="standard", body=dict(BODY), deadline=now + 600), service_config, now - 30
    )
    store.submit_many([waiting], service_config, now=now - 30)
    reg = BatchRegistry(store.redis, namespace=store.keys.ns, url=store.url)
    record = BatchRecord(
        key="k1",
        provider="openai",
        protocol="openai",
        endpoint="/v1/chat/completions",
        model="gpt-4o-mini",
        created_at=now,
        lines=1,
        lanes=["bulk"],
        members={"c1": [Member(id="bulk.X", token="t", deadline=now + 3600)]},
        order=["c1"],
    )
    reg.record_intent(record)
    reg.record_submitted(record, "batch_abc", now, now + 60)
    return store


def scrape(store: LaneStore, providers: tuple[str, ...] = ("openai", "anthropic")) -> Samples:
    registry = build_registry(lambda: Observer(store), lambda: providers)
    return samples(render_text(registry))


# -- what is counted -------------------------------------------------------------------------


def test_every_family_counts_what_happened(populated: LaneStore) -> None:
    found = scrape(populated)
    assert value(found, "mixbatch_redis_up") == 1
    assert (
        value(found, "mixbatch_requests_total", lane="urgent", route="realtime", status="done") == 2
    )
    assert (
        value(found, "mixbatch_requests_total", lane="urgent", route="realtime", status="failed")
        == 1
    )
    assert value(found, "mixbatch_requests_total", lane="bulk", route="batch", status="done") == 1
    assert (
        value(found, "mixbatch_requests_total", lane="standard", route="none", status="cancelled")
        == 1
    )
    assert value(found, "mixbatch_deadline_misses_total", lane="urgent") == 1
    assert value(found, "mixbatch_deadline_misses_total", lane="bulk") == 0
    assert value(found, "mixbatch_requests_submitted_total", lane="urgent") == 3
    assert value(found, "mixbatch_lane_depth", lane="standard") == 1
    assert value(found, "mixbatch_lane_depth", lane="urgent") == 0
    assert 29 <= value(found, "mixbatch_lane_oldest_age_seconds", lane="standard") < 60
    assert 500 < value(found, "mixbatch_lane_min_slack_seconds", lane="standard") <= 600
    assert ("mixbatch_lane_min_slack_seconds", (("lane", "urgent"),)) not in found, "empty: absent"
    assert value(found, "mixbatch_lane_oldest_age_seconds", lane="urgent") == 0
    assert value(found, "mixbatch_lane_requests", lane="standard", state="queued") == 1
    assert value(found, "mixbatch_provider_batches_in_flight", provider="openai") == 1
    assert value(found, "mixbatch_provider_batches_in_flight", provider="anthropic") == 0
    assert value(found, "mixbatch_cost_usd_total", route="realtime") == pytest.approx(1.0)
    assert value(found, "mixbatch_cost_usd_total", route="batch") == pytest.approx(0.5)
    assert value(found, "mixbatch_saved_usd_total") == pytest.approx(0.75)
    assert value(found, "mixbatch_dead_letters") == 0


def test_counters_live_in_redis_not_in_the_process(populated: LaneStore) -> None:
    first = scrape(populated)
    # A new registry and observer: what a restarted worker or a second exporter would build.
    again = scrape(LaneStore.from_url(populated.url, namespace=populated.keys.ns))
    counters = {k: v for k, v in first.items() if k[0].endswith("_total")}
    assert counters and all(again[k] == v for k, v in counters.items())


def test_redis_down_is_redis_up_zero_not_an_error(populated: LaneStore) -> None:
    dead = LaneStore.from_url(f"redis://127.0.0.1:{free_port()}/0", namespace="x")
    found = scrape(dead)
    assert found == {("mixbatch_redis_up", ()): 0.0}


def test_parse_counts_splits_states_routes_and_totals() -> None:
    states, finished, totals = parse_counts(
        {
            "queued": 2,
            "done": 5,
            "route:batch:done": 4,
            "route:realtime:done": 1,
            "route:none:expired": 3,
            "deadline_misses": 1,
            "submitted_total": 9,
        }
    )
    assert states["queued"] == 2 and states["done"] == 5 and states["running"] == 0
    assert finished == {"batch": {"done": 4}, "realtime": {"done": 1}, "none": {"expired": 3}}
    assert totals == {"deadline_misses": 1, "submitted_total": 9}


def test_families_of_a_snapshot_with_no_lanes_still_name_the_providers(
    populated: LaneStore,
) -> None:
    snap = Observer(populated).snapshot()
    spec = populated.load_config()
    assert spec is not None
    assert [v.lane for v in snap.lanes] == [s.name for s in spec.by_priority()]
    assert (
        lane_view(spec.lanes[0], populated.lane_stats(spec.lanes[0].name)).lane
        == spec.lanes[0].name
    )
    empty = snap.model_copy(update={"lanes": [], "batches": []})
    names = {f.name for f in families(empty, ["groq"])}
    assert "mixbatch_provider_batches_in_flight" in names
    inflight = next(
        f for f in families(empty, ["groq"]) if f.name == "mixbatch_provider_batches_in_flight"
    )
    assert [(s.labels, s.value) for s in inflight.samples] == [({"provider": "groq"}, 0)]


# -- the command -----------------------------------------------------------------------------


@pytest.fixture
def env(redis_url: str, namespace: str) -> Iterator[dict[str, str]]:
    reset_settings()
    reset_ops_settings()
    yield {"MIXBATCH_REDIS_URL": redis_url, "MIXBATCH_NAMESPACE": namespace}
    reset_settings()
    reset_ops_settings()


def test_metrics_once_prints_the_exposition(populated: LaneStore, env: dict[str, str]) -> None:
    result = CliRunner().invoke(cli, ["metrics", "--once"], env=env)
    assert result.exit_code == 0, result.output
    found = samples(result.stdout)
    assert (
        value(found, "mixbatch_requests_total", lane="urgent", route="realtime", status="done") == 2
    )


def test_metrics_port_in_use_is_one_clear_line(populated: LaneStore, env: dict[str, str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = CliRunner().invoke(cli, ["metrics", "--port", str(port)], env=env)
        by_env = CliRunner().invoke(
            cli, ["metrics"], env={**env, "MIXBATCH_METRICS_PORT": str(port)}
        )
    for res, name in ((result, "--port"), (by_env, "MIXBATCH_METRICS_PORT")):
        assert res.exit_code == 2, res.output
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), lines
        assert name in lines[0] and str(port) in lines[0] and "in use" in lines[0]


def test_metrics_serves_http_and_stops_on_sigterm(
    populated: LaneStore, env: dict[str, str], tmp_path: Path
) -> None:
    port = free_port()
    child_env = {**_base_env(), **env, "MIXBATCH_METRICS_PORT": str(port)}
    log = (tmp_path / "metrics.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tasks.cli.main", "metrics"],
        env=child_env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    try:
        body = _get_until_up(f"http://127.0.0.1:{port}/metrics", proc)
        found = samples(body)
        assert (
            value(found, "mixbatch_requests_total", lane="bulk", route="batch", status="done") == 1
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def _base_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("MIXBATCH_")}


def _get_until_up(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 20) -> str:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        assert proc.poll() is None, f"exited with {proc.returncode}"
        try:
            response = httpx.get(url, timeout=2)
            if response.status_code == 200:
                return response.text
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} did not answer within {timeout_s}s")


# -- the worker option -----------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_worker_serves_counters_written_before_it_started_and_refuses_a_taken_port(
    tmp_path: Path, service_config: ServiceConfig
) -> None:
    port = free_port()
    stack = LocalStack(
        tmp_path / "stack",
        namespace="wm",
        sandbox=False,
        env={
            "MIXBATCH_WORKER_METRICS_PORT": str(port),
            "OPENAI_API_KEY": "sk-test",
            "ANTHROPIC_API_KEY": "sk-test",
        },
    ).start()
    try:
        store = stack.store()
        store.publish_config(service_config)
        finish_one(
            store, service_config, "urgent", Route.REALTIME, State.DONE, time.time(), late=True
        )
        # `-A tasks.cli.metrics` finds the same app and imports the module that adds the option.
        stack.start_worker("w1", app="tasks.cli.metrics", concurrency=1)
        stack.wait_workers(["w1"])
        found = samples(_get_until_up(f"http://127.0.0.1:{port}/metrics", stack.procs["w1"]))
        assert (
            value(found, "mixbatch_requests_total", lane="urgent", route="realtime", status="done")
            == 1
        )
        assert value(found, "mixbatch_deadline_misses_total", lane="urgent") == 1
        second = stack.start_worker("w2", app="tasks.cli.metrics", concurrency=1)
        assert second.wait(timeout=60) == 2
        log = (stack.log_dir / "w2.log").read_text()
        assert (
            f"MIXBATCH_WORKER_METRICS_PORT: cannot listen on 127.0.0.1:{port} (already in use)"
            in log
        )
        assert "Traceback" not in log
        stack.procs.pop("w2")
        store.close()
    finally:
        stack.stop()
