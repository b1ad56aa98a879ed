"""Gemini's flex tier routed, not only priced: the google-genai SDK with ``service_tier`` against
the sandbox (sent as ``serviceTier``, echoed in ``usageMetadata.serviceTier``, 400 off
``flex_models``, 429 when shed), the adapter's wire body, then real workers sending
standard-lane Gemini requests through flex, priced at the flex price through
``mixbatch costs --json`` and all answered while flex sheds."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from routing.client import Client
from routing.decide.cost import PriceTable, actual_cost, parse_prices
from routing.engine.realtime import answered_tier, with_tier
from routing.models import Endpoint, Route
from routing.providers import GeminiAdapter, account_for, adapter_for
from routing.sandbox import Knobs
from routing.sandbox.batch_gemini import expected_gemini_reply
from routing.sandbox.server import SandboxServer
from routing.states import State
from tasks.cli.stack import LocalStack
from tests.native_batch import CAPS
from tests.test_e2e import ROOT, _db_url
from tests.test_native_e2e import native_stack
from tests.test_usage_pricing import _costs

genai = pytest.importorskip("google.genai")
types = pytest.importorskip("google.genai.types")

MODEL = "gemini-2.5-flash"


def _body(text: str) -> dict[str, Any]:
    return {"contents": [{"role": "user", "parts": [{"text": text}]}]}


# -- the sandbox through the official SDK ------------------------------------------------------


@pytest.fixture(scope="module")
def sandbox() -> Iterator[SandboxServer]:
    with SandboxServer(knobs=Knobs(retry_after_s=0.0)) as server:
        yield server


def test_genai_sdk_flex_is_sent_echoed_refused_and_shed(sandbox: SandboxServer) -> None:
    sent: list[bytes] = []
    with httpx.Client(event_hooks={"request": [lambda r: sent.append(r.read())]}) as http:
        options = types.HttpOptions(base_url=sandbox.url, api_version="v1beta", httpx_client=http)
        _sdk_checks(genai.Client(api_key="sandbox-key", http_options=options), sandbox, sent)
    assert sandbox.stats()["faults_by_kind"] == {"flex_429": 1}


def _sdk_checks(client: Any, sandbox: SandboxServer, sent: list[bytes]) -> None:
    sandbox.configure(flex_rate_429=0.0, flex_rate_498=0.0, flex_latency_ms=30)

    def ask(model: str = MODEL, **config: Any) -> Any:
        config = {"should_return_http_response": True, **config}
        return client.models.generate_content(model=model, contents="hi", config=config)

    def echo(reply: Any) -> str:
        return str(json.loads(reply.sdk_http_response.body)["usageMetadata"]["serviceTier"])

    reply = ask(service_tier="flex")
    assert json.loads(sent[-1])["serviceTier"] == "flex"  # top level, as the adapter sends it
    assert echo(reply) == "flex"
    raw = json.loads(reply.sdk_http_response.body)
    text = raw["candidates"][0]["content"]["parts"][0]["text"]
    assert text == expected_gemini_reply(_body("hi"), MODEL)
    assert echo(ask()) == "standard"
    assert echo(ask(service_tier=types.ServiceTier.PRIORITY)) == "priority"
    with pytest.raises(genai.errors.ClientError, match="not available for model") as refused:
        ask("gemini-2.0-flash", service_tier="flex")
    assert refused.value.code == 400
    sandbox.configure(flex_rate_429=1.0)
    with pytest.raises(genai.errors.ClientError, match="RESOURCE_EXHAUSTED") as shed:
        ask(service_tier="flex")
    assert shed.value.code == 429
    sandbox.configure(flex_rate_429=0.0)


def test_adapter_sends_the_routes_tier_as_service_tier_of_the_sdk(sandbox: SandboxServer) -> None:
    """The route's ``service_tier`` goes out as ``serviceTier``; on the standard route a flex
    ``serviceTier`` the producer wrote is taken out, as ``with_tier`` does for ``service_tier``."""
    cap = CAPS["gemini"]
    adapter = adapter_for(account_for(cap, {cap.api_key_env: "k", cap.url_env: sandbox.url}))
    assert isinstance(adapter, GeminiAdapter)
    body = {"model": MODEL, **_body("tiered")}
    path, wire = adapter.wire(Endpoint.GENERATE_CONTENT, with_tier(body, Route.FLEX))
    assert path == f"/v1beta/models/{MODEL}:generateContent"
    assert wire == {**_body("tiered"), "serviceTier": "flex"}
    producer = with_tier({**body, "serviceTier": "flex"}, Route.REALTIME)
    assert "serviceTier" not in adapter.wire(Endpoint.GENERATE_CONTENT, producer)[1]
    with adapter:
        reply = adapter.call(Endpoint.GENERATE_CONTENT, with_tier(body, Route.FLEX))
    assert reply.body["usageMetadata"]["serviceTier"] == "flex"


# -- real workers ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """One stack for the module: batches off (the standard lane then has flex and realtime), a
    2 s Gemini flex prior, and the gemini account at the sandbox."""
    tmp = tmp_path_factory.mktemp("gemini_flex")
    providers = tmp / "providers.toml"
    text = (ROOT / "config" / "providers.toml").read_text()
    assert text.count('flex_latency = "5m"') == 1
    providers.write_text(text.replace('flex_latency = "5m"', 'flex_latency = "2s"'))
    env = {
        "MIXBATCH_BATCH_ENABLED": "false",
        "MIXBATCH_PROVIDERS_FILE": str(providers),
        "MIXBATCH_PROVIDERS": json.dumps(["openai", "anthropic", "gemini"]),
        "MIXBATCH_REALTIME_ESTIMATE_S": "5",
        "MIXBATCH_RETRY_CAP_S": "1",
    }
    knobs = Knobs(retry_after_s=0.1, flex_latency_ms=20, flex_rate_429=0.3, seed=11)
    with native_stack(tmp, _db_url(redis_url, 12), knobs, lambda _: env) as st:
        yield st


@pytest.mark.timeout(180)
def test_standard_lane_gemini_goes_flex_priced_at_flex_and_all_answered(
    stack: LocalStack,
) -> None:
    assert stack.sandbox is not None
    stack.sandbox.configure(flex_rate_429=0.3)
    table: PriceTable = parse_prices((ROOT / "config" / "prices.toml").read_text())
    bodies = [_body(f"gemini flex {i} " + "x" * 30 * i) for i in range(16)]
    endpoint = Endpoint.GENERATE_CONTENT.value
    items = [{"lane": "standard", "endpoint": endpoint, "model": MODEL, "body": b} for b in bodies]
    with Client(stack.url, namespace="e2e", tenant="gemini-flex") as client:
        tickets = client.submit_many(items)
        results = [client.result(t.id, timeout=120) for t in tickets]
    want = 0.0
    for body, result in zip(bodies, results, strict=True):
        assert result.status is State.DONE, result.error
        assert (result.route, result.provider, result.service_tier) == (
            Route.FLEX,
            "gemini",
            "flex",
        )
        assert result.body is not None
        text = result.body["candidates"][0]["content"]["parts"][0]["text"]
        assert text == expected_gemini_reply(body, MODEL)
        meta = result.body["usageMetadata"]
        usd = actual_cost(table, "gemini", MODEL, meta, Route.FLEX)
        assert usd > 0 and result.cost_usd == pytest.approx(usd)
        assert usd == pytest.approx(actual_cost(table, "gemini", MODEL, meta, Route.REALTIME) / 2)
        want += usd
    assert stack.sandbox.stats()["faults_by_kind"].get("flex_429", 0) > 0
    spent = _costs(stack)["tenant"]["gemini-flex"]
    assert spent["count"] == len(bodies) and spent["cost"] == pytest.approx(want)


def test_the_tier_gemini_echoes_is_the_tier_priced() -> None:
    """A flex call Gemini served at the standard tier is priced as standard, not as asked."""
    assert answered_tier({"usageMetadata": {"serviceTier": "standard"}}, Route.FLEX) == (
        "standard",
        Route.REALTIME,
    )
    assert answered_tier({"usageMetadata": {"serviceTier": "FLEX"}}, Route.FLEX)[1] is Route.FLEX
    assert answered_tier({"usageMetadata": {}}, Route.FLEX) == ("flex", Route.FLEX)
