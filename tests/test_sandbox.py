"""The sandbox provider, through the official SDKs and raw HTTP on loopback."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest

from routing.sandbox import (
    SANDBOX_FINGERPRINT,
    InvalidBody,
    Knobs,
    answer_tag,
    embedding_for,
    estimate_tokens,
    expected_embeddings,
    expected_reply,
    last_message_text,
    response_text,
    text_of,
)
from routing.sandbox.answers import decode_base64, encode_base64, respond, validate_body
from routing.sandbox.server import SandboxServer
from routing.sandbox.state import SandboxState

CHAT = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "what is 2+2?"},
]


@pytest.fixture(scope="module")
def srv() -> Iterator[SandboxServer]:
    with SandboxServer() as server:
        yield server


@pytest.fixture(autouse=True)
def clean(request: pytest.FixtureRequest) -> None:
    if "srv" in request.fixturenames:
        server: SandboxServer = request.getfixturevalue("srv")
        server.configure(**Knobs().model_dump())
        server.reset()


@pytest.fixture
def oai(srv: SandboxServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=srv.openai_base_url, api_key="sk-sandbox", max_retries=0) as c:
        yield c


@pytest.fixture
def ant(srv: SandboxServer) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(
        base_url=srv.anthropic_base_url, api_key="sk-ant-sandbox", max_retries=0
    ) as c:
        yield c


@pytest.fixture
def http(srv: SandboxServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=srv.url, headers={"authorization": "Bearer sk-sandbox"}) as c:
        yield c


def chat_body(text: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}], **extra}


# --- pure helpers ---------------------------------------------------------------------------


def test_answers_import_without_http_stack() -> None:
    code = (
        "import sys, routing.sandbox, routing.sandbox.answers, routing.sandbox.state; "
        "assert not {'starlette', 'uvicorn'} & set(sys.modules), sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_text_of_and_last_message() -> None:
    parts = [
        {"type": "text", "text": "a"},
        {"type": "image_url", "image_url": {"url": "x"}},
        {"type": "input_text", "text": "b"},
        {"type": "output_text", "text": "c"},
    ]
    assert text_of("plain") == "plain"
    assert text_of(parts) == "a\nb\nc"
    assert text_of(None) == ""
    assert last_message_text("/v1/chat/completions", {"messages": CHAT}) == "what is 2+2?"
    assert last_message_text("/v1/messages", {"messages": [{"role": "user", "content": parts}]})
    assert last_message_text("/v1/responses", {"input": "just text"}) == "just text"
    items = [
        {"role": "user", "content": "first"},
        {"role": "user", "content": [{"type": "input_text", "text": "second"}]},
    ]
    assert last_message_text("/v1/responses", {"input": items}) == "second"


def test_answer_tag_and_reply() -> None:
    assert answer_tag("hello") == "2cf24dba5fb0a30e"
    body = chat_body("hello")
    assert (
        expected_reply("/v1/chat/completions", body)
        == "2cf24dba5fb0a30e sandbox reply from gpt-4o-mini"
    )
    assert estimate_tokens("") == 1
    assert estimate_tokens("abcdefgh") == 3


def test_embedding_for_is_a_deterministic_unit_vector() -> None:
    v = embedding_for("hello")
    assert len(v) == 8
    assert math.isclose(math.fsum(x * x for x in v), 1.0, rel_tol=1e-6)
    assert v == embedding_for("hello")
    assert v != embedding_for("hullo")
    assert len(embedding_for([1, 2, 3], 16)) == 16
    assert decode_base64(encode_base64(v)) == v


def test_validate_body_names_the_field() -> None:
    cases = [
        ("/v1/chat/completions", {"messages": CHAT}, "model"),
        ("/v1/chat/completions", {"model": "m", "messages": []}, "messages"),
        ("/v1/chat/completions", {"model": "m", "messages": CHAT, "stream": True}, "stream"),
        ("/v1/messages", {"model": "m", "messages": CHAT}, "max_tokens"),
        ("/v1/responses", {"model": "m"}, "input"),
        ("/v1/embeddings", {"model": "m", "input": []}, "input"),
        ("/v1/embeddings", {"model": "m", "input": "x", "dimensions": 0}, "dimensions"),
    ]
    for endpoint, body, field in cases:
        with pytest.raises(InvalidBody) as info:
            validate_body(endpoint, body)
        assert info.value.field == field


def test_seeded_faults_repeat() -> None:
    state = SandboxState(Knobs(rate_429=0.3, rate_500=0.3, seed=7))

    def run() -> list[str | None]:
        return [state.choose_fault("/v1/embeddings", {"i": i}, {}) for i in range(40)]

    first = run()
    state.reset()
    assert run() == first
    assert {"429", "500", None} <= set(first)


# --- OpenAI SDK -----------------------------------------------------------------------------


def test_chat_completion(oai: openai.OpenAI) -> None:
    raw = oai.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=CHAT)  # type: ignore[arg-type]
    assert raw.headers["x-mixbatch-sandbox"] == "1"
    done = raw.parse()
    text = done.choices[0].message.content
    assert text == f"{answer_tag('what is 2+2?')} sandbox reply from gpt-4o-mini"
    assert done.system_fingerprint == SANDBOX_FINGERPRINT
    assert done.choices[0].finish_reason == "stop"
    assert done.usage is not None
    assert done.usage.prompt_tokens > 0 and done.usage.completion_tokens > 0
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens


def test_responses(oai: openai.OpenAI) -> None:
    done = oai.responses.create(model="gpt-4.1-mini", input="tell me a joke")
    assert done.id.startswith("resp_")
    assert done.status == "completed"
    assert done.output_text.startswith(answer_tag("tell me a joke"))
    assert done.usage is not None and done.usage.total_tokens > 0
    items = [
        {"role": "user", "content": "first"},
        {"role": "user", "content": [{"type": "input_text", "text": "second"}]},
    ]
    done = oai.responses.create(model="gpt-4.1-mini", input=items)  # type: ignore[arg-type]
    assert done.output_text == expected_reply(
        "/v1/responses", {"model": "gpt-4.1-mini", "input": items}
    )


def test_embeddings(oai: openai.OpenAI) -> None:
    one = oai.embeddings.create(model="text-embedding-3-small", input="alpha")
    assert one.data[0].embedding == embedding_for("alpha")
    assert one.usage.prompt_tokens > 0
    many = oai.embeddings.create(
        model="text-embedding-3-small", input=["alpha", "beta", "gamma"], dimensions=16
    )
    vectors = [d.embedding for d in many.data]
    assert [d.index for d in many.data] == [0, 1, 2]
    assert all(len(v) == 16 for v in vectors)
    assert all(math.isclose(math.fsum(x * x for x in v), 1.0, rel_tol=1e-6) for v in vectors)
    assert len({tuple(v) for v in vectors}) == 3
    again = oai.embeddings.create(
        model="text-embedding-3-small",
        input=["alpha", "beta", "gamma"],
        dimensions=16,
        encoding_format="float",
    )
    assert [d.embedding for d in again.data] == vectors
    body = {"model": "m", "input": ["alpha", "beta", "gamma"], "dimensions": 16}
    assert vectors == expected_embeddings(body)


def test_embeddings_token_inputs(http: httpx.Client) -> None:
    single = http.post("/v1/embeddings", json={"model": "m", "input": [1, 2, 3]}).json()
    assert [d["embedding"] for d in single["data"]] == [embedding_for([1, 2, 3])]
    double = http.post("/v1/embeddings", json={"model": "m", "input": [[1, 2], [3]]}).json()
    assert [d["embedding"] for d in double["data"]] == [embedding_for([1, 2]), embedding_for([3])]
    assert double["usage"] == {"prompt_tokens": 3, "total_tokens": 3}


# --- Anthropic SDK --------------------------------------------------------------------------


def test_messages(ant: anthropic.Anthropic) -> None:
    done = ant.messages.create(
        model="claude-sandbox",
        max_tokens=64,
        system="be brief",
        messages=[{"role": "user", "content": [{"type": "text", "text": "hi there"}]}],
    )
    assert done.id.startswith("msg_")
    assert done.role == "assistant" and done.stop_reason == "end_turn"
    block = done.content[0]
    assert isinstance(block, anthropic.types.TextBlock)
    assert block.text == f"{answer_tag('hi there')} sandbox reply from claude-sandbox"
    assert done.usage.input_tokens > 0 and done.usage.output_tokens > 0


def test_messages_errors_in_anthropic_shape(
    ant: anthropic.Anthropic, srv: SandboxServer, http: httpx.Client
) -> None:
    missing = http.post("/v1/messages", json=chat_body())
    assert missing.status_code == 400
    assert missing.json() == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "max_tokens: Field required"},
    }
    srv.configure(rate_429=1.0, retry_after_s=3)
    with pytest.raises(anthropic.RateLimitError) as limited:
        ant.messages.create(model="c", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert limited.value.response.headers["retry-after"] == "3"
    srv.configure(rate_429=0.0)
    with pytest.raises(anthropic.OverloadedError):
        ant.messages.create(
            model="c",
            max_tokens=5,
            messages=[{"role": "user", "content": "x"}],
            extra_headers={"x-sandbox-fault": "529"},
        )


# --- faults ---------------------------------------------------------------------------------


def test_rate_limit_with_retry_after(oai: openai.OpenAI, srv: SandboxServer) -> None:
    srv.configure(rate_429=1.0, retry_after_s=7)
    with pytest.raises(openai.RateLimitError) as info:
        oai.chat.completions.create(model="m", messages=CHAT)  # type: ignore[arg-type]
    assert info.value.response.headers["retry-after"] == "7"
    assert info.value.response.headers["x-mixbatch-sandbox"] == "1"
    assert info.value.code == "rate_limit_exceeded"
    assert srv.stats()["faults_by_kind"] == {"429": 1}


def test_server_error(oai: openai.OpenAI, srv: SandboxServer) -> None:
    with pytest.raises(openai.InternalServerError):
        oai.embeddings.create(model="m", input="x", extra_headers={"x-sandbox-fault": "500"})
    srv.configure(rate_500=1.0)
    with pytest.raises(openai.InternalServerError):
        oai.embeddings.create(model="m", input="x")
    assert srv.stats()["faults_by_kind"] == {"500": 2}


def test_timeout(srv: SandboxServer) -> None:
    srv.configure(rate_timeout=1.0, hang_s=2.0)
    with (
        openai.OpenAI(
            base_url=srv.openai_base_url, api_key="sk-sandbox", max_retries=0, timeout=0.5
        ) as client,
        pytest.raises(openai.APITimeoutError),
    ):
        client.chat.completions.create(model="m", messages=CHAT)  # type: ignore[arg-type]
    assert srv.stats()["faults_by_kind"] == {"timeout": 1}


def test_hang_ends_with_an_answer(http: httpx.Client, srv: SandboxServer) -> None:
    srv.configure(hang_s=0.3)
    started = time.monotonic()
    reply = http.post(
        "/v1/chat/completions", json=chat_body(), headers={"x-sandbox-fault": "timeout"}
    )
    assert reply.status_code == 200
    assert time.monotonic() - started >= 0.3


def test_latency(http: httpx.Client, srv: SandboxServer) -> None:
    srv.configure(latency_ms=300)
    started = time.monotonic()
    assert http.post("/v1/embeddings", json={"model": "m", "input": "x"}).status_code == 200
    assert time.monotonic() - started >= 0.3
    started = time.monotonic()
    fast = http.post(
        "/v1/embeddings", json={"model": "m", "input": "x"}, headers={"x-sandbox-latency-ms": "0"}
    )
    assert fast.status_code == 200
    assert time.monotonic() - started < 0.3


def test_sleeps_do_not_block_other_requests(srv: SandboxServer) -> None:
    async def timed(client: httpx.AsyncClient, latency_ms: int) -> float:
        headers = {"x-sandbox-latency-ms": str(latency_ms)}
        response = await client.post(
            "/v1/embeddings", json={"model": "m", "input": "x"}, headers=headers
        )
        assert response.status_code == 200
        return time.monotonic()

    async def both() -> tuple[float, float]:
        async with httpx.AsyncClient(base_url=srv.url, headers={"x-api-key": "k"}) as client:
            slow, fast = await asyncio.gather(timed(client, 600), timed(client, 0))
            return slow, fast

    started = time.monotonic()
    slow_done, fast_done = asyncio.run(both())
    assert fast_done - started < 0.4 < slow_done - started


def test_fail_first_header(http: httpx.Client, srv: SandboxServer) -> None:
    headers = {"x-sandbox-fail-first": "2"}
    body = chat_body("retry me")
    statuses = [
        http.post("/v1/chat/completions", json=body, headers=headers).status_code for _ in range(3)
    ]
    assert statuses == [429, 429, 200]
    other = http.post("/v1/chat/completions", json=chat_body("other"), headers=headers)
    assert other.status_code == 429
    headers = {"x-sandbox-fail-first": "1", "x-sandbox-fault": "500"}
    statuses = [
        http.post("/v1/chat/completions", json=chat_body("five"), headers=headers).status_code
        for _ in range(2)
    ]
    assert statuses == [500, 200]


def test_fail_first_knob_lets_sdk_retries_succeed(srv: SandboxServer) -> None:
    srv.configure(fail_first=2, retry_after_s=0.01)
    with openai.OpenAI(base_url=srv.openai_base_url, api_key="sk", max_retries=2) as client:
        done = client.chat.completions.create(model="m", messages=CHAT)  # type: ignore[arg-type]
    assert done.choices[0].message.content == expected_reply(
        "/v1/chat/completions", {"model": "m", "messages": CHAT}
    )
    stats = srv.stats()
    assert stats["calls_by_endpoint"] == {"/v1/chat/completions": 3}
    assert stats["faults_by_kind"] == {"429": 2}


def test_bad_fault_header(http: httpx.Client) -> None:
    reply = http.post(
        "/v1/embeddings", json={"model": "m", "input": "x"}, headers={"x-sandbox-fault": "boom"}
    )
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == "x-sandbox-fault"


# --- validation, auth and admin -------------------------------------------------------------


def test_bad_requests_name_the_field(oai: openai.OpenAI, http: httpx.Client) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model="m", messages=[])
    assert info.value.param == "messages"
    cases = [
        ("/v1/chat/completions", {"messages": CHAT}, "model"),
        ("/v1/responses", {"model": "m"}, "input"),
        ("/v1/embeddings", {"model": "m"}, "input"),
    ]
    for path, body, field in cases:
        reply = http.post(path, json=body)
        assert reply.status_code == 400
        error = reply.json()["error"]
        assert error["param"] == field and field in error["message"]
        assert error["type"] == "invalid_request_error"
    streamed = http.post("/v1/chat/completions", json=chat_body(stream=True))
    assert streamed.status_code == 400
    assert streamed.json()["error"]["message"] == "streaming is not supported by the sandbox"
    not_json = http.post("/v1/chat/completions", content=b"{nope")
    assert not_json.status_code == 400


def test_missing_api_key(srv: SandboxServer) -> None:
    with httpx.Client(base_url=srv.url) as bare:
        openai_shaped = bare.post("/v1/chat/completions", json=chat_body())
        anthropic_shaped = bare.post("/v1/messages", json=chat_body(max_tokens=5))
        keyed = bare.post("/v1/messages", json=chat_body(max_tokens=5), headers={"x-api-key": "k"})
    assert openai_shaped.status_code == 401
    assert set(openai_shaped.json()["error"]) == {"message", "type", "param", "code"}
    assert anthropic_shaped.status_code == 401
    assert anthropic_shaped.json()["error"]["type"] == "authentication_error"
    assert anthropic_shaped.headers["x-mixbatch-sandbox"] == "1"
    assert keyed.status_code == 200
    assert response_text("/v1/messages", keyed.json()) == expected_reply(
        "/v1/messages", chat_body(max_tokens=5)
    )


def test_unknown_path_is_provider_shaped(http: httpx.Client) -> None:
    reply = http.get("/v1/nothing-here")
    assert reply.status_code == 404
    assert reply.headers["x-mixbatch-sandbox"] == "1"
    assert "error" in reply.json()


def test_admin_knobs_stats_reset(http: httpx.Client, srv: SandboxServer) -> None:
    assert http.get("/sandbox/knobs").json() == Knobs().model_dump()
    updated = http.post("/sandbox/knobs", json={"rate_500": 0.25, "latency_ms": 5})
    assert updated.status_code == 200
    assert updated.json()["rate_500"] == 0.25
    assert srv.knobs.rate_500 == 0.25 and srv.knobs.latency_ms == 5
    for bad in ({"rate_429": 2}, {"no_such_knob": 1}, [1]):
        refused = http.post("/sandbox/knobs", json=bad)
        assert refused.status_code == 400, bad
    assert srv.knobs.rate_429 == 0
    srv.configure(rate_500=0.0)
    http.post("/v1/embeddings", json={"model": "m", "input": "x"})
    http.post(
        "/v1/embeddings", json={"model": "m", "input": "x"}, headers={"x-sandbox-fault": "429"}
    )
    stats = http.get("/sandbox/stats").json()
    assert stats["total_calls"] == 2
    assert stats["calls_by_endpoint"] == {"/v1/embeddings": 2}
    assert stats["faults_by_kind"] == {"429": 1}
    assert http.post("/sandbox/reset").json()["total_calls"] == 0
    assert srv.stats()["calls_by_endpoint"] == {}


def test_shared_builders_match_the_server(http: httpx.Client) -> None:
    body = chat_body("same answer offline")
    served = http.post("/v1/chat/completions", json=body).json()
    built = respond("/v1/chat/completions", body)
    assert response_text("/v1/chat/completions", served) == response_text(
        "/v1/chat/completions", built
    )
    assert json.loads(json.dumps(built))["system_fingerprint"] == SANDBOX_FINGERPRINT
