"""Mistral batch over loopback HTTP: the adapter against the sandbox (inline requests,
timeout_hours from the window, TIMEOUT_EXCEEDED, cancel, orphans), and the mistralai SDK."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from routing.errors import ProviderError
from routing.models import Endpoint
from routing.providers import BatchStatus
from routing.providers.mistral_batch import MistralBatchAdapter, timeout_hours
from routing.sandbox import expected_reply
from routing.sandbox.server import SandboxServer
from tests.native_batch import (
    CAPS,
    _fresh_knobs,
    make_adapter,
    sandbox,
    wait_terminal,
    write_lines,
)

__all__ = ["_fresh_knobs", "sandbox"]  # fixtures used by name

MODEL = "mistral-small-latest"
TAG = ("mixbatch_key", "m1")


def body(i: int) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": f"question {i}?"}]}


def chat_file(tmp_path: Path, count: int) -> Path:
    url = Endpoint.CHAT.value
    lines = [
        {"custom_id": f"r-{i}", "method": "POST", "url": url, "body": body(i)} for i in range(count)
    ]
    return write_lines(tmp_path / "in.jsonl", lines)


def create(adapter: Any, path: Path, **kw: Any) -> Any:
    return adapter.create(path, endpoint=Endpoint.CHAT, model=MODEL, metadata=dict([TAG]), **kw)


def texts(adapter: Any, job: Any) -> dict[str, str]:
    return {
        r.custom_id: r.body["choices"][0]["message"]["content"]
        for r in adapter.results(job)
        if r.ok and r.body
    }


def test_full_cycle(sandbox: SandboxServer, tmp_path: Path) -> None:
    adapter = make_adapter(sandbox, "mistral")
    assert isinstance(adapter, MistralBatchAdapter)
    job = create(adapter, chat_file(tmp_path, 4))
    assert job.metadata == dict([TAG]) and job.raw_status in ("QUEUED", "RUNNING")
    done = wait_terminal(adapter, job.batch_id)
    assert done.status is BatchStatus.COMPLETED and done.raw_status == "SUCCESS"
    assert texts(adapter, done) == {
        f"r-{i}": expected_reply(Endpoint.CHAT.value, body(i)) for i in range(4)
    }


def test_longer_window_is_sent_as_timeout_hours(sandbox: SandboxServer, tmp_path: Path) -> None:
    assert timeout_hours("24h") == 24 and timeout_hours("7d") == 168
    adapter = make_adapter(sandbox, "mistral")
    job = create(adapter, chat_file(tmp_path, 1), window="168h")
    assert wait_terminal(adapter, job.batch_id).status is BatchStatus.COMPLETED
    with pytest.raises(ProviderError, match="no completion window '3d'"):
        create(adapter, chat_file(tmp_path, 1), window="3d")


def test_window_for_a_deadline() -> None:
    cap = CAPS["mistral"]
    assert cap.window_for(3600) == "24h"
    assert cap.window_for(30 * 3600) == "24h"
    assert cap.window_for(3 * 86400) == "48h"
    assert cap.window_for(10 * 86400) == "168h"


def test_timeout_exceeded_keeps_finished_lines(sandbox: SandboxServer, tmp_path: Path) -> None:
    """TIMEOUT_EXCEEDED is an expiry: finished lines are answers, the rest are re-routed."""
    sandbox.configure(mistral_timeout=True, batch_expire_done_fraction=0.5)
    adapter = make_adapter(sandbox, "mistral")
    done = wait_terminal(adapter, create(adapter, chat_file(tmp_path, 4)).batch_id)
    assert done.status is BatchStatus.EXPIRED and done.raw_status == "TIMEOUT_EXCEEDED"
    lines = list(adapter.results(done))
    ok = [r for r in lines if r.ok]
    expired = [r for r in lines if not r.ok]
    assert len(ok) == 2 and len(expired) == 2
    assert all(r.error and r.error.code == "expired" and r.error.retryable for r in expired)


def test_line_failures(sandbox: SandboxServer, tmp_path: Path) -> None:
    sandbox.configure(batch_line_fail_rate=1.0)
    adapter = make_adapter(sandbox, "mistral")
    done = wait_terminal(adapter, create(adapter, chat_file(tmp_path, 6)).batch_id)
    errors = [r.error for r in adapter.results(done)]
    assert len(errors) == 6 and all(e is not None for e in errors)
    assert {e.status_code: e.retryable for e in errors if e} == {400: False, 500: True}


def test_cancel(sandbox: SandboxServer, tmp_path: Path) -> None:
    sandbox.configure(batch_turnaround_s=3600.0)
    adapter = make_adapter(sandbox, "mistral")
    job = create(adapter, chat_file(tmp_path, 2))
    assert adapter.cancel(job.batch_id).status is BatchStatus.CANCELLED
    assert adapter.cancel(job.batch_id).status is BatchStatus.CANCELLED


def test_orphan_by_tag(sandbox: SandboxServer, tmp_path: Path) -> None:
    adapter = make_adapter(sandbox, "mistral")
    ours = create(adapter, chat_file(tmp_path, 2))
    found = adapter.find_orphan(TAG, custom_ids={"r-0", "r-1"}, created_after=ours.created_at - 60)
    assert found.found is not None and found.found.batch_id == ours.batch_id
    none = adapter.find_orphan(("mixbatch_key", "zz"), custom_ids={"r-0"}, created_after=0)
    assert none.found is None


def test_mistralai_sdk_drives_the_sandbox(sandbox: SandboxServer) -> None:
    mistralai = pytest.importorskip("mistralai.client")
    client = mistralai.Mistral(api_key="sandbox-key", server_url=sandbox.url)
    requests = [{"custom_id": f"s{i}", "body": {"messages": body(i)["messages"]}} for i in range(3)]
    job = client.batch.jobs.create(
        requests=requests, endpoint="/v1/chat/completions", model=MODEL, timeout_hours=48
    )
    assert job.status in ("QUEUED", "RUNNING") and job.total_requests == 3
    deadline = time.monotonic() + 10
    while job.status not in ("SUCCESS", "FAILED", "TIMEOUT_EXCEEDED", "CANCELLED"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
        job = client.batch.jobs.get(job_id=job.id)
    assert job.status == "SUCCESS" and job.output_file
    assert job.id in {j.id for j in client.batch.jobs.list().data or []}
    content = client.files.download(file_id=job.output_file).read().decode()
    assert all(expected_reply(Endpoint.CHAT.value, body(i)) in content for i in range(3))
    sandbox.configure(batch_turnaround_s=3600.0)
    other = client.batch.jobs.create(
        requests=requests[:1], endpoint="/v1/chat/completions", model=MODEL
    )
    assert client.batch.jobs.cancel(job_id=other.id).status == "CANCELLED"
