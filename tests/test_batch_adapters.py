"""Batch adapters over real HTTP on loopback: the sandbox's batch endpoints for whole cycles and
faults, and a small scripted server for what the sandbox never does (a connection dropped mid
download, a lost reply to a create, compatible providers' odd shapes, foreign results URLs)."""

from __future__ import annotations

import io
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from routing.decide.backoff import RetryPolicy
from routing.decide.planner import anthropic_custom_id, file_overhead
from routing.errors import ConfigError, InvalidRequest, MalformedInput, ProviderError, RateLimited
from routing.jsonl import parse_batch_lines
from routing.models import Endpoint
from routing.providers import (
    TERMINAL_BATCH_STATUSES,
    AnthropicBatchAdapter,
    BatchAdapter,
    BatchJob,
    BatchStatus,
    LineResult,
    OpenAIBatchAdapter,
    ProviderCapabilities,
    account_for,
    batch_adapter_class,
    batch_adapter_for,
    load_providers,
)
from routing.providers.batch_jobs import OrphanSearch
from routing.sandbox import Knobs, expected_reply, response_text
from routing.sandbox.server import SandboxServer
from tests.test_planner import claimed, jsonl_of, lookup_of, plan

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-batch-DO-NOT-LEAK-5e2c"
PROMPT_SECRET = "prompt-secret-77c1"
FAST = RetryPolicy(max_tries=4, base_s=0.01, cap_s=5.0, jitter=0.0)
CAPS = load_providers(ROOT / "config" / "providers.toml", {})
CHAT_MODEL = "gpt-4o-mini"
CLAUDE = "claude-3-5-haiku-latest"
#: Sandbox seconds per real second: a 2 s sandbox turnaround takes 0.1 s.
SCALE = 20.0


def knobs(**changes: Any) -> dict[str, Any]:
    """The sandbox's knobs for these tests: time 20 times faster, with ``changes``."""
    return Knobs(**{"time_scale": SCALE, "batch_turnaround_s": 2.0, **changes}).model_dump()


@pytest.fixture(scope="module")
def sandbox() -> Iterator[SandboxServer]:
    with SandboxServer(knobs=Knobs(**knobs())) as server:
        yield server


@pytest.fixture(autouse=True)
def _fresh_knobs(request: pytest.FixtureRequest) -> None:
    if "sandbox" in request.fixturenames:
        server: SandboxServer = request.getfixturevalue("sandbox")
        server.configure(**knobs())
        server.reset()


class SleepRecorder:
    """Stands in for ``time.sleep``: records each wait, sleeps none, and may act on it."""

    def __init__(self, on_sleep: Callable[[float], None] | None = None) -> None:
        self.waits: list[float] = []
        self.on_sleep = on_sleep

    def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        if self.on_sleep is not None:
            self.on_sleep(seconds)


def make_adapter(
    protocol: str, base_url: str, cap: ProviderCapabilities | None = None, **options: Any
) -> BatchAdapter:
    """An adapter built the way the service builds one: capabilities, environment, factory."""
    cap = cap or CAPS[protocol]
    env = {cap.api_key_env: KEY, cap.url_env: base_url}
    options.setdefault("policy", FAST)
    return batch_adapter_for(account_for(cap, env), cap, **options)


@pytest.fixture
def adapters(sandbox: SandboxServer) -> Iterator[Callable[..., BatchAdapter]]:
    made: list[BatchAdapter] = []

    def make(
        protocol: str, cap: ProviderCapabilities | None = None, **options: Any
    ) -> BatchAdapter:
        base = sandbox.openai_base_url if protocol == "openai" else sandbox.anthropic_base_url
        adapter = make_adapter(protocol, base, cap, **options)
        made.append(adapter)
        return adapter

    yield make
    for adapter in made:
        adapter.close()


def chat_line(i: int, **overrides: Any) -> dict[str, Any]:
    body = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": f"question {i}?"}]}
    line = {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}
    return line | overrides


def messages_line(i: int, **overrides: Any) -> dict[str, Any]:
    body = {
        "model": CLAUDE,
        "max_tokens": 32,
        "messages": [{"role": "user", "content": f"question {i}?"}],
    }
    line = {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/messages", "body": body}
    return line | overrides


ENDPOINT = {"openai": "/v1/chat/completions", "anthropic": "/v1/messages"}
MODEL = {"openai": CHAT_MODEL, "anthropic": CLAUDE}
LINE = {"openai": chat_line, "anthropic": messages_line}


def write_jsonl(path: Path, lines: list[Any]) -> Path:
    with path.open("w") as handle:
        for line in lines:
            handle.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    return path


def batch_file(tmp_path: Path, protocol: str, count: int, name: str = "in.jsonl") -> Path:
    return write_jsonl(tmp_path / name, [LINE[protocol](i) for i in range(count)])


def wait_terminal(adapter: BatchAdapter, batch_id: str, timeout_s: float = 10.0) -> BatchJob:
    deadline = time.monotonic() + timeout_s
    while True:
        job = adapter.retrieve(batch_id)
        if job.terminal:
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"batch {batch_id} still {job.status} after {timeout_s} s")
        time.sleep(0.02)


def create(adapter: BatchAdapter, path: Path, **kw: Any) -> BatchJob:
    return adapter.create(path, endpoint=ENDPOINT[adapter.kind], model=MODEL[adapter.kind], **kw)


# -- whole cycles against the sandbox --------------------------------------------------------


@pytest.mark.parametrize("protocol", ["openai", "anthropic"])
def test_full_cycle(
    sandbox: SandboxServer, adapters: Callable[..., BatchAdapter], tmp_path: Path, protocol: str
) -> None:
    adapter = adapters(protocol)
    path = batch_file(tmp_path, protocol, 6)
    started = sandbox.state.clock.now()
    job = create(adapter, path, metadata={"mixbatch_plan": "plan-1"})
    assert job.provider == protocol
    assert job.status in {BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS}
    assert not job.terminal
    assert int(started) <= job.created_at <= sandbox.state.clock.now()
    assert job.expires_at is not None and job.expires_at > job.created_at
    if protocol == "openai":
        assert job.metadata == {"mixbatch_plan": "plan-1"}
        assert job.input_ref and job.raw_status == "validating"
    else:
        assert job.metadata == {} and job.total == 6 and job.raw_status == "in_progress"

    done = wait_terminal(adapter, job.batch_id)
    assert done.status is BatchStatus.COMPLETED
    assert (done.total, done.completed, done.failed) == (6, 6, 0)
    assert done.ended_at is not None and done.output_ref
    assert done.error_ref is None
    assert done.status in TERMINAL_BATCH_STATUSES

    results = list(adapter.results(done))
    assert sorted(r.custom_id for r in results) == sorted(f"req-{i}" for i in range(6))
    for result in results:
        assert result.ok and result.status_code == 200 and result.body is not None
        line = LINE[protocol](int(result.custom_id.removeprefix("req-")))
        endpoint = ENDPOINT[protocol]
        assert response_text(endpoint, result.body) == expected_reply(endpoint, line["body"])

    adapter.delete_inputs_outputs(done)
    adapter.delete_inputs_outputs(done)
    with pytest.raises(ProviderError) as info:
        list(adapter.results(done)) if protocol == "openai" else adapter.retrieve(done.batch_id)
    assert info.value.status_code == 404 and not info.value.retryable


@pytest.mark.parametrize("protocol", ["openai", "anthropic"])
def test_partial_failure(
    sandbox: SandboxServer, adapters: Callable[..., BatchAdapter], tmp_path: Path, protocol: str
) -> None:
    sandbox.configure(batch_line_fail_rate=0.5, seed=3)
    adapter = adapters(protocol)
    job = create(adapter, batch_file(tmp_path, protocol, 24))
    done = wait_terminal(adapter, job.batch_id)
    assert done.status is BatchStatus.COMPLETED
    assert 0 < done.failed < 24 and done.completed + done.failed == 24
    if protocol == "openai":
        assert done.output_ref and done.error_ref
    results = {r.custom_id: r for r in adapter.results(done)}
    assert len(results) == 24
    failed = [r for r in results.values() if not r.ok]
    assert len(failed) == done.failed
    statuses = set()
    for result in failed:
        assert result.error is not None and result.status_code in (400, 500)
        assert result.error.status_code == result.status_code
        assert result.error.retryable is (result.status_code == 500)
        assert result.body is not None and "sandbox" in result.error.message
        statuses.add(result.status_code)
    assert statuses == {400, 500}


@pytest.mark.parametrize("protocol", ["openai", "anthropic"])
def test_expiry_keeps_finished_lines(
    sandbox: SandboxServer, adapters: Callable[..., BatchAdapter], tmp_path: Path, protocol: str
) -> None:
    sandbox.configure(batch_expire=True, time_scale=400_000.0)
    adapter = adapters(protocol)
    job = create(adapter, batch_file(tmp_path, protocol, 8))
    done = wait_terminal(adapter, job.batch_id)
    assert done.status is BatchStatus.EXPIRED
    assert done.raw_status == ("expired" if protocol == "openai" else "ended")
    results = list(adapter.results(done))
    assert len(results) == 8
    expired = [r for r in results if r.error is not None and r.error.code == "expired"]
    assert len(expired) == 4
    assert all(r.error is not None and r.error.retryable for r in expired)
    assert all(r.status_code is None for r in expired)
    assert sum(r.ok for r in results) == 4


@pytest.mark.parametrize("protocol", ["openai", "anthropic"])
def test_cancel(
    sandbox: SandboxServer, adapters: Callable[..., BatchAdapter], tmp_path: Path, protocol: str
) -> None:
    sandbox.configure(batch_turnaround_s=3600.0)
    adapter = adapters(protocol)
    job = create(adapter, batch_file(tmp_path, protocol, 5))
    if protocol == "openai":
        while adapter.retrieve(job.batch_id).status is BatchStatus.VALIDATING:
            time.sleep(0.01)
    cancelling = adapter.cancel(job.batch_id)
    assert cancelling.status is BatchStatus.CANCELLING
    assert cancelling.raw_status == ("cancelling" if protocol == "openai" else "canceling")
    done = wait_terminal(adapter, job.batch_id)
    assert done.status is BatchStatus.CANCELLED
    results = list(adapter.results(done))
    assert {r.custom_id for r in results} == {f"req-{i}" for i in range(5)}
    cancelled = [r for r in results if not r.ok]
    assert cancelled, "a one-hour batch cancelled at once leaves lines unrun"
    for result in cancelled:
        assert result.error is not None
        assert result.error.code == "cancelled" and result.error.retryable


@pytest.mark.parametrize("protocol", ["openai", "anthropic"])
def test_cancel_after_the_end_returns_the_batch(
    adapters: Callable[..., BatchAdapter], tmp_path: Path, protocol: str
) -> None:
    adapter = adapters(protocol)
    job = wait_terminal(adapter, create(adapter, batch_file(tmp_path, protocol, 2)).batch_id)
    again = adapter.cancel(job.batch_id)
    assert again.status is BatchStatus.COMPLETED and again.batch_id == job.batch_id
    with pytest.raises(ProviderError) as info:
        adapter.cancel("batch_missing" if protocol == "openai" else "msgbatch_missing")
    assert info.value.status_code == 404


def test_cancel_refused_by_capabilities(sandbox: SandboxServer, tmp_path: Path) -> None:
    cap = CAPS["openai"].model_copy(update={"cancel": False})
    with (
        make_adapter("openai", sandbox.openai_base_url, cap) as adapter,
        pytest.raises(ProviderError, match="cannot cancel") as info,
    ):
        adapter.cancel("batch_x")
    assert not info.value.retryable
    assert sandbox.stats()["total_calls"] == 0


def test_openai_validation_failure_names_lines(
    adapters: Callable[..., BatchAdapter], tmp_path: Path
) -> None:
    lines = [
        chat_line(0),
        chat_line(1, url="/v1/embeddings"),
        chat_line(2),
        chat_line(0),
        "{not json",
    ]
    adapter = adapters("openai")
    job = create(adapter, write_jsonl(tmp_path / "bad.jsonl", lines))
    done = wait_terminal(adapter, job.batch_id)
    assert done.status is BatchStatus.FAILED and done.raw_status == "failed"
    by_line = {e.line: e for e in done.validation_errors}
    assert by_line[2].code == "url_mismatch" and "does not match" in by_line[2].message
    assert by_line[4].code == "duplicate_custom_id"
    assert by_line[5].code == "invalid_json_line"
    assert list(adapter.results(done)) == []


def test_anthropic_checks_lines_before_sending(
    sandbox: SandboxServer, adapters: Callable[..., BatchAdapter], tmp_path: Path
) -> None:
    adapter = adapters("anthropic")
    cases: list[tuple[list[Any], int, str]] = [
        ([messages_line(0), messages_line(1, custom_id="x" * 65)], 2, "1 to 64 characters"),
        ([messages_line(0), "", "[1]"], 3, "must be a JSON object"),
        ([messages_line(0, url="/v1/chat/completions")], 1, "only POST /v1/messages"),
        ([messages_line(0), messages_line(1), messages_line(0)], 3, "repeats line 1"),
        ([messages_line(0, body="hi")], 1, "body must be a JSON object"),
        ([{"custom_id": "a", "params": [1]}], 1, "params must be a JSON object"),
        ([{"custom_id": "a", "params": {}, "url": "/v1/messages"}], 1, "only custom_id and params"),
    ]
    for lines, line, fragment in cases:
        path = write_jsonl(tmp_path / "bad.jsonl", lines)
        with pytest.raises(MalformedInput, match=fragment) as info:
            create(adapter, path)
        assert info.value.line == line and info.value.source == "bad.jsonl"
    assert sandbox.stats()["total_calls"] == 0


@pytest.mark.parametrize("protocol", ["openai", "anthropic"])
def test_list_follows_pages(
    sandbox: SandboxServer, adapters: Callable[..., BatchAdapter], tmp_path: Path, protocol: str
) -> None:
    adapter = adapters(protocol)
    path = batch_file(tmp_path, protocol, 1)
    created = [create(adapter, path).batch_id for _ in range(5)]
    listed = [job.batch_id for job in adapter.list(limit=2)]
    assert listed == created[::-1]
    list_path = "/v1/batches" if protocol == "openai" else "/v1/messages/batches"
    creates_and_pages = 5 + 3
    assert sandbox.stats()["calls_by_endpoint"][list_path] == creates_and_pages
    future = sandbox.state.clock.now() + 3600
    assert [job.batch_id for job in adapter.list(limit=2, created_after=future)] == []
    assert sandbox.stats()["calls_by_endpoint"][list_path] == creates_and_pages + 1


def decoy_file(tmp_path: Path, protocol: str, count: int) -> Path:
    """A batch file of ``count`` lines whose custom_ids are not ours."""
    lines = [LINE[protocol](i, custom_id=f"someone-else-{i}") for i in range(count)]
    return write_jsonl(tmp_path / "decoy.jsonl", lines)


def test_openai_orphan_needs_our_tag_and_our_custom_ids(
    sandbox: SandboxServer, adapters: Callable[..., BatchAdapter], tmp_path: Path
) -> None:
    """A batch of the same size carrying our tag (a copy, a reused key) is older, so it would
    be taken first by a match on the tag alone; its custom_ids are not ours."""
    adapter = adapters("openai")
    since = sandbox.state.clock.now()
    tag = ("mixbatch_plan", "p1")
    decoy = create(adapter, decoy_file(tmp_path, "openai", 2), metadata=dict([tag]))
    time.sleep(0.1)  # two sandbox seconds: the decoy is the older one
    ours = create(adapter, batch_file(tmp_path, "openai", 2), metadata=dict([tag]))
    create(adapter, batch_file(tmp_path, "openai", 2), metadata={"mixbatch_plan": "p2"})
    mine = {"req-0", "req-1"}
    search = adapter.find_orphan(tag, custom_ids=mine, created_after=since)
    assert search.found is not None and search.found.batch_id == ours.batch_id
    assert search.undecided == []
    theirs = {"someone-else-0", "someone-else-1"}
    search = adapter.find_orphan(tag, custom_ids=theirs, created_after=since)
    assert search.found is not None and search.found.batch_id == decoy.batch_id
    for wanted in ({"req-0"}, {"req-0", "req-1", "req-2"}):
        assert adapter.find_orphan(tag, custom_ids=wanted, created_after=since).found is None
    assert adapter.find_orphan(("mixbatch_plan", "p3"), custom_ids=mine, created_after=since) == (
        OrphanSearch()
    )
    later = sandbox.state.clock.now() + 3600
    assert adapter.find_orphan(tag, custom_ids=mine, created_after=later).found is None
    excluded = adapter.find_orphan(
        tag, custom_ids=mine, created_after=since, exclude={ours.batch_id}
    )
    assert excluded == OrphanSearch()


def test_anthropic_orphan_is_matched_by_its_custom_ids_once_it_ended(
    sandbox: SandboxServer, adapters: Callable[..., BatchAdapter], tmp_path: Path
) -> None:
    """Message batches carry no metadata and show their custom_ids only in their results: a
    running batch of the right size is undecided, never adopted on its size alone."""
    sandbox.configure(**knobs(batch_turnaround_s=60.0))
    adapter = adapters("anthropic")
    since = sandbox.state.clock.now()
    decoy = create(adapter, decoy_file(tmp_path, "anthropic", 3))
    ours = create(adapter, batch_file(tmp_path, "anthropic", 3))
    create(adapter, batch_file(tmp_path, "anthropic", 4, "four.jsonl"))
    mine = {"req-0", "req-1", "req-2"}
    running = adapter.find_orphan(("k", "v"), custom_ids=mine, created_after=since)
    assert running.found is None
    assert sorted(running.undecided) == sorted([decoy.batch_id, ours.batch_id])

    for job in (decoy, ours):
        wait_terminal(adapter, job.batch_id)
    search = adapter.find_orphan(("k", "v"), custom_ids=mine, created_after=since)
    assert search == OrphanSearch(found=search.found)
    assert search.found is not None and search.found.batch_id == ours.batch_id
    theirs = {"someone-else-0", "someone-else-1", "someone-else-2"}
    search = adapter.find_orphan(("k", "v"), custom_ids=theirs, created_after=since)
    assert search.found is not None and search.found.batch_id == decoy.batch_id
    excluded = adapter.find_orphan(
        ("k", "v"), custom_ids=mine, created_after=since, exclude={ours.batch_id}
    )
    assert excluded == OrphanSearch(), "the decoy of the same size is not taken for ours"


@pytest.mark.parametrize("protocol", ["openai", "anthropic"])
def test_429_on_create_honours_retry_after(
    sandbox: SandboxServer,
    adapters: Callable[..., BatchAdapter],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    protocol: str,
) -> None:
    sandbox.configure(batch_rate_429=1.0, retry_after_s=0.75)

    def stop_429s(_: float) -> None:
        sandbox.configure(batch_rate_429=0.0)

    recorder = SleepRecorder(stop_429s)
    adapter = adapters(protocol, sleep=recorder)
    caplog.set_level(logging.DEBUG)
    job = create(adapter, batch_file(tmp_path, protocol, 2))
    assert job.batch_id
    assert len(recorder.waits) == 1 and 0.75 <= recorder.waits[0] <= FAST.cap_s
    retries = [r for r in caplog.records if r.getMessage().count("failed on try 1")]
    assert len(retries) == 1
    fields = retries[0].__dict__
    assert fields["status_code"] == 429 and fields["provider"] == protocol
    assert fields["provider_request_id"]
    created = [r for r in caplog.records if "created batch" in r.getMessage()]
    assert len(created) == 1 and created[0].__dict__["batch_id"] == job.batch_id
    assert created[0].__dict__["provider_request_id"]


def test_429_that_never_ends_raises_rate_limited(
    sandbox: SandboxServer, adapters: Callable[..., BatchAdapter], tmp_path: Path
) -> None:
    sandbox.configure(batch_rate_429=1.0, retry_after_s=0.5)
    recorder = SleepRecorder()
    adapter = adapters("anthropic", sleep=recorder)
    with pytest.raises(RateLimited) as info:
        create(adapter, batch_file(tmp_path, "anthropic", 2))
    assert info.value.retryable and info.value.retry_after_s == 0.5
    assert len(recorder.waits) == FAST.max_tries - 1
    assert str(info.value).startswith("anthropic POST /v1/messages/batches -> 429")


def test_stuck_finalizing_is_not_terminal(
    sandbox: SandboxServer, adapters: Callable[..., BatchAdapter], tmp_path: Path
) -> None:
    sandbox.configure(batch_stuck_finalizing=True)
    adapter = adapters("openai")
    job = create(adapter, batch_file(tmp_path, "openai", 3))
    deadline = time.monotonic() + 5
    while (job := adapter.retrieve(job.batch_id)).status is not BatchStatus.FINALIZING:
        assert time.monotonic() < deadline and not job.terminal
        time.sleep(0.02)
    assert not job.terminal and job.output_ref is None
    assert list(adapter.results(job)) == []
    with pytest.raises(ProviderError, match="cancel it and wait"):
        adapter.delete_inputs_outputs(job)


def test_model_not_served_is_refused_before_any_call(
    sandbox: SandboxServer, adapters: Callable[..., BatchAdapter], tmp_path: Path
) -> None:
    cap = CAPS["openai"].model_copy(update={"models": (CHAT_MODEL,)})
    adapter = adapters("openai", cap)
    with pytest.raises(ProviderError, match=r"'openai' does not serve model 'gpt-4o'") as info:
        adapter.create(
            batch_file(tmp_path, "openai", 2), endpoint=ENDPOINT["openai"], model="gpt-4o"
        )
    assert not info.value.retryable
    anthropic_cap = CAPS["anthropic"].model_copy(update={"models": (CLAUDE,)})
    anthropic = adapters("anthropic", anthropic_cap)
    lines = [messages_line(0), messages_line(1)]
    lines[1]["body"]["model"] = "claude-opus-4"
    path = write_jsonl(tmp_path / "mixed.jsonl", lines)
    with pytest.raises(ProviderError, match=r"'anthropic' does not serve model 'claude-opus-4'"):
        create(anthropic, path)
    assert sandbox.stats()["total_calls"] == 0


def test_endpoint_window_and_caps_are_checked_before_any_call(
    sandbox: SandboxServer, adapters: Callable[..., BatchAdapter], tmp_path: Path
) -> None:
    path = batch_file(tmp_path, "openai", 3)
    openai = adapters("openai")
    with pytest.raises(ProviderError, match="no batch endpoint '/v1/messages'"):
        openai.create(path, endpoint="/v1/messages", model=CHAT_MODEL)
    with pytest.raises(ProviderError, match="no completion window '48h'"):
        openai.create(path, endpoint=ENDPOINT["openai"], model=CHAT_MODEL, window="48h")
    with pytest.raises(InvalidRequest, match="metadata: 17 pairs"):
        create(openai, path, metadata={f"k{i}": "v" for i in range(17)})
    small = adapters("openai", CAPS["openai"].model_copy(update={"max_lines": 2}))
    with pytest.raises(InvalidRequest, match="3 lines, over max_lines 2"):
        create(small, path)
    tight = adapters(
        "anthropic",
        CAPS["anthropic"].model_copy(update={"max_bytes": 10_000, "max_line_bytes": 100}),
    )
    with pytest.raises(MalformedInput, match="over max_line_bytes 100") as info:
        create(tight, batch_file(tmp_path, "anthropic", 2, "a.jsonl"))
    assert info.value.line == 1
    with pytest.raises(InvalidRequest, match=r"jsonl_path: .*nope\.jsonl is not a readable file"):
        create(openai, tmp_path / "nope.jsonl")
    with pytest.raises(InvalidRequest, match="holds no request lines"):
        create(openai, write_jsonl(tmp_path / "empty.jsonl", ["", "  "]))
    assert sandbox.stats()["total_calls"] == 0


def test_missing_api_key_names_the_variable(sandbox: SandboxServer) -> None:
    cap = CAPS["anthropic"]
    with pytest.raises(ConfigError, match="ANTHROPIC_API_KEY"):
        account_for(cap, {"ANTHROPIC_BASE_URL": sandbox.anthropic_base_url})
    groq = load_providers(ROOT / "config" / "providers.toml", {"GROQ_API_KEY": "x"})["groq"]
    with pytest.raises(ConfigError, match="GROQ_API_KEY"):
        account_for(groq, {"OPENAI_API_KEY": KEY})


def test_adapter_refuses_a_mismatched_account(sandbox: SandboxServer) -> None:
    account = account_for(CAPS["anthropic"], {"ANTHROPIC_API_KEY": KEY})
    with pytest.raises(ConfigError, match="batch_adapter_for"):
        OpenAIBatchAdapter(account, CAPS["openai"])
    adapter = batch_adapter_for(account, CAPS["anthropic"])
    assert type(adapter) is AnthropicBatchAdapter and KEY not in repr(adapter)
    adapter.close()


def test_no_key_or_prompt_in_errors_or_logs(
    sandbox: SandboxServer,
    adapters: Callable[..., BatchAdapter],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    sandbox.configure(batch_rate_429=1.0, retry_after_s=0.0)
    line = messages_line(0)
    line["body"]["messages"][0]["content"] = PROMPT_SECRET
    path = write_jsonl(tmp_path / "secret.jsonl", [line])
    errors: list[ProviderError] = []
    for protocol in ("openai", "anthropic"):
        with pytest.raises(ProviderError) as info:
            adapters(protocol).create(
                path if protocol == "anthropic" else batch_file(tmp_path, "openai", 1),
                endpoint=ENDPOINT[protocol],
                model=MODEL[protocol],
            )
        errors.append(info.value)
    with pytest.raises(ProviderError) as missing:
        adapters("openai").retrieve("batch_nope")
    errors.append(missing.value)
    texts = [str(e) for e in errors] + [repr(e) for e in errors]
    texts += [n for e in errors for n in getattr(e, "__notes__", [])]
    texts += [r.getMessage() for r in caplog.records] + [repr(r.__dict__) for r in caplog.records]
    assert len(caplog.records) >= 6
    for text in texts:
        assert KEY not in text and PROMPT_SECRET not in text


# -- a scripted server: dropped connections, lost replies, compatible shapes -----------------


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes


@dataclass
class Reply:
    status: int = 200
    body: bytes = b"{}"
    headers: dict[str, str] = field(default_factory=lambda: {"content-type": "application/json"})
    cut_at: int | None = None
    drop: bool = False


def reply_json(obj: object, status: int = 200, **headers: str) -> Reply:
    return Reply(status, json.dumps(obj).encode(), {"content-type": "application/json", **headers})


class Wire:
    """A loopback HTTP/1.1 server answering with ``route(seen)``; it can cut a body short or
    drop the connection before replying, which the sandbox (behind uvicorn) cannot do."""

    def __init__(self, route: Callable[[Seen], Reply]) -> None:
        self.seen: list[Seen] = []
        wire = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                length = int(self.headers.get("content-length", 0))
                parts = urlsplit(self.path)
                seen = Seen(
                    self.command,
                    parts.path,
                    parse_qs(parts.query),
                    {k.lower(): v for k, v in self.headers.items()},
                    self.rfile.read(length),
                )
                wire.seen.append(seen)
                reply = route(seen)
                if reply.drop:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.send_response(reply.status)
                for name, value in {
                    "content-length": str(len(reply.body)),
                    **reply.headers,
                }.items():
                    self.send_header(name, value)
                self.end_headers()
                if reply.cut_at is None:
                    self.wfile.write(reply.body)
                    return
                self.wfile.write(reply.body[: reply.cut_at])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)

            do_GET = do_POST = do_DELETE = _serve

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    def paths(self, method: str | None = None) -> list[str]:
        return [s.path for s in self.seen if method is None or s.method == method]


@pytest.fixture
def wire() -> Iterator[Callable[[Callable[[Seen], Reply]], Wire]]:
    started: list[Wire] = []

    def start(route: Callable[[Seen], Reply]) -> Wire:
        server = Wire(route)
        server.thread.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.server.shutdown()
        server.server.server_close()
        server.thread.join()


def openai_output_lines(count: int) -> bytes:
    return b"".join(
        json.dumps(
            {
                "id": f"batch_req_{i}",
                "custom_id": f"req-{i}",
                "response": {"status_code": 200, "request_id": f"r{i}", "body": {"n": i}},
                "error": None,
            }
        ).encode()
        + b"\n"
        for i in range(count)
    )


def anthropic_result_lines(count: int) -> bytes:
    return b"".join(
        json.dumps(
            {"custom_id": f"req-{i}", "result": {"type": "succeeded", "message": {"n": i}}}
        ).encode()
        + b"\n"
        for i in range(count)
    )


def _job(protocol: str, base: str) -> BatchJob:
    if protocol == "openai":
        return BatchJob(
            provider="openai",
            batch_id="batch_1",
            status=BatchStatus.COMPLETED,
            raw_status="completed",
            created_at=0,
            output_ref="file-out",
        )
    return BatchJob(
        provider="anthropic",
        batch_id="msgbatch_1",
        status=BatchStatus.COMPLETED,
        raw_status="ended",
        created_at=0,
        output_ref=f"{base}/v1/messages/batches/msgbatch_1/results",
    )


def _base(protocol: str, url: str) -> str:
    return url + "/v1" if protocol == "openai" else url


@pytest.mark.parametrize("protocol", ["openai", "anthropic"])
def test_download_broken_mid_body_restarts_without_duplicates(
    wire: Callable[[Callable[[Seen], Reply]], Wire], protocol: str
) -> None:
    content = (openai_output_lines if protocol == "openai" else anthropic_result_lines)(200)
    cuts = [len(content) // 3 + 7, 2 * len(content) // 3 + 11]

    def route(seen: Seen) -> Reply:
        cut = cuts.pop(0) if cuts else None
        return Reply(body=content, headers={"content-type": "application/binary"}, cut_at=cut)

    server = wire(route)
    recorder = SleepRecorder()
    with make_adapter(protocol, _base(protocol, server.url), sleep=recorder) as adapter:
        results = list(adapter.results(_job(protocol, server.url)))
    assert [r.custom_id for r in results] == [f"req-{i}" for i in range(200)]
    assert [r.body for r in results] == [{"n": i} for i in range(200)]
    assert len(server.seen) == 3 and len(recorder.waits) == 2
    assert server.seen[0].headers["accept"] == "application/binary"


def test_download_that_never_gets_further_gives_up(
    wire: Callable[[Callable[[Seen], Reply]], Wire],
) -> None:
    content = openai_output_lines(50)
    server = wire(lambda seen: Reply(body=content, cut_at=len(content) // 2))
    got: list[LineResult] = []
    with (
        make_adapter("openai", server.url + "/v1", sleep=SleepRecorder()) as adapter,
        pytest.raises(ProviderError, match="RemoteProtocolError") as info,
    ):
        for result in adapter.results(_job("openai", server.url)):
            got.append(result)
    assert info.value.retryable
    assert len(server.seen) == FAST.max_tries
    assert [r.custom_id for r in got] == [f"req-{i}" for i in range(len(got))]
    assert 0 < len(got) < 50
    assert f"download stopped after {len(got)} lines" in info.value.__notes__[-1]


def test_openai_reads_output_then_error_file(
    wire: Callable[[Callable[[Seen], Reply]], Wire],
) -> None:
    errors = [
        {
            "id": "batch_req_e1",
            "custom_id": "bad",
            "response": {
                "status_code": 400,
                "request_id": "r",
                "body": {
                    "error": {"message": "nope", "type": "invalid_request_error", "code": None}
                },
            },
            "error": None,
        },
        {
            "id": "e2",
            "custom_id": "late",
            "response": None,
            "error": {"code": "batch_expired", "message": "x"},
        },
        {
            "id": "e3",
            "custom_id": "slow",
            "response": None,
            "error": {"code": "request_timeout", "message": "t"},
        },
        {
            "id": "e4",
            "custom_id": "gone",
            "response": None,
            "error": {"code": "batch_cancelled", "message": "c"},
        },
        {
            "id": "e5",
            "custom_id": "busy",
            "response": {"status_code": 429, "body": {}},
            "error": None,
        },
    ]
    files = {
        "/v1/files/file-out/content": openai_output_lines(2),
        "/v1/files/file-err/content": b"\n".join(json.dumps(e).encode() for e in errors)
        + b"\nnot json\n",
    }
    server = wire(lambda seen: Reply(body=files[seen.path]))
    job = _job("openai", server.url).model_copy(update={"error_ref": "file-err"})
    with make_adapter("openai", server.url + "/v1") as adapter:
        results = {r.custom_id: r for r in adapter.results(job)}
    assert server.paths() == list(files)
    assert list(results)[:2] == ["req-0", "req-1"]
    bad = results["bad"]
    assert bad.status_code == 400 and bad.error is not None
    assert (bad.error.code, bad.error.message, bad.error.retryable) == (
        "invalid_request_error",
        "nope",
        False,
    )
    codes = {cid: results[cid].error for cid in ("late", "slow", "gone", "busy")}
    assert {cid: (e.code, e.retryable) for cid, e in codes.items() if e} == {
        "late": ("expired", True),
        "slow": ("request_timeout", True),
        "gone": ("cancelled", True),
        "busy": ("http_429", True),
    }


def test_anthropic_results_url_on_another_host_is_not_followed(
    wire: Callable[[Callable[[Seen], Reply]], Wire],
) -> None:
    server = wire(lambda seen: Reply(body=anthropic_result_lines(1)))
    job = _job("anthropic", "https://api.anthropic.com")
    with make_adapter("anthropic", server.url) as adapter:
        assert [r.custom_id for r in adapter.results(job)] == ["req-0"]
    assert server.paths() == ["/v1/messages/batches/msgbatch_1/results"]
    assert server.seen[0].headers["x-api-key"] == KEY


def test_anthropic_line_mapping(wire: Callable[[Callable[[Seen], Reply]], Wire]) -> None:
    def errored(kind: str) -> dict[str, Any]:
        return {
            "type": "errored",
            "error": {"type": "error", "error": {"type": kind, "message": kind}},
        }

    lines = [
        {"custom_id": "a", "result": errored("invalid_request_error")},
        {"custom_id": "b", "result": errored("overloaded_error")},
        {"custom_id": "c", "result": {"type": "canceled"}},
        {"custom_id": "d", "result": {"type": "expired"}},
        {"custom_id": "e", "result": {"type": "mystery"}},
    ]
    body = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    server = wire(lambda seen: Reply(body=body))
    with make_adapter("anthropic", server.url) as adapter:
        results = {r.custom_id: r for r in adapter.results(_job("anthropic", server.url))}
    assert sorted(results) == ["a", "b", "c", "d"]
    summary = {
        cid: (r.status_code, r.error.code, r.error.retryable)
        for cid, r in results.items()
        if r.error is not None
    }
    assert summary == {
        "a": (400, "invalid_request_error", False),
        "b": (529, "overloaded_error", True),
        "c": (None, "cancelled", True),
        "d": (None, "expired", True),
    }


def test_lost_create_reply_is_not_retried(
    wire: Callable[[Callable[[Seen], Reply]], Wire], tmp_path: Path
) -> None:
    def route(seen: Seen) -> Reply:
        if seen.path == "/v1/files":
            return reply_json({"id": "file-in", "object": "file"})
        return Reply(drop=True)

    server = wire(route)
    recorder = SleepRecorder()
    with (
        make_adapter("openai", server.url + "/v1", sleep=recorder) as adapter,
        pytest.raises(ProviderError) as info,
    ):
        create(adapter, batch_file(tmp_path, "openai", 2))
    assert info.value.retryable and info.value.status_code is None
    notes = " ".join(info.value.__notes__)
    assert "not idempotent" in notes and "find_orphan" in notes
    assert server.paths("POST") == ["/v1/files", "/v1/batches"]
    assert recorder.waits == []


def test_refused_create_deletes_its_upload(
    wire: Callable[[Callable[[Seen], Reply]], Wire], tmp_path: Path
) -> None:
    def route(seen: Seen) -> Reply:
        if seen.path == "/v1/files":
            return reply_json({"id": "file-in", "object": "file"})
        if seen.method == "DELETE":
            return reply_json({"id": "file-in", "deleted": True})
        return reply_json({"error": {"message": "out of range", "param": "temperature"}}, 400)

    server = wire(route)
    with (
        make_adapter("openai", server.url + "/v1") as adapter,
        pytest.raises(
            ProviderError, match=r"openai POST /batches -> 400: out of range \(param: temperature\)"
        ),
    ):
        create(adapter, batch_file(tmp_path, "openai", 2))
    assert server.paths() == ["/v1/files", "/v1/batches", "/v1/files/file-in"]


def test_wire_shapes_of_both_creates(
    wire: Callable[[Callable[[Seen], Reply]], Wire], tmp_path: Path
) -> None:
    batch = {"id": "b1", "status": "validating", "created_at": 1, "input_file_id": "file-in"}
    message_batch = {
        "id": "msgbatch_1",
        "processing_status": "in_progress",
        "request_counts": {"processing": 3},
        "created_at": "2024-08-20T18:37:24.100435Z",
    }

    def route(seen: Seen) -> Reply:
        if seen.path == "/v1/files":
            return reply_json({"id": "file-in"})
        return reply_json(batch if seen.path == "/v1/batches" else message_batch)

    server = wire(route)
    with make_adapter("openai", server.url + "/v1") as adapter:
        create(adapter, batch_file(tmp_path, "openai", 3), metadata={"k": "v"})
    upload, created = server.seen
    assert upload.headers["authorization"] == f"Bearer {KEY}"
    assert upload.headers["content-type"].startswith("multipart/form-data")
    assert b'name="purpose"\r\n\r\nbatch' in upload.body
    assert b'filename="in.jsonl"' in upload.body
    assert (tmp_path / "in.jsonl").read_bytes() in upload.body
    assert json.loads(created.body) == {
        "input_file_id": "file-in",
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
        "metadata": {"k": "v"},
    }
    with make_adapter("anthropic", server.url) as adapter:
        job = create(adapter, batch_file(tmp_path, "anthropic", 3, "m.jsonl"), metadata={"k": "v"})
    assert job.created_at == pytest.approx(1724179044.100435)
    sent = server.seen[-1]
    assert sent.headers["x-api-key"] == KEY and "transfer-encoding" not in sent.headers
    assert int(sent.headers["content-length"]) == len(sent.body)
    assert json.loads(sent.body) == {
        "requests": [
            {"custom_id": f"req-{i}", "params": messages_line(i)["body"]} for i in range(3)
        ]
    }


def test_compatible_provider_shapes(wire: Callable[[Callable[[Seen], Reply]], Wire]) -> None:
    together_job = {
        "id": "3f0c",
        "status": "CANCELING",
        "created_at": "2025-01-02T03:04:05Z",
        "job_deadline": "2025-01-03T03:04:05Z",
        "output_file_id": "",
        "error": "",
    }
    groq_pages = {
        None: {
            "data": [
                {
                    "id": "g2",
                    "status": "failed",
                    "created_at": 20,
                    "errors": [{"code": "invalid_method", "message": "m", "line": 3}],
                }
            ],
            "paging": {"next_cursor": "c2"},
        },
        "c2": {
            "data": [{"id": "g1", "status": "completed", "created_at": 10, "error_file_id": ""}],
            "paging": {},
        },
    }

    def route(seen: Seen) -> Reply:
        if seen.path.startswith("/together"):
            if seen.path.endswith("/cancel"):
                return reply_json({"job": together_job, "warning": "w"})
            return reply_json([together_job])
        return reply_json(groq_pages[seen.query.get("cursor", [None])[0]])

    server = wire(route)
    with make_adapter("openai", server.url + "/together/v1") as together:
        job = together.cancel("3f0c")
        assert (job.status, job.raw_status) == (BatchStatus.CANCELLING, "CANCELING")
        assert job.created_at == 1735787045.0 and job.expires_at == 1735873445.0
        assert job.output_ref is None and job.validation_errors == []
        assert [j.batch_id for j in together.list()] == ["3f0c"]
    with make_adapter("openai", server.url + "/groq/v1") as groq:
        jobs = list(groq.list(limit=1))
    assert [j.batch_id for j in jobs] == ["g2", "g1"]
    assert jobs[0].validation_errors[0].line == 3 and jobs[0].status is BatchStatus.FAILED
    assert jobs[1].error_ref is None


# -- the input file writer: a planned batch reaches the provider byte for byte as planned ------


def test_openai_input_is_byte_exact_and_parses() -> None:
    items = [
        claimed(
            0,
            body={
                "model": "gpt-4o-mini",
                "messages": [{"role": "user", "content": 'héllo ✓ "q"\n'}],
            },
        ),
        claimed(1),
        claimed(2, endpoint=Endpoint.EMBEDDINGS, model="e"),
    ]
    for batch in plan(items).batches:
        data = jsonl_of(batch, items)
        assert len(data) == batch.estimated_bytes
        assert data.endswith(b"\n") and data.count(b"\n") == batch.line_count
        parsed = parse_batch_lines(data.decode().splitlines(), source="planned.jsonl")
        by_id = {c.id: c.request for c in items}
        for line in parsed:
            assert line.url == batch.endpoint.value
            assert line.method == "POST"
            assert line.body == by_id[line.custom_id].body


def test_anthropic_input_lines_are_the_create_items() -> None:
    items = [
        claimed(i, lane="bulk_x-1", endpoint=Endpoint.MESSAGES, model=f"claude-{i % 2}")
        for i in range(5)
    ]
    (batch,) = plan(items).batches
    fh = io.BytesIO()
    written = AnthropicBatchAdapter.write_input(batch, lookup_of(items), fh)
    assert written == len(fh.getvalue()) == batch.estimated_bytes - file_overhead("anthropic")
    entries = [json.loads(line) for line in fh.getvalue().splitlines()]
    assert len(entries) == batch.line_count
    for entry in entries:
        assert set(entry) == {"custom_id", "params"}
        (request_id,) = batch.fanout[entry["custom_id"]]
        assert entry["custom_id"] == anthropic_custom_id(request_id)
        assert entry["params"] == lookup_of(items)(request_id).body


def test_writers_refuse_the_other_protocol() -> None:
    items = [claimed(1, endpoint=Endpoint.MESSAGES), claimed(2)]
    batches = {b.protocol: b for b in plan(items).batches}
    lookup = lookup_of(items)
    with pytest.raises(ValueError, match="not openai"):
        OpenAIBatchAdapter.write_input(batches["anthropic"], lookup, io.BytesIO())
    with pytest.raises(ValueError, match="not anthropic"):
        AnthropicBatchAdapter.write_input(batches["openai"], lookup, io.BytesIO())


@pytest.mark.parametrize("protocol", ["openai", "anthropic"])
def test_planned_batch_is_sent_with_the_planned_bytes(
    wire: Callable[[Callable[[Seen], Reply]], Wire], tmp_path: Path, protocol: str
) -> None:
    """What the provider receives is ``estimated_bytes`` long: the file, or the create body."""
    endpoint = Endpoint(ENDPOINT[protocol])
    items = [
        claimed(i, endpoint=endpoint, model=MODEL[protocol], body=LINE[protocol](i)["body"])
        for i in range(4)
    ]
    (batch,) = plan(items).batches
    path = tmp_path / "planned.jsonl"
    with path.open("wb") as fh:
        batch_adapter_class(protocol).write_input(batch, lookup_of(items), fh)
    created = {"id": "b1", "status": "validating", "created_at": 1, "input_file_id": "file-in"}
    message_batch = {"id": "msgbatch_1", "processing_status": "in_progress", "created_at": 1}

    def route(seen: Seen) -> Reply:
        if seen.path == "/v1/files":
            return reply_json({"id": "file-in"})
        return reply_json(created if seen.path == "/v1/batches" else message_batch)

    server = wire(route)
    with make_adapter(protocol, _base(protocol, server.url)) as adapter:
        create(adapter, path)
    if protocol == "openai":
        data = path.read_bytes()
        assert len(data) == batch.estimated_bytes and data in server.seen[0].body
        return
    sent = server.seen[-1].body
    assert len(sent) == batch.estimated_bytes
    assert json.loads(sent) == {
        "requests": [
            {"custom_id": cid, "params": lookup_of(items)(ids[0]).body}
            for cid, ids in batch.fanout.items()
        ]
    }
