"""Gemini, Bedrock and Mistral end to end: bulk-lane requests go through each provider's own batch
protocol (the sandbox's imitation over real HTTP), with a real worker and beat, one stack for
the module. Routing sends Gemini's endpoints to the gemini account, /v1/messages to bedrock and
/v1/chat/completions to mistral (``MIXBATCH_ROUTE_ACCOUNTS``)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis

from routing.client import Client
from routing.models import Endpoint, Route
from routing.sandbox import Knobs, expected_reply, response_text
from routing.sandbox.batch_gemini import expected_gemini_reply
from routing.sandbox.batch_native import native_store
from routing.states import State
from tasks.cli.stack import LocalStack
from tests.test_e2e import ROOT, _db_url, make_stack

pytest.importorskip("boto3")

GEMINI = "gemini-2.5-flash"
BEDROCK = "anthropic.claude-3-5-haiku-20241022-v1:0"
MISTRAL = "mistral-small-latest"
ACCOUNTS = ("openai", "anthropic", "gemini", "bedrock", "mistral")


def providers_file(path: Path, sandbox_url: str) -> Path:
    """The shipped table with the Bedrock row given a bucket, a role and the sandbox's S3."""
    text = (ROOT / "config" / "providers.toml").read_text()
    text = text.replace('# s3_bucket = "my-bucket"', 's3_bucket = "e2e"')
    text = text.replace(
        '# role_arn = "arn:aws:iam::123456789012:role/bedrock-batch"',
        f'role_arn = "arn:aws:iam::123456789012:role/r"\ns3_url = "{sandbox_url}/s3"',
    )
    text = text.replace("min_records = 100 ", "min_records = 1 ")
    path.write_text(text)
    return path


def native_env(base: str) -> dict[str, str]:
    """The keys and base URLs of the gemini, mistral and bedrock accounts, at the sandbox."""
    return {
        "GEMINI_API_KEY": "sandbox",
        "GEMINI_BASE_URL": base,
        "MISTRAL_API_KEY": "sandbox",
        "MISTRAL_BASE_URL": base,
        "BEDROCK_BASE_URL": f"{base}/bedrock",
        "AWS_ACCESS_KEY_ID": "AKIASANDBOX",
        "AWS_SECRET_ACCESS_KEY": "sandbox-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
    }


@contextmanager
def native_stack(
    tmp: Path, url: str, knobs: Knobs, env: Callable[[str], dict[str, str]]
) -> Iterator[LocalStack]:
    """A stack on a flushed database with a worker and beat, ``env(sandbox_url)`` its settings."""
    r = redis.Redis.from_url(url)
    r.flushdb()
    r.close()
    s = make_stack(tmp, url, knobs)
    try:
        assert s.sandbox is not None
        s.extra_env.update({**env(s.sandbox.url), **native_env(s.sandbox.url)})
        s.start_worker("worker", concurrency=3)
        s.start_beat()
        s.wait_workers(["worker"])
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[LocalStack]:
    tmp = tmp_path_factory.mktemp("native")

    def env(base: str) -> dict[str, str]:
        return {
            "MIXBATCH_PROVIDERS": json.dumps(ACCOUNTS),
            "MIXBATCH_PROVIDERS_FILE": str(providers_file(tmp / "providers.toml", base)),
            "MIXBATCH_BATCH_TURNAROUND_S": json.dumps(dict.fromkeys(ACCOUNTS, 5)),
            "MIXBATCH_ROUTE_ACCOUNTS": json.dumps(
                {"/v1/messages": ["bedrock"], "/v1/chat/completions": ["mistral"]}
            ),
        }

    knobs = Knobs(batch_turnaround_s=1.0, bedrock_min_records=1)
    with native_stack(tmp, _db_url(redis_url, 14), knobs, env) as s:
        yield s


def run(stack: LocalStack, items: list[dict[str, Any]]) -> list[Any]:
    with Client(stack.url, namespace="e2e") as client:
        tickets = client.submit_many([{"lane": "bulk", **item} for item in items])
        return [client.result(t.id, timeout=120) for t in tickets]


def created(stack: LocalStack, path: str) -> int:
    assert stack.sandbox is not None
    return int(stack.sandbox.stats()["calls_by_endpoint"].get(path, 0))


@pytest.mark.timeout(180)
def test_gemini_bulk_goes_through_batch_mode(stack: LocalStack) -> None:
    bodies = [{"contents": [{"role": "user", "parts": [{"text": f"g{i}?"}]}]} for i in range(6)]
    endpoint = Endpoint.GENERATE_CONTENT.value
    results = run(stack, [{"endpoint": endpoint, "model": GEMINI, "body": b} for b in bodies])
    for body, result in zip(bodies, results, strict=True):
        assert result.status is State.DONE and result.route is Route.BATCH, result
        text = result.body["candidates"][0]["content"]["parts"][0]["text"]
        assert text == expected_gemini_reply(body, GEMINI)
    assert created(stack, "/v1beta/models/{name}") >= 1


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    ("endpoint", "model", "account", "create_path"),
    [
        (Endpoint.MESSAGES, BEDROCK, "bedrock", "/bedrock/model-invocation-job"),
        (Endpoint.CHAT, MISTRAL, "mistral", "/v1/batch/jobs"),
    ],
)
def test_bedrock_and_mistral_bulk_go_through_their_batch_jobs(
    stack: LocalStack, endpoint: Endpoint, model: str, account: str, create_path: str
) -> None:
    bodies = [
        {"max_tokens": 16, "messages": [{"role": "user", "content": f"{account}{i}?"}]}
        for i in range(5)
    ]
    results = run(stack, [{"endpoint": endpoint.value, "model": model, "body": b} for b in bodies])
    for body, result in zip(bodies, results, strict=True):
        assert result.status is State.DONE and result.route is Route.BATCH, result
        assert result.provider == account
        want = expected_reply(endpoint.value, {**body, "model": model})
        assert response_text(endpoint.value, result.body) == want
    assert created(stack, create_path) >= 1


@pytest.mark.timeout(180)
def test_far_deadlines_take_the_longest_window_that_fits(stack: LocalStack) -> None:
    """Mistral allows 24h, 48h and 168h: a 10-day deadline is sent with timeout_hours 168."""
    assert stack.sandbox is not None
    store = native_store(stack.sandbox.state)
    before = {j.job_id for j in store.listed("mistral")}
    body = {"messages": [{"role": "user", "content": "far?"}]}
    item = {"endpoint": Endpoint.CHAT.value, "model": MISTRAL, "body": body, "deadline": "10d"}
    (result,) = run(stack, [item])
    assert result.status is State.DONE and result.route is Route.BATCH
    (job,) = [j for j in store.listed("mistral") if j.job_id not in before]
    assert job.extra["timeout_hours"] == 168
