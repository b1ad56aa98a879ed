"""Gemini over loopback HTTP: the batch adapter against the sandbox's Batch Mode and File API
(inline and file, expiry, cancel, delete, orphans), the realtime adapter, and bad input."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from routing.errors import MalformedInput, ProviderError
from routing.models import Endpoint
from routing.providers import (
    BatchStatus,
    GeminiAdapter,
    RealtimeAdapter,
    account_for,
    adapter_for,
)
from routing.providers.gemini_batch import GeminiBatchAdapter, gemini_status
from routing.sandbox.batch_gemini import expected_gemini_reply
from routing.sandbox.server import SandboxServer
from tests.native_batch import (
    CAPS,
    KEY,
    _fresh_knobs,
    make_adapter,
    sandbox,
    wait_terminal,
    write_lines,
)

__all__ = ["_fresh_knobs", "sandbox"]  # fixtures used by name

MODEL = "gemini-2.5-flash"
TAG = ("mixbatch_key", "k1")


def body(i: int) -> dict[str, Any]:
    return {"model": MODEL, "contents": [{"role": "user", "parts": [{"text": f"question {i}?"}]}]}


def gemini_file(tmp_path: Path, count: int, name: str = "in.jsonl") -> Path:
    """Lines as ``write_input`` writes them for the gemini protocol: custom_id and params."""
    return write_lines(
        tmp_path / name, [{"custom_id": f"r-{i}", "params": body(i)} for i in range(count)]
    )


def create(adapter: Any, path: Path, **kw: Any) -> Any:
    return adapter.create(
        path, endpoint=Endpoint.GENERATE_CONTENT, model=MODEL, metadata=dict([TAG]), **kw
    )


def answers_of(adapter: Any, job: Any) -> dict[str, str]:
    out = {}
    for line in adapter.results(job):
        assert line.ok, line
        out[line.custom_id] = line.body["candidates"][0]["content"]["parts"][0]["text"]
    return out


@pytest.mark.parametrize("inline", [True, False])
def test_full_cycle_inline_and_file(sandbox: SandboxServer, tmp_path: Path, inline: bool) -> None:
    adapter = make_adapter(sandbox, "gemini")
    assert isinstance(adapter, GeminiBatchAdapter)
    if not inline:
        adapter.inline_max_bytes = 100  # type: ignore[misc]
    job = create(adapter, gemini_file(tmp_path, 5))
    assert job.status is BatchStatus.IN_PROGRESS and job.metadata == dict([TAG])
    done = wait_terminal(adapter, job.batch_id)
    assert done.status is BatchStatus.COMPLETED and done.total == 5 and done.completed == 5
    assert (done.output_ref == "inline") is inline
    got = answers_of(adapter, done)
    assert got == {f"r-{i}": expected_gemini_reply(body(i), MODEL) for i in range(5)}
    calls = sandbox.stats()["calls_by_endpoint"]
    assert ("/upload/v1beta/files" in calls) is not inline
    adapter.delete_inputs_outputs(done)
    with pytest.raises(ProviderError) as err:
        adapter.retrieve(job.batch_id)
    assert err.value.status_code == 404


def test_openai_format_lines_work_unchanged(sandbox: SandboxServer, tmp_path: Path) -> None:
    url = Endpoint.GENERATE_CONTENT.value
    lines = [
        {"custom_id": f"r-{i}", "method": "POST", "url": url, "body": body(i)} for i in range(3)
    ]
    adapter = make_adapter(sandbox, "gemini")
    done = wait_terminal(
        adapter, create(adapter, write_lines(tmp_path / "o.jsonl", lines)).batch_id
    )
    assert set(answers_of(adapter, done)) == {"r-0", "r-1", "r-2"}


def test_embeddings_batch(sandbox: SandboxServer, tmp_path: Path) -> None:
    lines = [
        {
            "custom_id": f"e-{i}",
            "params": {"model": "gemini-embedding-001", "content": {"parts": [{"text": f"t{i}"}]}},
        }
        for i in range(3)
    ]
    adapter = make_adapter(sandbox, "gemini")
    job = adapter.create(
        write_lines(tmp_path / "e.jsonl", lines),
        endpoint=Endpoint.EMBED_CONTENT,
        model="gemini-embedding-001",
    )
    done = wait_terminal(adapter, job.batch_id)
    results = {r.custom_id: r.body for r in adapter.results(done)}
    assert set(results) == {"e-0", "e-1", "e-2"}
    assert all(len(b["embedding"]["values"]) == 8 for b in results.values() if b)


def test_stuck_pending_expires_at_48h_with_no_results(
    sandbox: SandboxServer, tmp_path: Path
) -> None:
    """Every request of an expired batch has no line: the collector re-routes them all."""
    sandbox.configure(gemini_stuck_pending=True, time_scale=48 * 3600 / 0.3)
    adapter = make_adapter(sandbox, "gemini")
    job = create(adapter, gemini_file(tmp_path, 3))
    done = wait_terminal(adapter, job.batch_id)
    assert done.status is BatchStatus.EXPIRED and done.raw_status == "BATCH_STATE_EXPIRED"
    assert done.completed == 0 and list(adapter.results(done)) == []


def test_line_failures_map_to_errors(sandbox: SandboxServer, tmp_path: Path) -> None:
    sandbox.configure(batch_line_fail_rate=1.0)
    adapter = make_adapter(sandbox, "gemini")
    done = wait_terminal(adapter, create(adapter, gemini_file(tmp_path, 6)).batch_id)
    lines = list(adapter.results(done))
    assert len(lines) == 6 and not any(line.ok for line in lines)
    by_status = {line.error.status_code: line.error.retryable for line in lines if line.error}
    assert by_status.get(400) is False and by_status.get(500) is True


def test_cancel_then_cancel_after_the_end(sandbox: SandboxServer, tmp_path: Path) -> None:
    sandbox.configure(batch_turnaround_s=3600.0)
    adapter = make_adapter(sandbox, "gemini")
    job = create(adapter, gemini_file(tmp_path, 2))
    cancelled = adapter.cancel(job.batch_id)
    assert cancelled.status is BatchStatus.CANCELLED
    assert adapter.cancel(job.batch_id).status is BatchStatus.CANCELLED
    assert list(adapter.results(cancelled)) == []


def test_orphan_found_by_display_name_and_keys(sandbox: SandboxServer, tmp_path: Path) -> None:
    """Creation is not idempotent: a create whose reply was lost is found by its tag."""
    adapter = make_adapter(sandbox, "gemini")
    decoy = adapter.create(
        gemini_file(tmp_path, 3, "d.jsonl"),
        endpoint=Endpoint.GENERATE_CONTENT,
        model=MODEL,
        metadata={"mixbatch_key": "other"},
    )
    ours = create(adapter, gemini_file(tmp_path, 3))
    wanted = {"r-0", "r-1", "r-2"}
    found = adapter.find_orphan(TAG, custom_ids=wanted, created_after=ours.created_at - 60)
    assert found.found is not None and found.found.batch_id == ours.batch_id
    assert decoy.batch_id != ours.batch_id
    wrong = adapter.find_orphan(TAG, custom_ids={"r-0", "x"}, created_after=ours.created_at - 60)
    assert wrong.found is None


def test_one_model_per_batch(sandbox: SandboxServer, tmp_path: Path) -> None:
    lines = [{"custom_id": "a", "params": {**body(0), "model": "gemini-2.5-pro"}}]
    adapter = make_adapter(sandbox, "gemini")
    with pytest.raises(MalformedInput, match="one model per batch"):
        create(adapter, write_lines(tmp_path / "m.jsonl", lines))
    assert sandbox.stats()["total_calls"] == 0


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        ("BATCH_STATE_SUCCEEDED", BatchStatus.COMPLETED),
        ("JOB_STATE_EXPIRED", BatchStatus.EXPIRED),
        ("JOB_STATE_PENDING", BatchStatus.IN_PROGRESS),
        ("BATCH_STATE_CANCELLED", BatchStatus.CANCELLED),
    ],
)
def test_states_of_both_spellings(raw: str, status: BatchStatus) -> None:
    assert gemini_status(raw) is status


def realtime(sandbox: SandboxServer, name: str = "gemini") -> RealtimeAdapter:
    cap = CAPS[name]
    url = sandbox.openai_base_url if name == "openai" else sandbox.url
    return adapter_for(account_for(cap, {cap.api_key_env: KEY, cap.url_env: url}))


def test_realtime_generate_and_embed(sandbox: SandboxServer) -> None:
    with realtime(sandbox) as adapter:
        assert isinstance(adapter, GeminiAdapter)
        reply = adapter.call(Endpoint.GENERATE_CONTENT, body(7))
        text = reply.body["candidates"][0]["content"]["parts"][0]["text"]
        assert text == expected_gemini_reply(body(7), MODEL)
        embed = {"model": "gemini-embedding-001", "content": {"parts": [{"text": "hi"}]}}
        assert len(adapter.call(Endpoint.EMBED_CONTENT, embed).body["embedding"]["values"]) == 8
    assert "/v1beta/models/{name}" in sandbox.stats()["calls_by_endpoint"]


def test_openai_body_to_gemini_is_refused(sandbox: SandboxServer) -> None:
    wrong = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    with realtime(sandbox) as adapter, pytest.raises(ProviderError) as err:
        adapter.call(Endpoint.GENERATE_CONTENT, wrong)
    assert err.value.status_code == 400 and not err.value.retryable
    assert '"messages"' in str(err.value)


@pytest.mark.parametrize(
    ("endpoint", "says"),
    [(Endpoint.CHAT, "messages"), (Endpoint.GENERATE_CONTENT, "has no realtime endpoint")],
)
def test_gemini_body_to_an_openai_account_is_refused(
    sandbox: SandboxServer, endpoint: Endpoint, says: str
) -> None:
    """At an OpenAI endpoint the provider's 400 names what is missing; a Gemini endpoint is
    refused before any call. Neither is retried."""
    wrong = {"model": "gpt-4o-mini", "contents": body(1)["contents"]}
    with realtime(sandbox, "openai") as adapter, pytest.raises(ProviderError) as err:
        adapter.call(endpoint, wrong)
    assert not err.value.retryable and says in str(err.value)
    assert err.value.status_code == (400 if endpoint is Endpoint.CHAT else None)


def test_key_is_sent_in_the_google_header_and_never_logged(
    sandbox: SandboxServer, caplog: pytest.LogCaptureFixture
) -> None:
    with realtime(sandbox) as adapter:
        adapter.call(Endpoint.GENERATE_CONTENT, body(1))
    reply = httpx.post(
        f"{sandbox.url}/v1beta/models/{MODEL}:generateContent", json={"contents": []}
    )
    assert reply.status_code == 401 and reply.json()["error"]["status"] == "UNAUTHENTICATED"
    assert KEY not in caplog.text
