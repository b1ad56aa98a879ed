"""Realtime adapters over real HTTP on loopback: the sandbox provider, and a scripted server for
replies the sandbox never gives (echoed keys, HTML gateways, rate-limit headers)."""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from routing.decide.backoff import RetryPolicy
from routing.errors import ConfigError, ProviderError, ProviderTimeout, RateLimited
from routing.models import Endpoint
from routing.providers import (
    AnthropicAdapter,
    OpenAIAdapter,
    ProviderAccount,
    ProviderResponse,
    RealtimeAdapter,
    adapter_for,
    call_with_retries,
)
from routing.sandbox import Knobs, embedding_for, expected_reply, response_text
from routing.sandbox.server import SandboxServer
from routing.store.embedded import free_port

KEY = "sk-test-DO-NOT-LEAK-7f3a9c"
PROMPT_SECRET = "prompt-secret-b41d"
FAST = RetryPolicy(max_tries=4, base_s=0.05, cap_s=30.0, jitter=0.0)

CHAT_BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "what is 2+2?"}]}
RESPONSES_BODY = {"model": "gpt-4o-mini", "input": "name a colour"}
EMBED_BODY = {"model": "text-embedding-3-small", "input": ["alpha", "beta"]}
MESSAGES_BODY = {
    "model": "claude-3-5-haiku-latest",
    "max_tokens": 64,
    "messages": [{"role": "user", "content": "hello there"}],
}


@pytest.fixture(scope="module")
def sandbox() -> Iterator[SandboxServer]:
    with SandboxServer() as server:
        yield server


@pytest.fixture(autouse=True)
def _fresh_knobs(request: pytest.FixtureRequest) -> None:
    if "sandbox" in request.fixturenames:
        server: SandboxServer = request.getfixturevalue("sandbox")
        server.configure(**Knobs().model_dump())
        server.reset()


def _openai(base_url: str, **kw: Any) -> ProviderAccount:
    return ProviderAccount(
        name="openai", kind="openai", base_url=base_url, api_key=SecretStr(KEY), **kw
    )


def _anthropic(base_url: str, **kw: Any) -> ProviderAccount:
    return ProviderAccount(
        name="anthropic", kind="anthropic", base_url=base_url, api_key=SecretStr(KEY), **kw
    )


@pytest.fixture
def oai(sandbox: SandboxServer) -> Iterator[RealtimeAdapter]:
    with adapter_for(_openai(sandbox.openai_base_url)) as adapter:
        yield adapter


@pytest.fixture
def faulty(sandbox: SandboxServer) -> Iterator[Callable[..., RealtimeAdapter]]:
    """An OpenAI adapter whose client sends the sandbox's fault headers on every call."""
    made: list[tuple[RealtimeAdapter, httpx.Client]] = []

    def make(timeout_s: float = 60.0, **headers: str) -> RealtimeAdapter:
        client = httpx.Client(headers={k.replace("_", "-"): v for k, v in headers.items()})
        adapter = adapter_for(_openai(sandbox.openai_base_url, timeout_s=timeout_s), client)
        made.append((adapter, client))
        return adapter

    yield make
    for adapter, client in made:
        adapter.close()
        client.close()


class SleepRecorder:
    """Stands in for ``time.sleep``: records the wait and moves a fake clock by it."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.waits: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.now += seconds

    def clock(self) -> float:
        return self.now

    def retry(
        self, adapter: RealtimeAdapter, body: dict[str, Any] = CHAT_BODY, **options: Any
    ) -> ProviderResponse:
        """``call_with_retries`` on chat with the fast policy, waiting on this recorder."""
        options.setdefault("budget_s", 60)
        return call_with_retries(
            adapter,
            Endpoint.CHAT,
            body,
            policy=FAST,
            sleep=self.sleep,
            clock=self.clock,
            **options,
        )


# -- happy paths against the sandbox ---------------------------------------------------------


@pytest.mark.parametrize(
    ("endpoint", "body"),
    [(Endpoint.CHAT, CHAT_BODY), (Endpoint.RESPONSES, RESPONSES_BODY)],
)
def test_openai_text_endpoints(oai: RealtimeAdapter, endpoint: Endpoint, body: dict) -> None:
    reply = oai.call(endpoint, body)
    assert reply.status_code == 200
    assert reply.provider == "openai"
    assert response_text(endpoint.value, reply.body) == expected_reply(endpoint.value, body)
    assert reply.provider_request_id and reply.provider_request_id.startswith("req_")
    assert reply.latency_s > 0


def test_openai_embeddings(oai: RealtimeAdapter) -> None:
    reply = oai.call("/v1/embeddings", EMBED_BODY)
    vectors = [item["embedding"] for item in reply.body["data"]]
    assert vectors == [embedding_for("alpha"), embedding_for("beta")]


def test_anthropic_messages(sandbox: SandboxServer) -> None:
    with adapter_for(_anthropic(sandbox.anthropic_base_url)) as adapter:
        assert isinstance(adapter, AnthropicAdapter)
        reply = adapter.call(Endpoint.MESSAGES, MESSAGES_BODY)
    assert reply.body["type"] == "message"
    assert response_text("/v1/messages", reply.body) == expected_reply(
        "/v1/messages", MESSAGES_BODY
    )
    assert reply.provider_request_id and reply.provider_request_id.startswith("req_")


def test_call_with_retries_returns_at_once_on_success(oai: RealtimeAdapter) -> None:
    rec = SleepRecorder()
    reply = rec.retry(oai, budget_s=10)
    assert reply.status_code == 200
    assert rec.waits == []


# -- faults and retries ----------------------------------------------------------------------


def test_429_maps_to_rate_limited_with_retry_after(
    sandbox: SandboxServer, faulty: Callable[..., RealtimeAdapter]
) -> None:
    sandbox.configure(retry_after_s=2.5)
    with pytest.raises(RateLimited) as info:
        faulty(x_sandbox_fault="429").call(Endpoint.CHAT, CHAT_BODY)
    err = info.value
    assert err.retryable and err.status_code == 429
    assert err.retry_after_s == 2.5
    assert err.provider_request_id and err.provider_request_id.startswith("req_")
    assert "Rate limit reached" in str(err)


def test_retry_after_is_honoured(
    sandbox: SandboxServer,
    faulty: Callable[..., RealtimeAdapter],
    caplog: pytest.LogCaptureFixture,
) -> None:
    sandbox.configure(retry_after_s=3)
    adapter = faulty(x_sandbox_fault="429", x_sandbox_fail_first="2")
    rec = SleepRecorder()
    caplog.set_level(logging.DEBUG)
    reply = rec.retry(adapter, rng=random.Random(1))
    assert reply.status_code == 200
    assert len(rec.waits) == 2
    assert all(3.0 <= w <= FAST.cap_s for w in rec.waits)
    retries = [r for r in caplog.records if r.name == "routing.providers.base"]
    assert [r.__dict__["attempt"] for r in retries] == [1, 2]
    for record, wait in zip(retries, rec.waits, strict=True):
        fields = record.__dict__
        assert fields["provider"] == "openai"
        assert fields["status_code"] == 429
        assert fields["delay_s"] == round(wait, 3)
        assert fields["provider_request_id"].startswith("req_")


def test_500_then_success(sandbox: SandboxServer, faulty: Callable[..., RealtimeAdapter]) -> None:
    adapter = faulty(x_sandbox_fault="500", x_sandbox_fail_first="1")
    with pytest.raises(ProviderError) as info:
        adapter.call(Endpoint.EMBEDDINGS, EMBED_BODY)
    assert info.value.retryable and info.value.status_code == 500
    assert not isinstance(info.value, RateLimited)

    rec = SleepRecorder()
    body = {**CHAT_BODY, "user": "second"}
    reply = rec.retry(adapter, body, budget_s=10)
    assert reply.status_code == 200
    assert rec.waits == [0.05]


@pytest.mark.parametrize("status", ["408", "409", "502", "503", "529"])
def test_transient_statuses_are_retryable(
    faulty: Callable[..., RealtimeAdapter], status: str
) -> None:
    with pytest.raises(ProviderError) as info:
        faulty(x_sandbox_fault=status).call(Endpoint.CHAT, CHAT_BODY)
    assert info.value.retryable
    assert info.value.status_code == int(status)


def test_timeout_maps_to_provider_timeout(
    sandbox: SandboxServer, faulty: Callable[..., RealtimeAdapter]
) -> None:
    sandbox.configure(hang_s=5)
    adapter = faulty(x_sandbox_fault="timeout")
    with pytest.raises(ProviderTimeout) as info:
        adapter.call(Endpoint.CHAT, CHAT_BODY, timeout_s=0.2)
    assert info.value.retryable
    assert "ReadTimeout after 0.2 s" in str(info.value)
    assert info.value.__cause__ is None


def test_try_timeouts_are_cut_to_the_budget(
    sandbox: SandboxServer, faulty: Callable[..., RealtimeAdapter]
) -> None:
    sandbox.configure(hang_s=5)
    adapter = faulty(timeout_s=60, x_sandbox_fault="timeout")
    rec = SleepRecorder()
    started = time.monotonic()
    with pytest.raises(ProviderTimeout) as info:
        call_with_retries(
            adapter, Endpoint.CHAT, CHAT_BODY, policy=FAST, budget_s=0.3, sleep=rec.sleep
        )
    assert 0.3 <= time.monotonic() - started < 1.5
    assert rec.waits == []
    assert "ReadTimeout after 0.3 s" in str(info.value)
    assert "would pass the 0.3 s budget" in info.value.__notes__[0]


def test_400_is_final_and_carries_the_providers_message(
    oai: RealtimeAdapter, caplog: pytest.LogCaptureFixture
) -> None:
    rec = SleepRecorder()
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ProviderError) as info:
        rec.retry(oai, {"model": "gpt-4o-mini"}, budget_s=10)
    err = info.value
    assert type(err) is ProviderError
    assert not err.retryable and err.status_code == 400
    assert "Missing required parameter: 'messages'." in str(err)
    assert str(err).startswith("openai POST /v1/chat/completions -> 400: ")
    assert isinstance(err.body, dict) and err.body["error"]["param"] == "messages"
    assert rec.waits == []
    assert not [r for r in caplog.records if r.name == "routing.providers.base"]


def test_anthropic_400_message(sandbox: SandboxServer) -> None:
    body = {k: v for k, v in MESSAGES_BODY.items() if k != "max_tokens"}
    with (
        adapter_for(_anthropic(sandbox.anthropic_base_url)) as adapter,
        pytest.raises(ProviderError, match="max_tokens: Field required") as info,
    ):
        adapter.call(Endpoint.MESSAGES, body)
    assert info.value.status_code == 400 and not info.value.retryable


def test_budget_exhaustion_raises_the_last_error(
    sandbox: SandboxServer, faulty: Callable[..., RealtimeAdapter]
) -> None:
    sandbox.configure(retry_after_s=10)
    rec = SleepRecorder()
    with pytest.raises(RateLimited) as info:
        rec.retry(faulty(x_sandbox_fault="429"), budget_s=5)
    assert rec.waits == []
    assert info.value.retry_after_s == 10
    assert "would pass the 5 s budget" in info.value.__notes__[0]
    assert sandbox.stats()["calls_by_endpoint"]["/v1/chat/completions"] == 1


def test_max_tries_bounds_the_calls(
    sandbox: SandboxServer, faulty: Callable[..., RealtimeAdapter]
) -> None:
    rec = SleepRecorder()
    with pytest.raises(ProviderError) as info:
        rec.retry(faulty(x_sandbox_fault="500"))
    assert info.value.status_code == 500
    assert rec.waits == [0.05, 0.1, 0.2]
    assert sandbox.stats()["calls_by_endpoint"]["/v1/chat/completions"] == 4


def test_no_key_or_body_in_errors_or_logs(
    sandbox: SandboxServer,
    faulty: Callable[..., RealtimeAdapter],
    caplog: pytest.LogCaptureFixture,
) -> None:
    sandbox.configure(retry_after_s=0, hang_s=5)
    caplog.set_level(logging.DEBUG)
    body = {**CHAT_BODY, "messages": [{"role": "user", "content": PROMPT_SECRET}]}
    errors: list[ProviderError] = []
    for fault in ("429", "500", "timeout"):
        with pytest.raises(ProviderError) as info:
            call_with_retries(
                faulty(timeout_s=0.2, x_sandbox_fault=fault),
                Endpoint.CHAT,
                body,
                policy=FAST,
                budget_s=5,
                sleep=lambda s: None,
            )
        errors.append(info.value)
    with pytest.raises(ProviderError) as bad:
        faulty().call(Endpoint.CHAT, {"model": "m", "messages": PROMPT_SECRET})
    errors.append(bad.value)
    assert len(caplog.records) >= 6
    texts = [str(e) for e in errors] + [repr(e) for e in errors]
    texts += [n for e in errors for n in getattr(e, "__notes__", [])]
    texts += [r.getMessage() for r in caplog.records]
    texts += [repr(r.__dict__) for r in caplog.records]
    for text in texts:
        assert KEY not in text
        assert PROMPT_SECRET not in text


# -- endpoints, accounts, factory ------------------------------------------------------------


def test_anthropic_refuses_openai_endpoints_without_a_request(sandbox: SandboxServer) -> None:
    with adapter_for(_anthropic(sandbox.anthropic_base_url)) as adapter:
        for endpoint in (Endpoint.CHAT, "/v1/embeddings", "/v1/nope"):
            with pytest.raises(ProviderError, match="no realtime endpoint") as info:
                adapter.call(endpoint, CHAT_BODY)
            assert not info.value.retryable
            assert str(endpoint) in str(info.value)
    assert sandbox.stats()["total_calls"] == 0


def test_openai_refuses_messages(oai: RealtimeAdapter) -> None:
    with pytest.raises(ProviderError, match=r"'/v1/messages'") as info:
        oai.call(Endpoint.MESSAGES, MESSAGES_BODY)
    assert not info.value.retryable


def test_adapter_for_picks_by_kind() -> None:
    with adapter_for(_openai("http://127.0.0.1:1/v1")) as a:
        assert type(a) is OpenAIAdapter
    with adapter_for(_anthropic("http://127.0.0.1:1")) as b:
        assert type(b) is AnthropicAdapter
    with pytest.raises(ConfigError, match="adapter_for"):
        OpenAIAdapter(_anthropic("http://127.0.0.1:1"))


def test_account_never_shows_its_key() -> None:
    account = _openai("https://api.openai.com/v1/")
    assert account.base_url == "https://api.openai.com/v1"
    for text in (repr(account), str(account), account.model_dump_json(), repr(adapter_repr())):
        assert KEY not in text
    with pytest.raises(ValueError, match="base_url"):
        _openai("api.openai.com/v1")


def adapter_repr() -> str:
    adapter = adapter_for(_openai("https://api.openai.com/v1"))
    try:
        return repr(adapter)
    finally:
        adapter.close()


def test_connect_error_is_retryable() -> None:
    with (
        adapter_for(_openai(f"http://127.0.0.1:{free_port()}/v1")) as adapter,
        pytest.raises(ProviderError, match="ConnectError") as info,
    ):
        adapter.call(Endpoint.CHAT, CHAT_BODY)
    assert info.value.retryable
    assert type(info.value) is ProviderError
    assert KEY not in str(info.value)


def test_shared_client_is_left_open(sandbox: SandboxServer) -> None:
    with httpx.Client() as client:
        with adapter_for(_openai(sandbox.openai_base_url), client) as adapter:
            adapter.call(Endpoint.CHAT, CHAT_BODY)
        assert not client.is_closed
        with adapter_for(_anthropic(sandbox.anthropic_base_url), client) as other:
            other.call(Endpoint.MESSAGES, MESSAGES_BODY)


# -- replies the sandbox never gives: a scripted server --------------------------------------

Reply = tuple[int, dict[str, str], bytes]


class Scripted:
    """A loopback HTTP server answering each POST with the next scripted reply."""

    def __init__(self) -> None:
        self.replies: list[Reply] = []
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        scripted = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", 0))
                scripted.requests.append(
                    (
                        self.path,
                        {k.lower(): v for k, v in self.headers.items()},
                        self.rfile.read(length),
                    )
                )
                status, headers, body = scripted.replies.pop(0)
                self.send_response(status)
                for name, value in {"content-length": str(len(body)), **headers}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    def reply(self, status: int, body: object, **headers: str) -> None:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        kind = "text/html" if isinstance(body, bytes) else "application/json"
        self.replies.append((status, {"content-type": kind, **headers}, raw))


@pytest.fixture
def scripted() -> Iterator[Scripted]:
    server = Scripted()
    server.thread.start()
    yield server
    server.server.shutdown()
    server.server.server_close()
    server.thread.join()


def test_requests_are_shaped_per_provider(scripted: Scripted) -> None:
    scripted.reply(200, {"id": "chatcmpl-1"}, **{"x-request-id": "req_o"})
    scripted.reply(200, {"id": "msg_1"}, **{"request-id": "req_a"})
    with adapter_for(_openai(scripted.url + "/v1")) as oai:
        assert oai.call(Endpoint.CHAT, CHAT_BODY).provider_request_id == "req_o"
    account = _anthropic(scripted.url, anthropic_version="2099-01-01")
    with adapter_for(account) as ant:
        assert ant.call(Endpoint.MESSAGES, MESSAGES_BODY).provider_request_id == "req_a"
    (o_path, o_headers, o_body), (a_path, a_headers, a_body) = scripted.requests
    assert o_path == "/v1/chat/completions"
    assert o_headers["authorization"] == f"Bearer {KEY}"
    assert "x-api-key" not in o_headers
    assert json.loads(o_body) == CHAT_BODY
    assert a_path == "/v1/messages"
    assert a_headers["x-api-key"] == KEY
    assert a_headers["anthropic-version"] == "2099-01-01"
    assert "authorization" not in a_headers
    assert json.loads(a_body) == MESSAGES_BODY


def test_no_key_means_no_auth_header(scripted: Scripted) -> None:
    scripted.reply(200, {"object": "list"})
    account = ProviderAccount(name="local", kind="openai", base_url=scripted.url + "/v1")
    with adapter_for(account) as adapter:
        adapter.call(Endpoint.EMBEDDINGS, EMBED_BODY)
    assert scripted.requests[0][0] == "/v1/embeddings"
    assert "authorization" not in scripted.requests[0][1]


def test_rate_limit_headers_are_kept(scripted: Scripted) -> None:
    scripted.reply(
        200,
        {"id": "x"},
        **{
            "x-ratelimit-remaining-requests": "99",
            "x-ratelimit-reset-tokens": "12ms",
            "anthropic-ratelimit-tokens-remaining": "5000",
            "openai-processing-ms": "7",
        },
    )
    with adapter_for(_openai(scripted.url + "/v1")) as adapter:
        reply = adapter.call(Endpoint.RESPONSES, RESPONSES_BODY)
    assert reply.rate_limit == {
        "x-ratelimit-remaining-requests": "99",
        "x-ratelimit-reset-tokens": "12ms",
        "anthropic-ratelimit-tokens-remaining": "5000",
    }


def test_an_echoed_key_is_redacted(scripted: Scripted) -> None:
    message = f"Incorrect API key provided: {KEY}. You can find your API key at ..."
    scripted.reply(401, {"error": {"message": message, "type": "invalid_request_error"}})
    with (
        adapter_for(_openai(scripted.url + "/v1")) as adapter,
        pytest.raises(ProviderError) as info,
    ):
        adapter.call(Endpoint.CHAT, CHAT_BODY)
    assert not info.value.retryable and info.value.status_code == 401
    assert KEY not in str(info.value)
    assert "Incorrect API key provided: ***." in str(info.value)


@pytest.mark.parametrize(
    ("status", "body", "headers", "retryable", "retry_after_s", "text"),
    [
        (502, b"<html>Bad Gateway</html>", {}, True, None, "<html>Bad Gateway</html>"),
        (503, {"message": "overloaded"}, {"retry-after": "4"}, True, 4.0, "overloaded"),
        (429, {"error": {"message": "slow"}}, {"retry-after-ms": "250"}, True, 0.25, "slow"),
        (500, {"detail": "nope"}, {"x-should-retry": "false"}, False, None, "nope"),
        (
            400,
            {"error": {"message": "bad", "param": "temperature"}},
            {},
            False,
            None,
            "bad (param: temperature)",
        ),
        (404, b"", {}, False, None, "Not Found"),
    ],
)
def test_error_replies_table(
    scripted: Scripted,
    status: int,
    body: object,
    headers: dict[str, str],
    retryable: bool,
    retry_after_s: float | None,
    text: str,
) -> None:
    scripted.reply(status, body, **headers)
    with (
        adapter_for(_openai(scripted.url + "/v1")) as adapter,
        pytest.raises(ProviderError) as info,
    ):
        adapter.call(Endpoint.CHAT, CHAT_BODY)
    err = info.value
    assert err.status_code == status
    assert err.retryable is retryable
    assert err.retry_after_s == retry_after_s
    assert str(err).endswith(f"-> {status}: {text}")
    assert isinstance(err, RateLimited) is (status == 429)


def test_a_2xx_that_is_not_a_json_object_is_an_error(scripted: Scripted) -> None:
    scripted.reply(200, [1, 2])
    with (
        adapter_for(_openai(scripted.url + "/v1")) as adapter,
        pytest.raises(ProviderError, match="not a JSON object") as info,
    ):
        adapter.call(Endpoint.CHAT, CHAT_BODY)
    assert not info.value.retryable
