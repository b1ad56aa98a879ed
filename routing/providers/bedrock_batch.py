"""AWS Bedrock batch inference: JSONL in S3, a model invocation job, results back in S3.

Input records are ``{recordId, modelInput}`` (``recordId`` our custom_id, ``modelInput`` the
model's own body: Anthropic Messages for Claude, ``anthropic_version`` defaulted to Bedrock's),
written to ``s3://{s3_bucket}/{s3_prefix}{tag}/input.jsonl``; ``CreateModelInvocationJob`` names
it, the output prefix beside it and the account's ``role_arn``. The job's ``clientRequestToken``
is our tag (a digest of the batch's custom_ids), so creating twice makes one job: unlike the
other protocols a create may be retried after a lost reply. Results are the ``*.jsonl.out``
files under the output prefix, one line per record, ``{recordId, modelInput, modelOutput}`` or
``{recordId, modelInput, error: {errorCode, errorMessage}}``, joined on ``recordId``.

Statuses: ``Submitted | Validating | Scheduled | InProgress | Completed | PartiallyCompleted |
Failed | Stopping | Stopped | Expired``. ``Expired`` means the job was scheduled but never
started within ``timeoutDurationInHours``: nothing ran, every request is re-routed.

A job below the account's ``min_records`` is not created (``BelowMinimum``, not retryable here):
the route rule should send so few requests another way. An account without ``s3_bucket`` or
``role_arn`` is refused when the adapter is built, naming what to set. boto3 is imported only
here (the ``bedrock`` extra); credentials come from boto3's own chain (environment, profile).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import tempfile
import uuid
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from routing.errors import ConfigError, ProviderError
from routing.models import Endpoint, ErrorInfo
from routing.providers.base import ProviderAccount
from routing.providers.batch import BatchAdapter
from routing.providers.batch_jobs import (
    BatchJob,
    BatchStatus,
    LineResult,
    http_retryable,
    parse_timestamp,
)
from routing.providers.capabilities import ProviderCapabilities
from routing.providers.mistral_batch import timeout_hours
from routing.providers.native_input import cancel_then_read, framed_requests, without_model

__all__ = ["BEDROCK_ANTHROPIC_VERSION", "BedrockBatchAdapter", "BelowMinimum", "bedrock_status"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
BEDROCK_ANTHROPIC_VERSION = "bedrock-2023-05-31"
_STATES = {
    "Submitted": BatchStatus.VALIDATING,
    "Validating": BatchStatus.VALIDATING,
    "Scheduled": BatchStatus.IN_PROGRESS,
    "InProgress": BatchStatus.IN_PROGRESS,
    "Completed": BatchStatus.COMPLETED,
    "PartiallyCompleted": BatchStatus.COMPLETED,
    "Failed": BatchStatus.FAILED,
    "Stopping": BatchStatus.CANCELLING,
    "Stopped": BatchStatus.CANCELLED,
    "Expired": BatchStatus.EXPIRED,
}
#: Bedrock's per-record error codes that are the request's fault, never worth a retry.
_CLIENT_CODES = ("ValidationException", "AccessDeniedException", "ResourceNotFoundException")


class BelowMinimum(ProviderError):
    """Fewer records than the model's minimum per job: the job is not created."""


def bedrock_status(raw: str) -> BatchStatus | None:
    return _STATES.get(raw)


def _s3_parts(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


class BedrockBatchAdapter(BatchAdapter):
    """Bedrock's control plane (``base_url`` is its endpoint) and S3, both through boto3."""

    kind: ClassVar[str] = "bedrock"
    endpoints: ClassVar[frozenset[Endpoint]] = frozenset({Endpoint.MESSAGES})
    request_id_header: ClassVar[str] = "x-amzn-requestid"
    page_limit_max: ClassVar[int] = 1000

    def __init__(
        self, account: ProviderAccount, capabilities: ProviderCapabilities, **transport: Any
    ) -> None:
        missing = [n for n in ("s3_bucket", "role_arn") if not getattr(capabilities, n)]
        if missing:
            raise ConfigError(
                f"provider account {capabilities.name!r} (bedrock) has no "
                f"{' or '.join(missing)}: Bedrock batch jobs read their input from S3 with a "
                f"role; set {', '.join(missing)} in [providers.{capabilities.name}]"
            )
        super().__init__(account, capabilities, **transport)
        self._aws: dict[str, Any] = {}

    def auth_headers(self) -> dict[str, str]:
        return {}

    def _boto(self, service: str) -> Any:
        """A boto3 client, built once; boto3 is an optional dependency."""
        if service in self._aws:
            return self._aws[service]
        try:
            import boto3
            from botocore.config import Config
        except ImportError:
            raise ConfigError(
                "Bedrock batch needs boto3: pip install 'mixbatch[bedrock]'"
            ) from None
        cap = self.capabilities
        config = Config(
            region_name=cap.region or "us-east-1",
            retries={"mode": "standard", "max_attempts": 3},
            connect_timeout=self.account.timeout_s,
            read_timeout=self.account.timeout_s,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            s3={"addressing_style": "path"},
        )
        url = self.account.base_url if service == "bedrock" else cap.s3_url
        client = boto3.client(service, endpoint_url=url, config=config)
        self._aws[service] = client
        return client

    def _call(self, what: str, call: Callable[[], T]) -> T:
        """One boto3 call with its errors as ours: the status decides what is retryable."""
        from botocore.exceptions import BotoCoreError, ClientError

        where = f"{self.account.name} {what}"
        try:
            return call()
        except ClientError as exc:
            meta = exc.response.get("ResponseMetadata", {})
            status = meta.get("HTTPStatusCode")
            error = exc.response.get("Error", {})
            message = f"{where} -> {status}: {error.get('Code')}: {error.get('Message')}"
            raise ProviderError(
                self._redact(message),
                status_code=status if isinstance(status, int) else None,
                retryable=isinstance(status, int) and http_retryable(status),
                body=error or None,
                provider_request_id=meta.get("RequestId"),
            ) from None
        except BotoCoreError as exc:
            raise ProviderError(
                self._redact(f"{where}: {type(exc).__name__}: {exc}"), retryable=True
            ) from None

    def _create(
        self, path: Path, endpoint: Endpoint, model: str, metadata: dict[str, str], window: str
    ) -> tuple[BatchJob, str | None]:
        records = framed_requests(path, endpoint, model, _record, self._check_size)
        cap = self.capabilities
        if len(records) < cap.min_records:
            raise BelowMinimum(
                f"{self.account.name}: {len(records)} records is below the minimum of "
                f"{cap.min_records} per job (min_records); the job is not created: send these "
                "requests by another route",
                retryable=False,
            )
        tag = next(iter(metadata.values()), "") or uuid.uuid4().hex
        base = f"{cap.s3_prefix}{tag}/"
        bucket = str(cap.s3_bucket)
        content = b"".join(json.dumps(r).encode() + b"\n" for r in records)
        s3 = self._boto("s3")
        put = functools.partial(
            s3.put_object, Bucket=bucket, Key=base + "input.jsonl", Body=content
        )
        self._call("PutObject", put)
        bedrock = self._boto("bedrock")
        reply = self._call(
            "CreateModelInvocationJob",
            lambda: bedrock.create_model_invocation_job(
                jobName=f"mixbatch-{tag}"[:63],
                roleArn=cap.role_arn,
                clientRequestToken=tag[:256],
                modelId=model,
                inputDataConfig={
                    "s3InputDataConfig": {
                        "s3Uri": f"s3://{bucket}/{base}input.jsonl",
                        "s3InputFormat": "JSONL",
                    }
                },
                outputDataConfig={"s3OutputDataConfig": {"s3Uri": f"s3://{bucket}/{base}output/"}},
                timeoutDurationInHours=timeout_hours(window),
                tags=[{"key": k, "value": v[:256]} for k, v in metadata.items()],
            ),
        )
        request_id = reply.get("ResponseMetadata", {}).get("RequestId")
        return self.retrieve(str(reply["jobArn"])), request_id

    def retrieve(self, batch_id: str) -> BatchJob:
        bedrock = self._boto("bedrock")
        obj = self._call(
            "GetModelInvocationJob",
            lambda: bedrock.get_model_invocation_job(jobIdentifier=batch_id),
        )
        return self._job(obj)

    def cancel(self, batch_id: str) -> BatchJob:
        """``StopModelInvocationJob``; a job that already ended is returned as it ended."""
        bedrock = self._boto("bedrock")
        stop = functools.partial(bedrock.stop_model_invocation_job, jobIdentifier=batch_id)
        return cancel_then_read(
            batch_id, lambda: self._call("StopModelInvocationJob", stop), self.retrieve
        )

    def _batch_path(self, batch_id: str) -> str:
        return batch_id

    def _job(self, obj: dict[str, Any]) -> BatchJob:
        arn = obj.get("jobArn")
        if not isinstance(arn, str) or not arn:
            raise ProviderError(f"{self.account.name}: a job without a jobArn", retryable=False)
        raw = str(obj.get("status") or "")
        name = str(obj.get("jobName") or "")
        output = obj.get("outputDataConfig", {}).get("s3OutputDataConfig", {}).get("s3Uri")
        source = obj.get("inputDataConfig", {}).get("s3InputDataConfig", {}).get("s3Uri")
        when, ended = obj.get("submitTime"), obj.get("endTime")
        return BatchJob(
            provider=self.account.name,
            batch_id=arn,
            status=_STATES.get(raw, BatchStatus.IN_PROGRESS),
            raw_status=raw,
            created_at=_epoch(when) or 0.0,
            ended_at=_epoch(ended),
            metadata={"mixbatch_job_name": name},
            input_ref=source if isinstance(source, str) else None,
            output_ref=output if isinstance(output, str) else None,
        )

    def _list_page(
        self, limit: int, cursor: dict[str, str] | None
    ) -> tuple[list[BatchJob], dict[str, str] | None]:
        bedrock = self._boto("bedrock")
        query: dict[str, Any] = {"maxResults": limit, "sortOrder": "Descending", **(cursor or {})}
        reply = self._call(
            "ListModelInvocationJobs", lambda: bedrock.list_model_invocation_jobs(**query)
        )
        jobs = [self._job(item) for item in reply.get("invocationJobSummaries", [])]
        token = reply.get("nextToken")
        return jobs, ({"nextToken": token} if token else None)

    def _result_paths(self, job: BatchJob) -> list[str]:
        """Every ``*.jsonl.out`` under the job's output prefix (``{prefix}{job id}/``)."""
        if not job.output_ref:
            return []
        bucket, prefix = _s3_parts(job.output_ref)
        job_id = job.batch_id.rsplit("/", 1)[-1]
        s3 = self._boto("s3")
        found: list[str] = []
        token: dict[str, str] = {}
        while True:
            page = self._call(
                "ListObjectsV2",
                functools.partial(
                    s3.list_objects_v2, Bucket=bucket, Prefix=f"{prefix}{job_id}/", **token
                ),
            )
            found += [o["Key"] for o in page.get("Contents", []) if o["Key"].endswith(".jsonl.out")]
            if not page.get("IsTruncated"):
                return [f"s3://{bucket}/{key}" for key in sorted(found)]
            token = {"ContinuationToken": page["NextContinuationToken"]}

    def _stream_lines(self, path: str) -> Generator[tuple[int, str], None, None]:
        """(line number, text) of an S3 object, read whole (one file per input file)."""
        bucket, key = _s3_parts(path)
        s3 = self._boto("s3")
        reply = self._call("GetObject", lambda: s3.get_object(Bucket=bucket, Key=key))
        with contextlib.closing(reply["Body"]) as body, tempfile.TemporaryFile() as fh:
            for chunk in iter(lambda: body.read(1 << 20), b""):
                fh.write(chunk)
            fh.seek(0)
            for number, raw in _numbered(fh):
                yield number, raw.decode("utf-8", "replace")

    def _line_result(self, obj: dict[str, Any]) -> LineResult | None:
        record_id = obj.get("recordId")
        if not isinstance(record_id, str):
            return None
        output = obj.get("modelOutput")
        error = obj.get("error")
        if isinstance(output, dict) and not error:
            return LineResult(custom_id=record_id, status_code=200, body=output)
        error = error if isinstance(error, dict) else {}
        code = str(error.get("errorCode") or "ModelError")
        status = 400 if code in _CLIENT_CODES else None
        info = ErrorInfo(
            code=code,
            message=str(error.get("errorMessage") or "no message"),
            retryable=status is None,
            status_code=status,
        )
        return LineResult(custom_id=record_id, status_code=status, body=error or None, error=info)

    def _delete(self, job: BatchJob) -> None:
        """The input and output objects of the job; the job record itself stays at Bedrock."""
        s3 = self._boto("s3")
        keys = list(self._result_paths(job))
        keys += [job.input_ref] if job.input_ref else []
        for uri in keys:
            bucket, key = _s3_parts(uri)
            self._call("DeleteObject", functools.partial(s3.delete_object, Bucket=bucket, Key=key))

    def _orphan_candidate(self, job: BatchJob, key: str, value: str, total: int) -> bool:
        return job.metadata.get("mixbatch_job_name") == f"mixbatch-{value}"[:63]

    def _custom_id_paths(self, job: BatchJob) -> list[str] | None:
        return [job.input_ref] if job.input_ref else []

    def _holds_exactly(self, job: BatchJob, wanted: set[str]) -> bool | None:
        """The input file's ``recordId``s, read back from S3, are exactly ``wanted``."""
        seen: set[str] = set()
        for path in self._custom_id_paths(job) or []:
            for _, text in self._stream_lines(path):
                record = json.loads(text)
                record_id = record.get("recordId") if isinstance(record, dict) else None
                if record_id not in wanted or record_id in seen:
                    return False
                seen.add(record_id)
        return seen == wanted


def _record(custom_id: str, body: dict[str, Any]) -> dict[str, Any]:
    """``{recordId, modelInput}``; Claude's body gets Bedrock's ``anthropic_version``."""
    return {
        "recordId": custom_id,
        "modelInput": {"anthropic_version": BEDROCK_ANTHROPIC_VERSION, **without_model(body)},
    }


def _epoch(value: object) -> float | None:
    """boto3 gives datetimes; anything else is parsed as a timestamp."""
    stamp = getattr(value, "timestamp", None)
    return float(stamp()) if callable(stamp) else parse_timestamp(value)


def _numbered(fh: Any) -> Iterator[tuple[int, bytes]]:
    number = 0
    for raw in fh:
        line = raw.rstrip(b"\r\n")
        if line.strip():
            number += 1
            yield number, line
