"""``mixbatch top``, ``health`` and ``flower``'s refusals, against a real Redis.

Fast cases run in-process through click's ``CliRunner``; the live view runs as a real process
and is stopped with Ctrl-C (SIGINT) as a person would. The healthy case of ``health`` needs a
worker and beat, so it lives in ``test_up.py`` against the whole Procfile.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from pydantic import SecretStr

from config.flower import flower_command
from config.ops import OpsSettings, is_loopback, reset_ops_settings
from config.settings import reset_settings
from routing.models import ErrorInfo, Route, ServiceConfig
from routing.states import State
from routing.store.lanes import LaneStore
from tasks.cli.main import cli
from tasks.cli.output import EXAMPLES
from tests.test_metrics import finish_one

ROOT = Path(__file__).resolve().parent.parent
MIXBATCH = str(Path(sys.executable).parent / "mixbatch")
OPS_COMMANDS = ("flower", "health", "metrics", "top")

Invoke = Callable[..., Result]


@pytest.fixture
def invoke(redis_url: str, namespace: str, store: LaneStore) -> Iterator[Invoke]:
    base = {"MIXBATCH_REDIS_URL": redis_url, "MIXBATCH_NAMESPACE": namespace, "COLUMNS": "160"}

    def run(*args: str, env: Mapping[str, str | None] | None = None) -> Result:
        reset_settings()
        reset_ops_settings()
        try:
            return CliRunner().invoke(cli, list(args), env={**base, **(env or {})})
        finally:
            reset_settings()
            reset_ops_settings()

    yield run


def one_error_line(result: Result, code: int) -> str:
    assert result.exit_code == code, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), lines
    return lines[0]


@pytest.fixture
def busy(store: LaneStore, service_config: ServiceConfig) -> LaneStore:
    now = time.time()
    finish_one(store, service_config, "urgent", Route.REALTIME, State.DONE, now)
    finish_one(store, service_config, "urgent", Route.REALTIME, State.FAILED, now, late=True)
    finish_one(store, service_config, "bulk", Route.BATCH, State.DONE, now)
    return store


# -- help ------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", OPS_COMMANDS)
def test_every_ops_command_has_help_with_an_example(command: str) -> None:
    result = CliRunner().invoke(cli, [command, "--help"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    at = next(i for i, ln in enumerate(lines) if ln.strip() == "Example:")
    assert lines[at + 1].strip() == EXAMPLES[command]
    assert lines[at + 1].strip().startswith(f"mixbatch {command}")
    prose = [ln.strip() for ln in lines[1:at] if ln.strip()]
    assert prose and not any("  " in ln for ln in prose), prose  # no indentation re-wrapped in


# -- top -------------------------------------------------------------------------------------


def test_top_once_shows_lanes_routes_batches_and_savings(invoke: Invoke, busy: LaneStore) -> None:
    result = invoke("top", "--once")
    assert result.exit_code == 0, result.output
    out = result.stdout
    for text in ("lanes", "routes", "provider batches in flight", "saved by batching", "urgent"):
        assert text in out, text
    grid = out.replace("┃", "│").splitlines()
    rows = [[cell.strip() for cell in ln.split("│")[1:-1]] for ln in grid if "│" in ln]
    header = next(r for r in rows if r and r[0] == "lane")
    urgent = dict(zip(header, next(r for r in rows if r and r[0] == "urgent"), strict=True))
    assert (urgent["done"], urgent["failed"], urgent["misses"], urgent["queued"]) == (
        "1",
        "1",
        "1",
        "0",
    )


def test_top_json_is_one_snapshot(invoke: Invoke, busy: LaneStore) -> None:
    result = invoke("top", "--json")
    assert result.exit_code == 0, result.output
    snap = json.loads(result.stdout)
    lanes = {lane["lane"]: lane for lane in snap["lanes"]}
    assert lanes["urgent"]["finished"] == {"realtime": {"done": 1, "failed": 1}}
    assert lanes["urgent"]["deadline_misses"] == 1
    assert lanes["bulk"]["finished"] == {"batch": {"done": 1}}
    assert snap["costs_by_route"]["batch"]["requests"] == 1
    assert snap["saved_usd_total"] == pytest.approx(0.5)


def test_top_live_refreshes_until_ctrl_c(redis_url: str, namespace: str, busy: LaneStore) -> None:
    env = {
        **os.environ,
        "MIXBATCH_REDIS_URL": redis_url,
        "MIXBATCH_NAMESPACE": namespace,
        "COLUMNS": "160",
    }
    proc = subprocess.Popen(
        [MIXBATCH, "top", "--interval", "0.2"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    time.sleep(3.0)
    out = b""
    for _ in range(3):  # a Ctrl-C that lands while the command still starts up is sent again
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=15)
            break
        except subprocess.TimeoutExpired:
            continue
    assert proc.returncode == 0, out.decode()
    assert b"lanes" in out and b"urgent" in out


def test_top_without_redis_exits_3(invoke: Invoke) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    line = one_error_line(
        invoke("top", "--once", env={"MIXBATCH_REDIS_URL": f"redis://:pw@127.0.0.1:{port}/0"}), 3
    )
    assert str(port) in line and "pw" not in line


# -- health ----------------------------------------------------------------------------------


def test_health_without_workers_names_what_is_missing(invoke: Invoke, store: LaneStore) -> None:
    result = invoke("health", "--json", "--timeout", "0.3")
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert report["ok"] is False and report["exit_code"] == 1
    assert checks["redis"]["ok"] is True
    assert checks["workers"]["ok"] is False and "no worker answered" in checks["workers"]["detail"]
    assert checks["beat"]["ok"] is False and "no sweep has run yet" in checks["beat"]["detail"]


def test_health_calls_an_old_sweep_stale(invoke: Invoke, store: LaneStore) -> None:
    store.beat(time.time() - 100)
    result = invoke("health", "--timeout", "0.3", env={"MIXBATCH_SWEEP_INTERVAL_S": "10"})
    assert result.exit_code == 1
    assert "beat: last sweep 100s ago, stale after 30s" in " ".join(result.stderr.split())
    assert "FAIL" in result.stdout


def test_health_without_redis_exits_3_with_the_reason(invoke: Invoke) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = invoke("health", "--json", env={"MIXBATCH_REDIS_URL": f"redis://127.0.0.1:{port}/0"})
    assert result.exit_code == 3
    report = json.loads(result.stdout)
    assert report["checks"][0]["name"] == "redis" and str(port) in report["checks"][0]["detail"]


def test_health_with_no_redis_configured_exits_3(invoke: Invoke, tmp_path: Path) -> None:
    result = invoke("health", env={"MIXBATCH_REDIS_URL": None, "MIXBATCH_DATA_DIR": str(tmp_path)})
    assert result.exit_code == 3
    assert "mixbatch up" in " ".join(result.stderr.split())


# -- flower's refusals -----------------------------------------------------------------------


@pytest.mark.parametrize("address", ["0.0.0.0", "", "::", "10.1.2.3", "example.org"])
def test_flower_refuses_a_public_address_without_auth(invoke: Invoke, address: str) -> None:
    line = one_error_line(invoke("flower", "--address", address), 2)
    assert "MIXBATCH_FLOWER_BASIC_AUTH" in line and "not a loopback address" in line


def test_flower_refuses_a_public_address_from_the_environment(invoke: Invoke) -> None:
    line = one_error_line(invoke("flower", env={"MIXBATCH_FLOWER_ADDRESS": "0.0.0.0"}), 2)
    assert "MIXBATCH_FLOWER_ADDRESS=0.0.0.0" in line


@pytest.mark.parametrize("value", ["userQ7", "userQ7:", ":pwQ7", "a:b,userQ7"])
def test_flower_bad_auth_is_named_but_never_echoed(invoke: Invoke, value: str) -> None:
    line = one_error_line(invoke("flower", env={"MIXBATCH_FLOWER_BASIC_AUTH": value}), 2)
    assert "MIXBATCH_FLOWER_BASIC_AUTH" in line
    assert "Q7" not in line


def test_flower_port_in_use_is_one_clear_line(invoke: Invoke) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        line = one_error_line(invoke("flower", "--port", str(port)), 2)
    assert "MIXBATCH_FLOWER_PORT" in line and str(port) in line and "in use" in line


def test_flower_command_puts_the_password_in_flowers_env_not_argv() -> None:
    ops = OpsSettings(
        flower_address="0.0.0.0",
        flower_port=_free_port(),
        flower_basic_auth=SecretStr("ops:s3cret"),
    )
    args, env = flower_command(ops)
    assert "s3cret" not in " ".join(args)
    assert args == ["flower", "--address=0.0.0.0", f"--port={ops.flower_port}", "--logging=none"]
    assert env["FLOWER_BASIC_AUTH"] == "ops:s3cret"
    assert env["FLOWER_UNAUTHENTICATED_API"] is None, "a stray variable must not reopen the API"
    assert "s3cret" not in repr(ops)
    loopback, env = flower_command(OpsSettings(flower_port=_free_port()))
    assert env["FLOWER_BASIC_AUTH"] is None and "--address=127.0.0.1" in loopback


@pytest.mark.parametrize(
    ("address", "loopback"),
    [("127.0.0.1", True), ("127.8.0.1", True), ("::1", True), ("[::1]", True), ("localhost", True),
     ("0.0.0.0", False), ("", False), ("::", False), ("192.168.1.4", False), ("myhost", False)],
)  # fmt: skip
def test_is_loopback(address: str, loopback: bool) -> None:
    assert is_loopback(address) is loopback


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# -- dlq --json --------------------------------------------------------------------------------


def test_dlq_replay_and_drop_print_json(
    invoke: Invoke, store: LaneStore, service_config: ServiceConfig
) -> None:
    """CLI parity: the dead-letter commands answer in JSON too."""
    now = time.time()
    ids = []
    for _ in range(2):
        rid = finish_one(store, service_config, "standard", Route.REALTIME, State.DONE, now)
        store.claim_delivery(rid, lease_s=30, now=now + 1)
        store.dlq.add(rid, ErrorInfo(code="gone", message="410 from the receiver"), now=now + 2)
        ids.append(rid)

    listed = invoke("dlq", "list", "--json")
    assert listed.exit_code == 0, listed.output
    assert sorted(e["id"] for e in json.loads(listed.stdout)) == sorted(ids)

    replayed = invoke("dlq", "replay", ids[0], "--json")
    assert replayed.exit_code == 0, replayed.output
    assert json.loads(replayed.stdout) == {"replayed": [ids[0]], "expired": []}

    dropped = invoke("dlq", "drop", ids[1], "--json")
    assert dropped.exit_code == 0, dropped.output
    assert json.loads(dropped.stdout) == {"dropped": ids[1]}
    assert store.dlq.entries() == []
