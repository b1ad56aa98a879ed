"""Mistral's batch API: requests inline in one POST, results as OpenAI-shaped output files.

``POST /v1/batch/jobs {requests: [{custom_id, body}], endpoint, model, metadata, timeout_hours}``.
``timeout_hours`` comes from the completion window (``"24h"`` -> 24, ``"7d"`` -> 168): the
account's ``windows`` list what it allows, and the batch route picks a longer one when the
deadlines are that far away. Statuses ``QUEUED | RUNNING | SUCCESS | FAILED | TIMEOUT_EXCEEDED |
CANCELLATION_REQUESTED | CANCELLED``; a job that runs out of time is ``EXPIRED`` with the lines
that finished in its output file, the rest re-routed. Output lines are OpenAI's
(``{custom_id, response: {status_code, body}, error}``), read from ``/v1/files/{id}/content``.

Create is not idempotent; jobs carry our metadata, so ``find_orphan`` adopts a listed job with
our tag (a digest of its custom_ids) and the same request count.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from routing.errors import ProviderError
from routing.models import Endpoint, ErrorInfo, parse_duration_s
from routing.providers.batch import BatchAdapter
from routing.providers.batch_jobs import (
    BatchJob,
    BatchStatus,
    LineResult,
    http_retryable,
    no_response_error,
    parse_timestamp,
)
from routing.providers.native_input import framed_requests
from routing.providers.openai import OpenAIProtocol

__all__ = ["MistralBatchAdapter", "timeout_hours"]

_JOBS = "/v1/batch/jobs"
_STATES = {
    "QUEUED": BatchStatus.VALIDATING,
    "RUNNING": BatchStatus.IN_PROGRESS,
    "SUCCESS": BatchStatus.COMPLETED,
    "FAILED": BatchStatus.FAILED,
    "TIMEOUT_EXCEEDED": BatchStatus.EXPIRED,
    "CANCELLATION_REQUESTED": BatchStatus.CANCELLING,
    "CANCELLED": BatchStatus.CANCELLED,
}


def timeout_hours(window: str) -> int:
    """Whole hours of a completion window, at least one."""
    return max(1, round(parse_duration_s(window) / 3600))


def _int(obj: dict[str, Any], name: str) -> int:
    value = obj.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


class MistralBatchAdapter(OpenAIProtocol, BatchAdapter):
    """Mistral batch jobs; ``base_url`` has no ``/v1`` (the mistralai SDK's ``server_url``)."""

    kind: ClassVar[str] = "mistral"
    endpoints: ClassVar[frozenset[Endpoint]] = frozenset({Endpoint.CHAT, Endpoint.EMBEDDINGS})

    def _batch_path(self, batch_id: str) -> str:
        return f"{_JOBS}/{self._quote(batch_id)}"

    def _create(
        self, path: Path, endpoint: Endpoint, model: str, metadata: dict[str, str], window: str
    ) -> tuple[BatchJob, str | None]:
        requests = framed_requests(
            path,
            endpoint,
            model,
            lambda cid, body: {"custom_id": cid, "body": body},
            self._check_size,
        )
        body = {
            "requests": requests,
            "endpoint": endpoint.value,
            "model": model,
            "metadata": metadata,
            "timeout_hours": timeout_hours(window),
        }
        obj, request_id = self._object_reply("POST", _JOBS, json_body=body, idempotent=False)
        return self._job(obj), request_id

    def _job(self, obj: dict[str, Any]) -> BatchJob:
        batch_id = obj.get("id")
        if not isinstance(batch_id, str) or not batch_id:
            raise ProviderError(f"{self.account.name}: a batch job without an id", retryable=False)
        raw = str(obj.get("status") or "")
        metadata = obj.get("metadata")
        metadata = metadata if isinstance(metadata, dict) else {}
        output, errors = obj.get("output_file"), obj.get("error_file")
        return BatchJob(
            provider=self.account.name,
            batch_id=batch_id,
            status=_STATES.get(raw, BatchStatus.IN_PROGRESS),
            raw_status=raw,
            total=_int(obj, "total_requests"),
            completed=_int(obj, "succeeded_requests"),
            failed=_int(obj, "failed_requests"),
            created_at=parse_timestamp(obj.get("created_at")) or 0.0,
            ended_at=parse_timestamp(obj.get("completed_at")),
            metadata={str(k): str(v) for k, v in metadata.items()},
            output_ref=output if isinstance(output, str) and output else None,
            error_ref=errors if isinstance(errors, str) and errors else None,
        )

    def _list_page(
        self, limit: int, cursor: dict[str, str] | None
    ) -> tuple[list[BatchJob], dict[str, str] | None]:
        page = int((cursor or {}).get("page", "0"))
        body = self._json_object("GET", _JOBS, params={"page": str(page), "page_size": str(limit)})
        data = body.get("data")
        jobs = [self._job(item) for item in data if isinstance(item, dict)] if data else []
        total = _int(body, "total")
        more = (page + 1) * limit < total
        return jobs, ({"page": str(page + 1)} if more and jobs else None)

    def _result_paths(self, job: BatchJob) -> list[str]:
        refs = (job.output_ref, job.error_ref)
        return [f"/v1/files/{self._quote(ref)}/content" for ref in refs if ref]

    def _line_result(self, obj: dict[str, Any]) -> LineResult | None:
        custom_id = obj.get("custom_id")
        if not isinstance(custom_id, str):
            return None
        response = obj.get("response")
        response = response if isinstance(response, dict) else {}
        status = response.get("status_code")
        body = response.get("body")
        body = body if isinstance(body, dict) else None
        if isinstance(status, int) and 200 <= status < 300 and not obj.get("error"):
            return LineResult(custom_id=custom_id, status_code=status, body=body)
        error = obj.get("error")
        error = error if isinstance(error, dict) else {}
        if not isinstance(status, int):
            code = str(error.get("code") or "batch_error")
            message = str(error.get("message") or "no response")
            return LineResult(custom_id=custom_id, error=no_response_error(code, message))
        inner = (body or {}).get("error")
        inner = inner if isinstance(inner, dict) else {}
        info = ErrorInfo(
            code=str(inner.get("code") or inner.get("type") or f"http_{status}"),
            message=str(inner.get("message") or body or "no message"),
            retryable=http_retryable(status),
            status_code=status,
        )
        return LineResult(custom_id=custom_id, status_code=status, body=body, error=info)

    def _delete(self, job: BatchJob) -> None:
        for ref in (job.output_ref, job.error_ref):
            if ref:
                self._send("DELETE", f"/v1/files/{self._quote(ref)}", missing_ok=True)

    def _orphan_candidate(self, job: BatchJob, key: str, value: str, total: int) -> bool:
        return job.metadata.get(key) == value and job.total in (0, total)

    def _custom_id_paths(self, job: BatchJob) -> list[str] | None:
        return []

    def _holds_exactly(self, job: BatchJob, wanted: set[str]) -> bool | None:
        """Inline requests cannot be read back: the tag, a digest of the ids, decides."""
        return True
