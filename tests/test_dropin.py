"""``routing.dropin``: OpenAI and Anthropic SDK calls answered through a real mixbatch.

One stack for the module (its own embedded Redis, the sandbox provider over loopback HTTP, a
service worker and beat: ``tests.test_e2e.make_stack``). Urgent requests take the realtime
route and standard ones a provider batch (``FAST`` tells the route choice the sandbox's batches
take seconds), so both routes answer drop-in calls. The errors are the SDKs' own classes.

Calls that must stay unanswered (timeouts, a full lane, cancelling) use a namespace no worker
serves, on the same Redis.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from routing.client import AsyncClient, Client
from routing.dropin import CHAT as CHAT_ENDPOINT
from routing.dropin import MESSAGES as MESSAGES_ENDPOINT
from routing.dropin import Anthropic, AsyncAnthropic, AsyncOpenAI, OpenAI
from routing.dropin_core import Endpoint
from routing.models import ErrorInfo, LaneSpec, Result, Route, ServiceConfig
from routing.sandbox import Knobs, expected_embeddings, expected_reply
from routing.states import State
from routing.store.embedded import free_port
from tasks.cli.stack import LocalStack
from tests.test_e2e import make_stack

ROOT = Path(__file__).resolve().parent.parent
NS = "e2e"  # make_stack's namespace
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Summarise #1"}]}
CLAUDE = {
    "model": "claude-haiku-4-5",
    "max_tokens": 64,
    "messages": [{"role": "user", "content": "Summarise #2"}],
}
IDLE = ServiceConfig(
    lanes=(
        LaneSpec(name="idle", deadline_s=3600),
        LaneSpec(name="tiny", deadline_s=60, max_queued=1),
    )
)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    s = make_stack(tmp_path_factory.mktemp("dropin"), None, Knobs(latency_ms=5))  # type: ignore[arg-type]
    try:
        s.start_worker("service", concurrency=2)
        s.start_beat()
        s.wait_workers(["service"])
        yield s
    finally:
        s.stop()


@pytest.fixture
def mb(stack: LocalStack) -> Iterator[Client]:
    with Client(stack.url, namespace=NS) as client:
        yield client


@pytest.fixture
def idle(stack: LocalStack) -> Iterator[Client]:
    """A client on a namespace no worker serves: what it submits waits there."""
    namespace = f"idle{time.monotonic_ns()}"
    with Client(stack.url, namespace=namespace, config=IDLE) as client:
        yield client


def text_of_chat(completion: Any) -> str:
    return str(completion.choices[0].message.content)


def rid(answer: Any) -> str:
    """The mixbatch id an SDK answer carries as its ``_request_id``."""
    assert isinstance(answer._request_id, str)
    return answer._request_id


# -- answers: the SDK's own types, through both routes ------------------------------------------


def test_openai_chat_embeddings_and_responses(mb: Client) -> None:
    with OpenAI(lane="urgent", client=mb) as client:
        completion = client.chat.completions.create(**CHAT)
        assert isinstance(completion, openai.types.chat.ChatCompletion)
        assert text_of_chat(completion) == expected_reply("/v1/chat/completions", CHAT)
        assert rid(completion).startswith("urgent.")
        assert mb.result(rid(completion)).route is Route.REALTIME

        response = client.responses.create(model="gpt-4o-mini", input="Summarise #3")
        assert isinstance(response, openai.types.responses.Response)
        body = {"model": "gpt-4o-mini", "input": "Summarise #3"}
        assert response.output_text == expected_reply("/v1/responses", body)

        # The standard lane's deadline leaves room for a provider batch: the cheaper route.
        embedding = client.embeddings.create(
            model="text-embedding-3-small",
            input=["one", "two"],
            extra_body={"mixbatch": {"lane": "standard"}},
            timeout=120,
        )
        assert isinstance(embedding, openai.types.CreateEmbeddingResponse)
        want = expected_embeddings({"model": "text-embedding-3-small", "input": ["one", "two"]})
        for row, vector in zip(embedding.data, want, strict=True):
            assert row.embedding == pytest.approx(vector, abs=1e-6)
        assert mb.result(rid(embedding)).route is Route.BATCH


def test_anthropic_messages(mb: Client) -> None:
    with Anthropic(lane="urgent", client=mb, tenant="acme") as client:
        message = client.messages.create(**CLAUDE)
    assert isinstance(message, anthropic.types.Message)
    assert message.content[0].text == expected_reply("/v1/messages", CLAUDE)  # type: ignore[union-attr]
    status = mb.status(rid(message))
    assert (status.tenant, status.lane, status.state) in {
        ("acme", "urgent", State.DONE),
        ("acme", "urgent", State.DELIVERED),
    }


def test_async_clients_answer_concurrently(stack: LocalStack) -> None:
    async def main() -> tuple[Any, ...]:
        async with AsyncClient(stack.url, namespace=NS) as mb:
            oa = AsyncOpenAI(lane="urgent", client=mb)
            an = AsyncAnthropic(lane="urgent", client=mb)
            return await asyncio.gather(
                oa.chat.completions.create(**CHAT),
                oa.embeddings.create(model="text-embedding-3-small", input="three"),
                an.messages.create(**CLAUDE),
            )

    completion, embedding, message = asyncio.run(main())
    assert isinstance(completion, openai.types.chat.ChatCompletion)
    assert text_of_chat(completion) == expected_reply("/v1/chat/completions", CHAT)
    want = expected_embeddings({"model": "text-embedding-3-small", "input": "three"})[0]
    assert embedding.data[0].embedding == pytest.approx(want, abs=1e-6)
    assert isinstance(message, anthropic.types.Message)
    assert message.content[0].text == expected_reply("/v1/messages", CLAUDE)  # type: ignore[union-attr]


def test_a_drop_in_builds_its_own_async_client(stack: LocalStack) -> None:
    async def main() -> Any:
        async with AsyncOpenAI(lane="urgent", redis_url=stack.url, namespace=NS) as client:
            return await client.chat.completions.create(**CHAT)

    assert text_of_chat(asyncio.run(main())) == expected_reply("/v1/chat/completions", CHAT)


def test_extra_body_overrides_lane_deadline_and_custom_id(mb: Client) -> None:
    client = OpenAI(lane="bulk", deadline="20h", client=mb)
    options = {"lane": "urgent", "deadline": "10m", "custom_id": "doc-7"}
    first = client.chat.completions.create(**CHAT, extra_body={"mixbatch": options, "seed": 3})
    status = mb.status(rid(first))
    assert (status.lane, status.custom_id) == ("urgent", "doc-7")
    assert status.deadline == pytest.approx(status.created_at + 600, abs=5)
    assert mb.store.prepared(rid(first)).body["seed"] == 3, "other extra_body keys: body"
    again = client.chat.completions.create(**CHAT, extra_body={"mixbatch": options})
    assert again._request_id == first._request_id, "a custom_id makes a call idempotent"
    assert again == first


# -- failures: the SDK's own error classes ------------------------------------------------------


def test_a_provider_refusal_is_the_sdks_bad_request_error(mb: Client) -> None:
    bad = {"model": "gpt-4o-mini", "messages": []}
    with pytest.raises(openai.BadRequestError) as info:
        OpenAI(lane="urgent", client=mb).chat.completions.create(**bad)
    err = info.value
    assert err.status_code == 400 and err.param == "messages"
    assert err.request_id and err.request_id.startswith("urgent.")
    assert mb.result(err.request_id).status is State.FAILED

    with pytest.raises(anthropic.BadRequestError) as refused:
        Anthropic(lane="urgent", client=mb).messages.create(**{**CLAUDE, "messages": []})
    assert refused.value.status_code == 400
    assert refused.value.request_id and refused.value.request_id.startswith("urgent.")


@pytest.mark.parametrize(
    "settings,param",
    [
        ({"lane": "fast"}, "lane"),
        ({"lane": "urgent", "deadline": datetime(2020, 1, 1, tzinfo=UTC)}, "deadline"),
        ({"lane": "urgent", "deadline": time.time() - 5}, "deadline"),
    ],
)
def test_bad_input_is_the_sdks_bad_request_error_naming_the_field(
    stack: LocalStack, mb: Client, settings: dict[str, Any], param: str
) -> None:
    depth = mb.store.lane_stats("urgent").depth
    with pytest.raises(openai.BadRequestError) as info:
        OpenAI(client=mb, **settings).chat.completions.create(**CHAT)
    assert info.value.param == param and param in info.value.message
    assert info.value.code in {"unknown_lane", "deadline_in_past"}

    options = {"mixbatch": {"lane": "urgent", **settings}}
    with pytest.raises(anthropic.BadRequestError) as refused:
        Anthropic(lane="urgent", client=mb).messages.create(**CLAUDE, extra_body=options)
    assert refused.value.type == "invalid_request_error" and param in refused.value.message

    async def main() -> None:
        async with AsyncClient(stack.url, namespace=NS) as amb:
            with pytest.raises(openai.BadRequestError) as again:
                await AsyncOpenAI(client=amb, **settings).embeddings.create(
                    model="text-embedding-3-small", input="x"
                )
            assert again.value.param == param

    asyncio.run(main())
    assert mb.store.lane_stats("urgent").depth == depth, "nothing was enqueued"


def test_arguments_are_checked_as_the_sdk_checks_them(mb: Client) -> None:
    client = OpenAI(lane="urgent", client=mb)
    with pytest.raises(TypeError, match="unexpected keyword argument 'colour'"):
        client.chat.completions.create(**CHAT, colour="red")
    with pytest.raises(TypeError, match="missing required keyword arguments: \\['messages'\\]"):
        client.chat.completions.create(model="gpt-4o-mini")
    with pytest.raises(openai.BadRequestError) as stream:
        client.chat.completions.create(**CHAT, stream=True)
    assert stream.value.param == "stream"
    with pytest.raises(openai.BadRequestError) as option:
        client.chat.completions.create(**CHAT, extra_body={"mixbatch": {"colour": "red"}})
    assert option.value.param == "extra_body.mixbatch.colour"
    # The SDK's "left out" markers are left out of the body.
    done = client.chat.completions.create(**CHAT, temperature=openai.NOT_GIVEN, seed=openai.omit)
    assert "temperature" not in mb.store.prepared(rid(done)).body


def test_a_full_lane_is_the_sdks_rate_limit_error(idle: Client) -> None:
    idle.submit(body=CHAT, lane="tiny")
    with pytest.raises(openai.RateLimitError) as info:
        OpenAI(lane="tiny", client=idle).chat.completions.create(**CHAT)
    assert info.value.code == "lane_full"
    with pytest.raises(anthropic.RateLimitError):
        Anthropic(lane="tiny", client=idle).messages.create(**CLAUDE)


def test_a_wait_that_runs_out_is_the_sdks_timeout_and_the_request_stays(idle: Client) -> None:
    client = OpenAI(lane="idle", client=idle, timeout=0.3)
    options = {"mixbatch": {"custom_id": "slow"}}
    with pytest.raises(openai.APITimeoutError):
        client.chat.completions.create(**CHAT, extra_body=options)
    ticket = idle.submit(body=CHAT, lane="idle", custom_id="slow")
    assert ticket.duplicate and idle.status(ticket.id).state is State.QUEUED
    with pytest.raises(anthropic.APITimeoutError):
        Anthropic(lane="idle", client=idle).messages.create(**CLAUDE, timeout=0.2)


def test_a_cancelled_request_is_the_sdks_status_error(idle: Client) -> None:
    errors: list[BaseException] = []

    def call() -> None:
        try:
            options = {"mixbatch": {"custom_id": "doomed"}}
            OpenAI(lane="idle", client=idle).chat.completions.create(**CHAT, extra_body=options)
        except BaseException as exc:  # the assertion is on what was raised
            errors.append(exc)

    thread = threading.Thread(target=call)
    thread.start()
    time.sleep(0.5)
    ticket = idle.submit(body=CHAT, lane="idle", custom_id="doomed")
    assert idle.cancel(ticket.id) is State.CANCELLED
    thread.join(timeout=10)
    [err] = errors
    assert isinstance(err, openai.APIStatusError) and err.status_code == 499
    assert err.code == "cancelled" and err.request_id == ticket.id


def test_an_unreachable_redis_is_the_sdks_connection_error(
    service_config: ServiceConfig,
) -> None:
    url = f"redis://mixbatch:s3cret-pw@127.0.0.1:{free_port()}/0"
    with pytest.raises(openai.APIConnectionError) as info:
        OpenAI(lane="urgent", redis_url=url).chat.completions.create(**CHAT)
    assert "mixbatch:***@" in info.value.message and "s3cret" not in info.value.message

    async def main() -> None:
        async with AsyncAnthropic(lane="urgent", redis_url=url) as client:
            with pytest.raises(anthropic.APIConnectionError):
                await client.messages.create(**CLAUDE)

    asyncio.run(main())


@pytest.mark.parametrize(
    "outcome,status_code,sdk,error",
    [
        (State.EXPIRED, None, openai, openai.APIStatusError),
        (State.EXPIRED, None, anthropic, anthropic.RequestTimeoutError),
        (State.FAILED, None, openai, openai.InternalServerError),
        (State.FAILED, 401, openai, openai.AuthenticationError),
        (State.FAILED, 529, anthropic, anthropic.OverloadedError),
        (State.DONE, 200, openai, openai.APIResponseValidationError),
    ],
)
def test_every_outcome_maps_to_the_sdks_error(
    outcome: State, status_code: int | None, sdk: Any, error: type[Exception]
) -> None:
    """Outcomes the stack above cannot be made to produce on demand (a deadline expiring in a
    lane with the expire policy, retries used up, a provider's 401 or 529, an answer not of the
    SDK's shape), as stored results, through the same mapping a call uses."""
    client = (OpenAI if sdk is openai else Anthropic)(lane="urgent", redis_url="redis://x:1/0")
    endpoint: Endpoint[Any] = CHAT_ENDPOINT if sdk is openai else MESSAGES_ENDPOINT
    plan = client._calls.plan(endpoint, CHAT if sdk is openai else CLAUDE)
    result = Result(
        id="urgent.01J0EXAMPLE",
        lane="urgent",
        status=outcome,
        status_code=status_code,
        body={"not": "a completion"} if outcome is State.DONE else None,
        error=None if outcome is State.DONE else ErrorInfo(code="why", message="it went so"),
        deadline=time.time(),
        created_at=time.time(),
    )
    with pytest.raises(error) as info:
        client._calls.answer(plan, result)
    assert type(info.value) is error
    if isinstance(info.value, sdk.APIStatusError):
        want = {State.EXPIRED: 408, State.FAILED: status_code or 502}[outcome]
        assert info.value.status_code == want and info.value.request_id == result.id
        assert "it went so" in info.value.message


# -- the SDKs stay optional ---------------------------------------------------------------------


def test_the_sdks_are_imported_only_when_a_drop_in_is_built() -> None:
    code = """
import sys
sys.modules["openai"] = None  # as if not installed
import routing.dropin, routing.client
assert "anthropic" not in sys.modules, "importing routing.dropin imports no SDK"
try:
    routing.dropin.OpenAI(lane="urgent", redis_url="redis://127.0.0.1:1/0")
except ImportError as exc:
    print(exc)
routing.dropin.Anthropic(lane="urgent", redis_url="redis://127.0.0.1:1/0")
assert "anthropic" in sys.modules
"""
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "pip install 'mixbatch[openai]'" in out.stdout, out.stdout


def test_a_deadline_may_be_a_timedelta(mb: Client) -> None:
    completion = OpenAI(lane="urgent", client=mb).chat.completions.create(
        **CHAT, extra_body={"mixbatch": {"deadline": timedelta(minutes=5)}}
    )
    status = mb.status(rid(completion))
    assert status.deadline == pytest.approx(status.created_at + 300, abs=5)
