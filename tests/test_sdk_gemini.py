"""The official google-genai SDK drives the sandbox's Gemini API unchanged: generateContent,
batches.create inline and from an uploaded file, get, files.upload and download, cancel, delete."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from routing.sandbox.batch_gemini import expected_gemini_reply
from routing.sandbox.server import SandboxServer
from tests.native_batch import (
    _fresh_knobs,
    sandbox,
)

__all__ = ["_fresh_knobs", "sandbox"]  # fixtures used by name

genai = pytest.importorskip("google.genai")
types = pytest.importorskip("google.genai.types")

MODEL = "gemini-2.5-flash"
DONE = {"JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED", "JOB_STATE_EXPIRED"}


def client(sandbox: SandboxServer) -> Any:
    return genai.Client(
        api_key="sandbox-key",
        http_options=types.HttpOptions(base_url=sandbox.url, api_version="v1beta"),
    )


def contents(i: int) -> list[dict[str, Any]]:
    return [{"role": "user", "parts": [{"text": f"question {i}?"}]}]


def wait(c: Any, name: str) -> Any:
    deadline = time.monotonic() + 10
    while True:
        job = c.batches.get(name=name)
        if job.state.name in DONE:
            return job
        assert time.monotonic() < deadline, job.state
        time.sleep(0.05)


def test_generate_content(sandbox: SandboxServer) -> None:
    c = client(sandbox)
    reply = c.models.generate_content(model=MODEL, contents="hello there")
    expected = expected_gemini_reply({"contents": [{"parts": [{"text": "hello there"}]}]}, MODEL)
    assert reply.text == expected


def test_batch_inline(sandbox: SandboxServer) -> None:
    c = client(sandbox)
    src = [{"contents": contents(i), "metadata": {"key": f"k{i}"}} for i in range(3)]
    job = c.batches.create(model=MODEL, src=src, config={"display_name": "sdk-inline"})
    assert job.state.name in ("JOB_STATE_PENDING", "JOB_STATE_RUNNING")
    assert job.display_name == "sdk-inline"
    done = wait(c, job.name)
    assert done.state.name == "JOB_STATE_SUCCEEDED"
    texts = [r.response.text for r in done.dest.inlined_responses]
    assert texts == [expected_gemini_reply({"contents": contents(i)}, MODEL) for i in range(3)]
    c.batches.delete(name=job.name)


def test_batch_from_uploaded_file_and_download(sandbox: SandboxServer, tmp_path: Path) -> None:
    c = client(sandbox)
    path = tmp_path / "requests.jsonl"
    path.write_text(
        "".join(
            json.dumps({"key": f"k{i}", "request": {"contents": contents(i)}}) + "\n"
            for i in range(4)
        )
    )
    uploaded = c.files.upload(file=str(path), config={"mime_type": "application/jsonl"})
    assert uploaded.name.startswith("files/") and uploaded.size_bytes == path.stat().st_size
    job = c.batches.create(model=MODEL, src=uploaded.name)
    done = wait(c, job.name)
    assert done.state.name == "JOB_STATE_SUCCEEDED" and done.dest.file_name
    data = c.files.download(file=done.dest.file_name)
    lines = [json.loads(line) for line in data.decode().splitlines()]
    got = {
        line["key"]: line["response"]["candidates"][0]["content"]["parts"][0]["text"]
        for line in lines
    }
    assert got == {
        f"k{i}": expected_gemini_reply({"contents": contents(i)}, MODEL) for i in range(4)
    }


def test_batch_cancel(sandbox: SandboxServer) -> None:
    sandbox.configure(batch_turnaround_s=3600.0)
    c = client(sandbox)
    job = c.batches.create(model=MODEL, src=[{"contents": contents(0)}])
    c.batches.cancel(name=job.name)
    assert c.batches.get(name=job.name).state.name == "JOB_STATE_CANCELLED"


def test_batch_list(sandbox: SandboxServer) -> None:
    c = client(sandbox)
    made = {c.batches.create(model=MODEL, src=[{"contents": contents(i)}]).name for i in range(3)}
    assert made <= {job.name for job in c.batches.list()}
