"""``mixbatch up`` runs the repository's Procfile through honcho: a request goes end to end,
``mixbatch health`` says healthy, Flower and the metrics endpoint answer, and Ctrl-C (SIGINT)
stops every process it started, the embedded Redis included.

A lanes file that does not parse, or names an invalid submit window, stops ``up`` before any
process starts, with one line naming the file and line.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from routing.client import Client
from routing.sandbox.server import SandboxServer
from routing.store.embedded import running_url
from tasks.cli.demo import answer_ok
from tasks.cli.stack import SANDBOX_KEY

ROOT = Path(__file__).resolve().parent.parent
MIXBATCH = str(Path(sys.executable).parent / "mixbatch")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def gone(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def base_env(tmp_path: Path) -> dict[str, str]:
    """The parent's environment without any MIXBATCH_ setting (conftest sets a Redis URL)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIXBATCH_")}
    env.update({"MIXBATCH_DATA_DIR": str(tmp_path / ".mixbatch"), "PYTHONUNBUFFERED": "1"})
    return env


@pytest.fixture
def sandbox() -> Iterator[SandboxServer]:
    server = SandboxServer().start()
    try:
        yield server
    finally:
        server.stop()


def wait_until(
    check: object, timeout_s: float, what: str, proc: subprocess.Popen[bytes], log: Path
) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(
                f"`mixbatch up` exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            )
        if check():  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise AssertionError(
        f"timed out after {timeout_s}s waiting for {what}:\n{log.read_text()[-3000:]}"
    )


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.TransportError:
        return False


@pytest.mark.timeout(150)
def test_up_runs_the_procfile_end_to_end_and_ctrl_c_stops_everything(
    tmp_path: Path, sandbox: SandboxServer
) -> None:
    shutil.copy(ROOT / "Procfile", tmp_path / "Procfile")
    flower_port, metrics_port = free_port(), free_port()
    env = {
        **base_env(tmp_path),
        "OPENAI_BASE_URL": sandbox.openai_base_url,
        "OPENAI_API_KEY": SANDBOX_KEY,
        "ANTHROPIC_BASE_URL": sandbox.anthropic_base_url,
        "ANTHROPIC_API_KEY": SANDBOX_KEY,
        "MIXBATCH_AGGREGATE_INTERVAL_S": "0.3",
        "MIXBATCH_SWEEP_INTERVAL_S": "1",
        "MIXBATCH_EMBEDDED_FSYNC": "everysec",
        "MIXBATCH_FLOWER_PORT": str(flower_port),
        "MIXBATCH_METRICS_PORT": str(metrics_port),
    }
    log = tmp_path / "up.log"
    with log.open("wb") as out:
        up = subprocess.Popen(
            [MIXBATCH, "up"],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    data_dir = tmp_path / ".mixbatch"
    children: list[psutil.Process] = []
    try:
        wait_until(lambda: running_url(data_dir), 30, "the embedded Redis", up, log)
        url = running_url(data_dir)
        assert url is not None

        # health is what an orchestrator polls: Redis, a worker on every queue, a recent sweep
        health = subprocess.run(
            [MIXBATCH, "health", "--json", "--wait", "60"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            timeout=90,
        )
        assert health.returncode == 0, (health.stdout.decode(), log.read_text()[-3000:])
        assert json.loads(health.stdout)["ok"] is True

        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello from up"}]}
        with Client(url) as client:
            ticket = client.submit(endpoint="/v1/chat/completions", body=body, lane="urgent")
            result = client.result(ticket.id, timeout=60)
        assert answer_ok("/v1/chat/completions", body, result), result

        wait_until(
            lambda: answers(f"http://127.0.0.1:{flower_port}/healthcheck"), 30, "Flower", up, log
        )
        wait_until(
            lambda: answers(f"http://127.0.0.1:{metrics_port}/metrics"), 30, "metrics", up, log
        )
        scraped = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
        done = {
            s.labels.get("route"): s.value
            for f in text_string_to_metric_families(scraped)
            for s in f.samples
            if s.name == "mixbatch_requests_total" and s.labels.get("lane") == "urgent"
        }
        assert done.get("realtime", 0) >= 1, scraped

        children = psutil.Process(up.pid).children(recursive=True)
        names = " ".join(" ".join(c.cmdline()) for c in children)
        for expected in ("redis-server", "worker", "beat", "flower", "metrics"):
            assert expected in names, (expected, names)

        up.send_signal(signal.SIGINT)
        up.wait(timeout=45)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not all(gone(c) for c in children):
            time.sleep(0.2)
        left = [(c.pid, " ".join(c.cmdline())) for c in children if not gone(c)]
        assert not left, f"still running after Ctrl-C: {left}"
        assert running_url(data_dir) is None, "the embedded Redis should stop with `up`"
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()
        for child in children:
            if not gone(child):
                child.kill()


@pytest.mark.parametrize(
    ("lanes", "fragments"),
    [
        ('[lanes.bulk]\ndeadline = "24h"\npriority = = 1\n', ("not valid TOML", "line 3")),
        (
            '[lanes.urgent]\ndeadline = "1m"\n\n[lanes.bulk]\ndeadline = "24h"\n'
            'submit_windows = ["0 25 * * *"]\n',
            ("line 4", "[lanes.bulk]", "submit_windows", "0 25 * * *"),
        ),
    ],
    ids=["toml", "crontab"],
)
def test_up_with_a_bad_lanes_file_is_one_line_naming_it(
    tmp_path: Path, lanes: str, fragments: tuple[str, ...]
) -> None:
    shutil.copy(ROOT / "Procfile", tmp_path / "Procfile")
    (tmp_path / "lanes.toml").write_text(lanes)
    env = {**base_env(tmp_path), "MIXBATCH_LANES_FILE": str(tmp_path / "lanes.toml")}
    done = subprocess.run([MIXBATCH, "up"], cwd=tmp_path, env=env, capture_output=True, timeout=60)
    assert done.returncode == 2, done
    err = " ".join(done.stderr.decode().split())
    assert err.startswith("error:") and "Traceback" not in err, err
    for fragment in ("lanes.toml", *fragments):
        assert fragment in err, (fragment, err)
    assert running_url(tmp_path / ".mixbatch") is None
