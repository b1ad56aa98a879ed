"""``mixbatch up`` runs the repository's Procfile through honcho: a request goes end to end,
``mixbatch health`` says healthy, Flower and the metrics endpoint answer, and Ctrl-C (SIGINT)
stops every process it started, the embedded Redis included.

From an empty directory (a pip-installed user has no Procfile) it runs the default process set
shipped in the package, against the embedded Redis and against an external one (where beat used
to die: the data directory was made for the embedded Redis only); with ``MIXBATCH_PROVIDERS=[]``
it needs no provider key, and the local model answers.

A lanes file that does not parse, or names an invalid submit window, stops ``up`` before any
process starts, with one line naming the file and line; so does a Procfile that names a process
whose program is not installed, a line that is not ``name: command``, or a process name on the
command line that the Procfile does not have.
"""

from __future__ import annotations

import contextlib
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
import redis
from prometheus_client.parser import text_string_to_metric_families

from routing.client import Client
from routing.models import Route
from routing.sandbox.server import SandboxServer
from routing.store.embedded import EmbeddedRedis, running_url
from tasks.cli.demo import LOCAL_MODEL, answer_ok
from tasks.cli.procfile import DEFAULT_PROCESSES, parse
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


def sandbox_env(sandbox: SandboxServer) -> dict[str, str]:
    return {
        "OPENAI_BASE_URL": sandbox.openai_base_url,
        "OPENAI_API_KEY": SANDBOX_KEY,
        "ANTHROPIC_BASE_URL": sandbox.anthropic_base_url,
        "ANTHROPIC_API_KEY": SANDBOX_KEY,
    }


def fast_env(tmp_path: Path) -> dict[str, str]:
    """Quick beat steps, and Flower and metrics on free ports (other runs may hold the defaults)."""
    return {
        **base_env(tmp_path),
        "MIXBATCH_AGGREGATE_INTERVAL_S": "0.3",
        "MIXBATCH_SWEEP_INTERVAL_S": "1",
        "MIXBATCH_EMBEDDED_FSYNC": "everysec",
        "MIXBATCH_FLOWER_PORT": str(free_port()),
        "MIXBATCH_METRICS_PORT": str(free_port()),
    }


@contextlib.contextmanager
def running_up(
    cwd: Path, env: dict[str, str], *args: str
) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """``mixbatch up ARGS`` in ``cwd``; whatever the test does, nothing it started outlives it."""
    log = cwd.parent / f"{cwd.name}-up.log"
    with log.open("wb") as out:
        up = subprocess.Popen(
            [MIXBATCH, "up", *args],
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    started: list[psutil.Process] = []
    try:
        yield up, log
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            started = psutil.Process(up.pid).children(recursive=True)
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()
        for child in started:
            if not gone(child):
                child.kill()


def wait_healthy(cwd: Path, env: dict[str, str], up: subprocess.Popen[bytes], log: Path) -> None:
    """``mixbatch health`` is what an orchestrator polls: Redis, a worker on every queue, a
    recent sweep (so beat is alive)."""
    health = subprocess.run(
        [MIXBATCH, "health", "--json", "--wait", "90"],
        cwd=cwd,
        env=env,
        capture_output=True,
        timeout=120,
    )
    assert up.poll() is None, (
        f"`mixbatch up` exited with {up.returncode}:\n{log.read_text()[-3000:]}"
    )
    assert health.returncode == 0, (health.stdout.decode(), log.read_text()[-3000:])
    assert json.loads(health.stdout)["ok"] is True


def embedded_and_healthy(
    cwd: Path, env: dict[str, str], up: subprocess.Popen[bytes], log: Path
) -> str:
    """The URL of the embedded Redis `up` started in ``cwd``, once the service is healthy."""
    data_dir = Path(env["MIXBATCH_DATA_DIR"])
    wait_until(lambda: running_url(data_dir), 30, "the embedded Redis", up, log)
    url = running_url(data_dir)
    assert url is not None
    wait_healthy(cwd, env, up, log)
    return url


def stop_up(up: subprocess.Popen[bytes], sig: signal.Signals, log: Path) -> list[str]:
    """Stop ``up`` as a person (Ctrl-C) or an orchestrator (SIGTERM) would; every process it
    started is gone afterwards. Returns the command lines it had started."""
    children = psutil.Process(up.pid).children(recursive=True)
    names = [" ".join(c.cmdline()) for c in children]
    up.send_signal(sig)
    up.wait(timeout=45)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not all(gone(c) for c in children):
        time.sleep(0.2)
    left = [(c.pid, " ".join(c.cmdline())) for c in children if not gone(c)]
    assert not left, f"still running after {sig.name}: {left}\n{log.read_text()[-3000:]}"
    assert f"{sig.name} received" in log.read_text(), log.read_text()[-3000:]
    return names


@pytest.mark.timeout(150)
def test_up_runs_the_procfile_end_to_end_and_ctrl_c_stops_everything(
    tmp_path: Path, sandbox: SandboxServer
) -> None:
    shutil.copy(ROOT / "Procfile", tmp_path / "Procfile")
    env = {**fast_env(tmp_path), **sandbox_env(sandbox)}
    flower_port, metrics_port = env["MIXBATCH_FLOWER_PORT"], env["MIXBATCH_METRICS_PORT"]
    data_dir = tmp_path / ".mixbatch"
    with running_up(tmp_path, env) as (up, log):
        url = embedded_and_healthy(tmp_path, env, up, log)

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

        names = " ".join(stop_up(up, signal.SIGINT, log))
        for expected in ("redis-server", "worker", "beat", "flower", "metrics"):
            assert expected in names, (expected, names)
        assert running_url(data_dir) is None, "the embedded Redis should stop with `up`"


@pytest.mark.timeout(240)
def test_up_from_an_empty_directory_with_local_models_only_needs_no_key(tmp_path: Path) -> None:
    """No Procfile, no provider key, the embedded Redis: the default set runs, and the local
    model (the gpu process) answers an embedding request."""
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    env = {k: v for k, v in fast_env(empty).items() if not k.endswith(("_API_KEY", "_BASE_URL"))}
    env["MIXBATCH_PROVIDERS"] = "[]"
    data_dir = empty / ".mixbatch"
    with running_up(empty, env) as (up, log):
        url = embedded_and_healthy(empty, env, up, log)
        body = {"model": LOCAL_MODEL, "input": "mixbatch up from anywhere"}
        with Client(url) as client:
            ticket = client.submit(endpoint="/v1/embeddings", body=body, lane="urgent")
            result = client.result(ticket.id, timeout=150)
        assert result.route is Route.GPU, result
        assert answer_ok("/v1/embeddings", body, result), result

        names = " ".join(stop_up(up, signal.SIGTERM, log))
        for expected in ("redis-server", "worker", "beat", "flower", "metrics", "-Q gpu"):
            assert expected in names, (expected, names)
        assert running_url(data_dir) is None, "the embedded Redis should stop with `up`"
    assert sorted(p.name for p in empty.iterdir()) == [".mixbatch"], "up wrote outside its data dir"


@pytest.fixture
def external_redis(tmp_path: Path) -> Iterator[str]:
    """A Redis that `up` did not start (the embedded kind, on a port of its own)."""
    server = EmbeddedRedis(tmp_path / "external-redis").start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.mark.timeout(240)
def test_up_from_an_empty_directory_against_an_external_redis(
    tmp_path: Path, sandbox: SandboxServer, external_redis: str
) -> None:
    """With MIXBATCH_REDIS_URL set, beat used to die on a data directory nobody had made
    (FileNotFoundError on its schedule file), and honcho then stopped every process."""
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    env = {**fast_env(empty), **sandbox_env(sandbox), "MIXBATCH_REDIS_URL": external_redis}
    data_dir = empty / ".mixbatch"
    with running_up(empty, env) as (up, log):
        wait_healthy(empty, env, up, log)
        assert (data_dir / "celerybeat-schedule").exists() or any(
            p.name.startswith("celerybeat-schedule") for p in data_dir.iterdir()
        )
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi, external"}]}
        with Client(external_redis) as client:
            ticket = client.submit(endpoint="/v1/chat/completions", body=body, lane="urgent")
            result = client.result(ticket.id, timeout=60)
        assert answer_ok("/v1/chat/completions", body, result), result

        names = " ".join(stop_up(up, signal.SIGINT, log))
        assert "redis-server" not in names, "no embedded Redis with MIXBATCH_REDIS_URL set"
        for expected in ("worker", "beat", "flower", "metrics"):
            assert expected in names, (expected, names)
    assert running_url(data_dir) is None
    with redis.Redis.from_url(external_redis) as r:
        assert r.ping(), "the external Redis is not `up`'s to stop"


def test_the_repository_procfile_is_the_default_set() -> None:
    """A user who copies the repository's Procfile gets what `up` runs without one."""
    assert parse((ROOT / "Procfile").read_text(), "Procfile") == DEFAULT_PROCESSES


def dry_run(cwd: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    env = {**base_env(cwd), "PATH": os.environ.get("PATH", "")}
    return subprocess.run(
        [MIXBATCH, "up", "--dry-run", "--json", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        timeout=60,
    )


def test_up_without_a_procfile_uses_the_default_set_and_a_procfile_overrides_it(
    tmp_path: Path,
) -> None:
    default = dry_run(tmp_path)
    assert default.returncode == 0, default.stderr.decode()
    shown = json.loads(default.stdout)
    assert "default" in shown["source"]
    assert list(shown["processes"]) == ["worker", "beat", "flower", "metrics", "gpu"]

    (tmp_path / "Procfile").write_text(
        "# mine\nworker: celery -A config worker\n\nbeat: celery -A config beat\n"
    )
    own = json.loads(dry_run(tmp_path).stdout)
    assert own == {
        "source": "Procfile",
        "processes": {"worker": "celery -A config worker", "beat": "celery -A config beat"},
    }
    picked = dry_run(tmp_path, "beat")
    assert json.loads(picked.stdout)["processes"] == {"beat": "celery -A config beat"}

    live_json = subprocess.run(
        [MIXBATCH, "up", "--json"], cwd=tmp_path, env=base_env(tmp_path), capture_output=True
    )
    assert live_json.returncode == 2 and b"--dry-run" in live_json.stderr
    assert not (tmp_path / ".mixbatch").exists()


@pytest.mark.parametrize(
    ("procfile", "args", "fragments"),
    [
        (
            "worker: celery -A config worker\nweb: gunicorn-not-installed app:wsgi\n",
            (),
            ("Procfile, line 2", "'web'", "'gunicorn-not-installed'", "not installed"),
        ),
        (
            "worker: celery -A config worker\nbeat celery -A config beat\n",
            (),
            ("Procfile, line 2", "'beat celery -A config beat'", "name: command"),
        ),
        (
            "worker: celery -A config worker\nworker: celery -A config beat\n",
            (),
            ("Procfile, line 2", "'worker'", "twice"),
        ),
        (
            "worker: celery -A config worker\n",
            ("worker", "web"),
            ("Procfile", "no process 'web'", "it names: worker"),
        ),
        ("# nothing\n", (), ("Procfile", "names no process")),
    ],
    ids=["unknown-program", "not-name-colon-command", "named-twice", "unknown-name", "empty"],
)
def test_up_with_a_bad_procfile_is_one_line_and_starts_nothing(
    tmp_path: Path, procfile: str, args: tuple[str, ...], fragments: tuple[str, ...]
) -> None:
    (tmp_path / "Procfile").write_text(procfile)
    done = subprocess.run(
        [MIXBATCH, "up", *args],
        cwd=tmp_path,
        env=base_env(tmp_path),
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 2, done
    err = " ".join(done.stderr.decode().split())
    assert err.startswith("error:") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert done.stdout == b""
    assert running_url(tmp_path / ".mixbatch") is None
    assert not (tmp_path / ".mixbatch").exists(), "nothing starts, nothing is written"


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
