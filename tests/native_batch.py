"""What the Gemini, Bedrock and Mistral adapter tests share: the sandbox, accounts, input files."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from routing.decide.backoff import RetryPolicy
from routing.providers import BatchAdapter, account_for, batch_adapter_for
from routing.providers.capabilities import ProviderCapabilities, load_providers
from routing.sandbox import Knobs
from routing.sandbox.server import SandboxServer
from tests.test_batch_adapters import wait_terminal

__all__ = ["wait_terminal"]

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-native-DO-NOT-LEAK-91d0"
FAST = RetryPolicy(max_tries=3, base_s=0.01, cap_s=1.0, jitter=0.0)
#: Sandbox seconds per real second: a 2 s sandbox turnaround takes 0.1 s.
SCALE = 20.0
CAPS = load_providers(
    ROOT / "config" / "providers.toml",
    {"GEMINI_API_KEY": "x", "AWS_ACCESS_KEY_ID": "x", "MISTRAL_API_KEY": "x"},
)


def knobs(**changes: Any) -> dict[str, Any]:
    given = {"time_scale": SCALE, "batch_turnaround_s": 2.0, "bedrock_min_records": 1, **changes}
    return Knobs(**given).model_dump()


@pytest.fixture(scope="module")
def sandbox() -> Iterator[SandboxServer]:
    with SandboxServer(knobs=Knobs(**knobs())) as server:
        yield server


_MADE: list[BatchAdapter] = []


@pytest.fixture(autouse=True)
def _fresh_knobs(request: pytest.FixtureRequest) -> Iterator[None]:
    """Default knobs and an empty sandbox for each test; its adapters closed after it."""
    if "sandbox" in request.fixturenames:
        server: SandboxServer = request.getfixturevalue("sandbox")
        server.configure(**knobs())
        server.reset()
    yield
    while _MADE:
        _MADE.pop().close()


def bedrock_caps(sandbox: SandboxServer, **changes: Any) -> ProviderCapabilities:
    """The shipped Bedrock row, pointed at the sandbox's S3 with a bucket and a role."""
    fields = {
        "s3_bucket": "mixbatch-test",
        "role_arn": "arn:aws:iam::123456789012:role/bedrock-batch",
        "s3_url": f"{sandbox.url}/s3",
        "min_records": 1,
        **changes,
    }
    return CAPS["bedrock"].model_copy(update=fields)


def base_url(sandbox: SandboxServer, protocol: str) -> str:
    return f"{sandbox.url}/bedrock" if protocol == "bedrock" else sandbox.url


def make_adapter(
    sandbox: SandboxServer, protocol: str, cap: ProviderCapabilities | None = None, **options: Any
) -> BatchAdapter:
    """An adapter built the way the service builds one: capabilities, environment, factory."""
    cap = cap or (bedrock_caps(sandbox) if protocol == "bedrock" else CAPS[protocol])
    env = {cap.api_key_env: KEY, cap.url_env: base_url(sandbox, protocol)}
    options.setdefault("policy", FAST)
    adapter = batch_adapter_for(account_for(cap, env), cap, **options)
    _MADE.append(adapter)
    return adapter


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """boto3's credential chain, fed from the environment only."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIASANDBOX")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "sandbox-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")


def write_lines(path: Path, lines: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path
