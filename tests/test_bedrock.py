"""Bedrock batch inference over loopback HTTP: the adapter (boto3 to the sandbox's control plane
and S3 subset), Expired-before-start, the minimum record count, an account without a bucket, and
boto3's own bedrock and s3 clients driving the sandbox."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from routing.errors import ConfigError, ProviderError
from routing.models import Endpoint
from routing.providers import BatchStatus
from routing.providers.bedrock_batch import BedrockBatchAdapter, BelowMinimum, bedrock_status
from routing.sandbox import expected_reply, response_text
from routing.sandbox.server import SandboxServer
from tests.native_batch import (
    _fresh_knobs,
    aws_env,
    bedrock_caps,
    make_adapter,
    sandbox,
    wait_terminal,
    write_lines,
)

__all__ = ["_fresh_knobs", "aws_env", "sandbox"]  # fixtures used by name

pytest.importorskip("boto3")
pytestmark = pytest.mark.usefixtures("aws_env")

MODEL = "anthropic.claude-3-5-haiku-20241022-v1:0"
TAG = ("mixbatch_key", "0123abcd")


def body(i: int) -> dict[str, Any]:
    return {
        "model": MODEL,
        "max_tokens": 32,
        "messages": [{"role": "user", "content": f"question {i}?"}],
    }


def messages_file(tmp_path: Path, count: int) -> Path:
    lines = [{"custom_id": f"r-{i}", "params": body(i)} for i in range(count)]
    return write_lines(tmp_path / "in.jsonl", lines)


def create(adapter: Any, path: Path, **kw: Any) -> Any:
    return adapter.create(path, endpoint=Endpoint.MESSAGES, model=MODEL, metadata=dict([TAG]), **kw)


def test_full_cycle(sandbox: SandboxServer, tmp_path: Path) -> None:
    sandbox.configure(bedrock_min_records=3)
    adapter = make_adapter(sandbox, "bedrock", bedrock_caps(sandbox, min_records=3))
    assert isinstance(adapter, BedrockBatchAdapter)
    job = create(adapter, messages_file(tmp_path, 4))
    assert job.batch_id.startswith("arn:aws:bedrock:") and job.raw_status in (
        "Scheduled",
        "InProgress",
    )
    done = wait_terminal(adapter, job.batch_id)
    assert done.status is BatchStatus.COMPLETED and done.raw_status == "Completed"
    got = {
        r.custom_id: response_text(Endpoint.MESSAGES.value, r.body or {})
        for r in adapter.results(done)
    }
    assert got == {f"r-{i}": expected_reply(Endpoint.MESSAGES.value, body(i)) for i in range(4)}
    adapter.delete_inputs_outputs(done)
    assert list(adapter.results(done)) == []


def test_create_is_idempotent_by_client_request_token(
    sandbox: SandboxServer, tmp_path: Path
) -> None:
    adapter = make_adapter(sandbox, "bedrock")
    first = create(adapter, messages_file(tmp_path, 2))
    again = create(adapter, messages_file(tmp_path, 2))
    assert again.batch_id == first.batch_id
    found = adapter.find_orphan(TAG, custom_ids={"r-0", "r-1"}, created_after=first.created_at - 60)
    assert found.found is not None and found.found.batch_id == first.batch_id
    wrong = adapter.find_orphan(TAG, custom_ids={"r-0", "x"}, created_after=first.created_at - 60)
    assert wrong.found is None


def test_expired_means_never_started(sandbox: SandboxServer, tmp_path: Path) -> None:
    """``Expired``: scheduled, never run; no output, so every request is re-routed."""
    sandbox.configure(bedrock_expire=True, time_scale=24 * 3600 / 0.3)
    adapter = make_adapter(sandbox, "bedrock")
    done = wait_terminal(adapter, create(adapter, messages_file(tmp_path, 2)).batch_id)
    assert done.status is BatchStatus.EXPIRED and done.raw_status == "Expired"
    assert list(adapter.results(done)) == []


def test_record_errors_keyed_on_record_id(sandbox: SandboxServer, tmp_path: Path) -> None:
    sandbox.configure(batch_line_fail_rate=1.0)
    adapter = make_adapter(sandbox, "bedrock")
    done = wait_terminal(adapter, create(adapter, messages_file(tmp_path, 6)).batch_id)
    lines = list(adapter.results(done))
    assert {r.custom_id for r in lines} == {f"r-{i}" for i in range(6)}
    assert {r.error.code: r.error.retryable for r in lines if r.error} == {
        "ValidationException": False,
        "InternalServerException": True,
    }


def test_cancel(sandbox: SandboxServer, tmp_path: Path) -> None:
    sandbox.configure(batch_turnaround_s=3600.0)
    adapter = make_adapter(sandbox, "bedrock")
    job = create(adapter, messages_file(tmp_path, 2))
    assert adapter.cancel(job.batch_id).status is BatchStatus.CANCELLED
    assert adapter.cancel(job.batch_id).raw_status == "Stopped"


def test_below_the_minimum_is_not_created(sandbox: SandboxServer, tmp_path: Path) -> None:
    """The adapter refuses before anything is uploaded; the account's min_records says why."""
    adapter = make_adapter(sandbox, "bedrock", bedrock_caps(sandbox, min_records=100))
    with pytest.raises(BelowMinimum, match="below the minimum of 100"):
        create(adapter, messages_file(tmp_path, 5))
    assert sandbox.stats()["total_calls"] == 0


def test_sandbox_refuses_below_its_minimum(sandbox: SandboxServer, tmp_path: Path) -> None:
    """The provider's own check (knob bedrock_min_records), when the account table is wrong."""
    sandbox.configure(bedrock_min_records=100)
    adapter = make_adapter(sandbox, "bedrock")
    with pytest.raises(ProviderError, match="below the minimum") as err:
        create(adapter, messages_file(tmp_path, 5))
    assert err.value.status_code == 400 and not err.value.retryable


@pytest.mark.parametrize("missing", ["s3_bucket", "role_arn"])
def test_account_without_bucket_or_role_is_a_clear_error(
    sandbox: SandboxServer, missing: str
) -> None:
    with pytest.raises(
        ConfigError, match=f"has no {missing}.*set {missing} in \\[providers.bedrock\\]"
    ):
        make_adapter(sandbox, "bedrock", bedrock_caps(sandbox, **{missing: None}))


STATUSES = {
    "PartiallyCompleted": BatchStatus.COMPLETED,
    "Expired": BatchStatus.EXPIRED,
    "Stopping": BatchStatus.CANCELLING,
    "Scheduled": BatchStatus.IN_PROGRESS,
}


def test_statuses() -> None:
    assert {raw: bedrock_status(raw) for raw in STATUSES} == STATUSES


def test_boto3_drives_the_sandbox(sandbox: SandboxServer) -> None:
    import boto3
    from botocore.config import Config

    config = Config(
        s3={"addressing_style": "path"},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    s3 = boto3.client("s3", endpoint_url=f"{sandbox.url}/s3", config=config)
    bedrock = boto3.client("bedrock", endpoint_url=f"{sandbox.url}/bedrock")
    s3.create_bucket(Bucket="b")
    records = "".join(
        json.dumps(
            {"recordId": f"x{i}", "modelInput": {k: v for k, v in body(i).items() if k != "model"}}
        )
        + "\n"
        for i in range(3)
    )
    s3.put_object(Bucket="b", Key="in/records.jsonl", Body=records.encode())
    arn = bedrock.create_model_invocation_job(
        jobName="sdk-job",
        roleArn="arn:aws:iam::123456789012:role/r",
        clientRequestToken="tok-1",
        modelId=MODEL,
        inputDataConfig={"s3InputDataConfig": {"s3Uri": "s3://b/in/records.jsonl"}},
        outputDataConfig={"s3OutputDataConfig": {"s3Uri": "s3://b/out/"}},
    )["jobArn"]
    deadline = time.monotonic() + 10
    while (job := bedrock.get_model_invocation_job(jobIdentifier=arn))["status"] != "Completed":
        assert time.monotonic() < deadline, job["status"]
        time.sleep(0.05)
    listed = bedrock.list_model_invocation_jobs()["invocationJobSummaries"]
    assert arn in {j["jobArn"] for j in listed}
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="b", Prefix="out/")["Contents"]]
    out = next(k for k in keys if k.endswith("records.jsonl.out"))
    assert any(k.endswith("manifest.json.out") for k in keys)
    lines = [json.loads(x) for x in s3.get_object(Bucket="b", Key=out)["Body"].read().splitlines()]
    assert {line["recordId"] for line in lines} == {"x0", "x1", "x2"}
    assert all("modelOutput" in line for line in lines)
