"""The flex tier as a route: the official ``openai`` SDK with ``service_tier`` against the sandbox,
then real workers and beat routing standard-lane chat through flex, retrying shed calls on flex
while the slack allows and falling back to the standard tier when it runs short.

Bad input, as documented in docs/planner.md: a model without flex asked for with
``service_tier: "flex"`` is routed without it (the route's tier replaces the body's), and its
decision carries a warning; the sandbox, like OpenAI, answers such a call with a 400, so an
answer shows the tier was taken out.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import redis

from routing.client import Client
from routing.models import Route
from routing.sandbox import Knobs, expected_reply
from routing.sandbox.server import SandboxServer
from routing.states import State
from routing.store.observations import DecisionStore
from tasks.cli.stack import LocalStack
from tests.test_e2e import _db_url, make_stack

ROOT = Path(__file__).resolve().parent.parent
MODEL = "gpt-5-mini"
CHAT = "/v1/chat/completions"


def _chat(text: str, model: str = MODEL, **extra: object) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


# -- the sandbox through the official SDK ------------------------------------------------------


@pytest.fixture(scope="module")
def sandbox() -> Iterator[SandboxServer]:
    with SandboxServer(knobs=Knobs(retry_after_s=0.0)) as server:
        yield server


def test_openai_sdk_flex_is_echoed_and_shed(sandbox: SandboxServer) -> None:
    client = openai.OpenAI(base_url=sandbox.openai_base_url, api_key="sk-sandbox", max_retries=0)
    sandbox.configure(flex_rate_429=0.0, flex_rate_498=0.0, flex_latency_ms=30)
    started = time.monotonic()
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], service_tier="flex"
    )
    assert time.monotonic() - started >= 0.03
    assert reply.service_tier == "flex"
    assert reply.choices[0].message.content == expected_reply(CHAT, _chat("hi"))
    plain = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}]
    )
    assert plain.service_tier == "default"
    with pytest.raises(openai.BadRequestError, match="not available for model"):
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], service_tier="flex"
        )
    sandbox.configure(flex_rate_429=1.0)
    with pytest.raises(openai.RateLimitError, match="Resource Unavailable"):
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], service_tier="flex"
        )
    sandbox.configure(flex_rate_429=0.0, flex_rate_498=1.0)
    with pytest.raises(openai.APIStatusError) as shed:
        client.responses.create(model=MODEL, input="hi", service_tier="flex")
    assert shed.value.status_code == 498
    sandbox.configure(flex_rate_498=0.0)
    assert client.responses.create(model=MODEL, input="hi", service_tier="flex").service_tier == (
        "flex"
    )
    assert sandbox.stats()["faults_by_kind"] == {"flex_429": 1, "flex_498": 1}


# -- real workers ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """One stack for the module: batches off (the standard lane then has flex and realtime),
    a 2 s flex prior and a 5 s standard reserve, so a short deadline still tries flex first."""
    tmp = tmp_path_factory.mktemp("flex")
    providers = tmp / "providers.toml"
    providers.write_text(
        (ROOT / "config" / "providers.toml")
        .read_text()
        .replace('flex_latency = "10m"', 'flex_latency = "2s"', 1)
    )
    url = _db_url(redis_url, 14)
    r = redis.Redis.from_url(url)
    r.flushdb()
    r.close()
    knobs = Knobs(retry_after_s=0.1, flex_latency_ms=20, flex_rate_429=0.3, seed=7)
    st = make_stack(
        tmp,
        url,
        knobs,
        MIXBATCH_BATCH_ENABLED="false",
        MIXBATCH_PROVIDERS_FILE=str(providers),
        MIXBATCH_REALTIME_ESTIMATE_S="5",
        MIXBATCH_RETRY_CAP_S="1",
    )
    try:
        st.start_worker("w1", concurrency=4)
        st.start_beat()
        st.wait_workers(["w1"])
        yield st
    finally:
        st.stop()


@pytest.mark.timeout(180)
def test_standard_lane_goes_flex_and_shed_calls_are_retried_on_flex(stack: LocalStack) -> None:
    assert stack.sandbox is not None
    stack.sandbox.configure(flex_rate_429=0.3)
    texts = [f"flex {i}" for i in range(24)]
    with Client(stack.url, namespace="e2e") as client:
        tickets = client.submit_many([{"lane": "standard", "body": _chat(t)} for t in texts])
        results = [client.result(t.id, timeout=120) for t in tickets]
        assert [r.status for r in results] == [State.DONE] * len(texts)
        assert {r.route for r in results} == {Route.FLEX}
        assert {r.service_tier for r in results} == {"flex"}
        for text, result in zip(texts, results, strict=True):
            assert result.body is not None
            assert result.body["choices"][0]["message"]["content"] == expected_reply(
                CHAT, _chat(text)
            )
        st = client.store
        explained = DecisionStore(st.redis, st.keys, url=st.url).explain(tickets[0].id)
    assert stack.sandbox.stats()["faults_by_kind"].get("flex_429", 0) > 0
    assert explained.decision is not None
    flex = [c for c in explained.decision.candidates if c.route is Route.FLEX]
    standard = [c for c in explained.decision.candidates if c.route is Route.REALTIME]
    assert flex and standard and flex[0].fits
    assert flex[0].expected_cost_usd is not None and standard[0].expected_cost_usd is not None
    assert flex[0].expected_cost_usd == pytest.approx(standard[0].expected_cost_usd / 2)


@pytest.mark.timeout(120)
def test_slack_running_short_under_shedding_falls_back_to_standard(stack: LocalStack) -> None:
    assert stack.sandbox is not None
    stack.sandbox.configure(flex_rate_429=1.0)
    try:
        with Client(stack.url, namespace="e2e") as client:
            ticket = client.submit({"lane": "standard", "deadline": "20s", "body": _chat("late")})
            result = client.result(ticket.id, timeout=60)
    finally:
        stack.sandbox.configure(flex_rate_429=0.0)
    assert result.status is State.DONE
    assert result.route is Route.FLEX  # chosen: flex; answered: the standard tier
    assert result.service_tier == "default"
    assert result.finished_at is not None and result.finished_at <= result.deadline
    assert result.body is not None
    assert result.body["choices"][0]["message"]["content"] == expected_reply(CHAT, _chat("late"))


@pytest.mark.timeout(120)
def test_a_model_without_flex_asked_for_flex_is_routed_without_it(stack: LocalStack) -> None:
    with Client(stack.url, namespace="e2e") as client:
        body = _chat("no flex here", model="gpt-4o-mini", service_tier="flex")
        ticket = client.submit({"lane": "standard", "body": body})
        result = client.result(ticket.id, timeout=60)
        st = client.store
        explained = DecisionStore(st.redis, st.keys, url=st.url).explain(ticket.id)
    assert result.status is State.DONE, result.error
    assert result.route is Route.REALTIME and result.service_tier == "default"
    assert explained.decision is not None
    assert any("service_tier 'flex' asked" in w for w in explained.decision.warnings)
