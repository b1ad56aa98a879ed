"""Flower against a real worker and broker: the service's tasks are there, under ``mixbatch.*``
names with readable arguments, and nothing of a request (its text, its answer, a key, the Redis
password) shows through Flower's REST API or the worker's log, not even for a producer that
sends ``mixbatch.enqueue`` with a plain ``send_task`` (whose default argsrepr is the body).

Flower is started the way the Procfile starts it (``mixbatch flower``), with basic auth, on a
loopback port; beat and the sandbox provider come from ``tasks.cli.stack.LocalStack``. The worker is
the service's own app as ``config/celery_app.py`` builds it (its ``task_cls`` is
``config.redaction.MixbatchTask``, which the last test checks), with nothing added here. A second
producer sends with ``routing.contrib.common.send_enqueue`` and its own ``task-sent`` events on,
so what Flower hears from the producer side is checked too.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from celery import Celery

from config.celery_app import app
from config.redaction import MixbatchTask, RedactedRequest, is_readable, summarize
from routing.client import Client
from routing.contrib.common import send_enqueue
from routing.decide.lanes import parse_lanes
from routing.models import ServiceConfig
from tasks.cli.stack import SANDBOX_KEY, LocalStack

ROOT = Path(__file__).resolve().parent.parent
MIXBATCH = str(Path(sys.executable).parent / "mixbatch")
AUTH = ("ops", "flower-test-pw")
WORKER = """
from config.celery_app import app
app.worker_main(["worker", "-Q", "mixbatch.control,mixbatch.realtime,mixbatch.deliver,mixbatch.batch",
                 "-c", "2", "-n", "worker@%h", "--without-gossip", "--without-mingle", "-l", "INFO"])
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def wait_until(check: Any, timeout_s: float, what: str) -> Any:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        got = check()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[LocalStack]:
    st = LocalStack(
        tmp_path / "stack",
        namespace="fl",
        env={
            "MIXBATCH_AGGREGATE_INTERVAL_S": "0.3",
            "MIXBATCH_SWEEP_INTERVAL_S": "1",
            "MIXBATCH_LOG_LEVEL": "WARNING",
        },
    ).start()
    st.publish(ServiceConfig(lanes=parse_lanes((ROOT / "config" / "lanes.toml").read_text())))
    try:
        yield st
    finally:
        st.stop()


@pytest.fixture
def flower(stack: LocalStack, tmp_path: Path) -> Iterator[str]:
    port = free_port()
    env = {
        **stack.env(),
        "MIXBATCH_FLOWER_PORT": str(port),
        "MIXBATCH_FLOWER_BASIC_AUTH": f"{AUTH[0]}:{AUTH[1]}",
    }
    with (tmp_path / "flower.log").open("wb") as log:
        proc = subprocess.Popen(
            [MIXBATCH, "flower"], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT
        )
        base = f"http://127.0.0.1:{port}"
        try:

            def up() -> bool:
                assert proc.poll() is None, (tmp_path / "flower.log").read_text()
                try:
                    return httpx.get(f"{base}/healthcheck", timeout=1).status_code == 200
                except httpx.TransportError:
                    return False

            wait_until(up, 30, "Flower to answer")
            yield base
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.mark.timeout(120)
def test_flower_lists_mixbatch_tasks_with_readable_args_and_no_request_text(
    stack: LocalStack, flower: str
) -> None:
    with (stack.log_dir / "worker.log").open("ab") as log:
        stack.procs["worker"] = subprocess.Popen(
            [sys.executable, "-c", WORKER],
            env=stack.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
        )
    stack.start_beat()
    stack.wait_workers(["worker"])
    marker = f"confidential-{uuid.uuid4().hex}"
    # A producer with only a Celery app: Celery's default argsrepr would be this body.
    producer = Celery("producer", broker=stack.url, set_as_current=False)
    enqueue_body = {"model": "text-embedding-3-small", "input": f"{marker} via send_task"}
    producer.send_task(
        "mixbatch.enqueue",
        args=[
            {
                "lane": "urgent",
                "custom_id": "via-send-task",
                "endpoint": "/v1/embeddings",
                "body": enqueue_body,
            }
        ],
        queue="mixbatch.control",
    )
    producer.close()
    # A producer that uses the helper, with its own task-sent events on: the event Flower hears
    # from it carries the helper's summary, never the request.
    helped = Celery("helped", broker=stack.url, set_as_current=False)
    helped.conf.task_send_sent_event = True
    send_enqueue(
        helped,
        {
            "lane": "urgent",
            "custom_id": "via-send-enqueue",
            "endpoint": "/v1/embeddings",
            "body": {"model": "text-embedding-3-small", "input": f"{marker} via send_enqueue"},
        },
    )
    helped.close()
    items = [
        {
            "lane": "urgent",
            "custom_id": f"flower-{i}",
            "endpoint": "/v1/chat/completions",
            "body": {
                "model": "gpt-4o-mini",
                "messages": [{"role": "user", "content": f"{marker} question {i}"}],
            },
        }
        for i in range(3)
    ]
    with Client(stack.url, namespace="fl") as client:
        tickets = client.submit_many(items)
        results = [client.result(t.id, timeout=60) for t in tickets]
    answers = [r.body["choices"][0]["message"]["content"] for r in results if r.body]
    assert len(answers) == 3

    def tasks() -> dict[str, dict[str, Any]]:
        got = httpx.get(f"{flower}/api/tasks", auth=AUTH, timeout=5)
        assert got.status_code == 200, got.text
        data: dict[str, dict[str, Any]] = got.json()
        names = {t["name"] for t in data.values()}
        enqueued = [t for t in data.values() if t["name"] == "mixbatch.enqueue" and t["args"]]
        wanted = {"mixbatch.realtime", "mixbatch.aggregate"} <= names and len(enqueued) == 2
        return data if wanted else {}

    found = wait_until(tasks, 30, "the service's tasks in Flower")
    names = {t["name"] for t in found.values()}
    assert all(name.startswith("mixbatch.") for name in names), names
    for task in found.values():
        assert is_readable(task["args"]), (task["name"], task["args"])
        assert is_readable(task["kwargs"]), (task["name"], task["kwargs"])
    enqueued = sorted(t["args"] for t in found.values() if t["name"] == "mixbatch.enqueue")
    assert enqueued == [
        "lane=urgent custom_id=via-send-enqueue endpoint=/v1/embeddings",
        "lane=urgent custom_id=via-send-task endpoint=/v1/embeddings",
    ]
    realtime = [t for t in found.values() if t["name"] == "mixbatch.realtime"]
    ids = {t.id for t in tickets}
    assert any(
        re.search(r"provider=openai model=gpt-4o-mini n=\d+ first=urgent\.\w+", t["args"])
        for t in realtime
    ), [t["args"] for t in realtime]
    mentioned = " ".join(t["args"] for t in found.values())
    assert any(rid in mentioned for rid in ids), "request ids are what the arguments name"

    # Everything Flower's API says about these tasks and the worker, read as a whole.
    pages = [
        httpx.get(f"{flower}/api/tasks", auth=AUTH, timeout=5).text,
        httpx.get(f"{flower}/api/workers", auth=AUTH, timeout=10).text,
        httpx.get(f"{flower}/api/task/types", auth=AUTH, timeout=5).text,
        *(
            httpx.get(f"{flower}/api/task/info/{t['uuid']}", auth=AUTH, timeout=5).text
            for t in realtime
        ),
    ]
    registered = httpx.get(f"{flower}/api/workers", auth=AUTH, timeout=10).json()
    for worker in registered.values():
        ours = [n for n in worker.get("registered", []) if not n.startswith("celery.")]
        assert ours and all(n.startswith("mixbatch.") for n in ours), ours
    password = urlsplit(stack.url).password
    secrets = [marker, SANDBOX_KEY, *answers, *([password] if password else [])]
    pages.append((stack.log_dir / "worker.log").read_text())
    assert "via-send-task" in pages[-1], "the worker logs at INFO: the check below means something"
    for page in pages:
        for secret in secrets:
            assert secret not in page, f"{secret[:20]}... leaked into Flower's API or the log"

    assert httpx.get(f"{flower}/api/tasks", timeout=5).status_code == 401, "auth is required"


@pytest.mark.parametrize(
    ("text", "readable"),
    [
        ("()", True),
        ("{}", True),
        ("id=urgent.01J", True),
        ("provider=openai model=gpt-4o-mini n=3 first=urgent.01J", True),
        ("group=openai|/v1/embeddings|m n=3 why=size: 20971520 bytes reached the target", True),
        ("[{'lane': 'urgent', 'body': {'input': 'x'}}]", False),
        ("('openai', [['urgent.01J', 'token']])", False),
        ("{'body': 'x'}", False),
        ("provider=openai items=[['urgent.01J', 'token']]", False),
    ],
)
def test_is_readable(text: str, readable: bool) -> None:
    assert is_readable(text) is readable


def test_summarize_names_the_request_never_its_body() -> None:
    request = {"lane": "bulk", "custom_id": "doc-7", "tenant": "acme", "body": {"input": "secret"}}
    assert summarize("mixbatch.enqueue", [request]) == "lane=bulk tenant=acme custom_id=doc-7"
    assert summarize("mixbatch.enqueue", [{"body": {"input": "secret"}}]) == "request=hidden"
    assert summarize("mixbatch.realtime", ["openai", [["id", "token"]]]) == "args=hidden n=2"


def test_the_service_app_redacts_task_arguments() -> None:
    """Every task of the service's app is a ``MixbatchTask``: the worker above runs the app as it
    is, so this is what keeps its arguments out of Flower and the log."""
    assert issubclass(app.Task, MixbatchTask)
    assert app.Task.Request is RedactedRequest
