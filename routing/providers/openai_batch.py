"""OpenAI's Files + Batch API, and the providers that copy it (Groq, Together, the sandbox).

A batch is two steps: upload the JSONL file (``purpose=batch``, multipart, streamed from disk),
then ``POST /batches`` naming it. Results are two files, output and error, either of which may
be missing; both are always read (a batch whose every line failed has only an error file).

Compatible providers drift from the original in small ways, read here without special cases:
Together wraps the created job in ``{"job": ...}``, writes statuses in capitals and times as
ISO strings and lists as a bare array; Groq's ``errors`` is a bare array and its list pages by
``paging.next_cursor``. An empty-string file id (seen on clean batches) means no file.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from routing.errors import InvalidRequest, ProviderError
from routing.faults import fault_point
from routing.models import Endpoint, ErrorInfo
from routing.providers.batch import BatchAdapter
from routing.providers.batch_jobs import (
    BatchJob,
    BatchStatus,
    LineError,
    LineResult,
    http_retryable,
    iter_input_lines,
    no_response_error,
    parse_timestamp,
    scan_sizes,
)
from routing.providers.openai import OpenAIProtocol

__all__ = ["OpenAIBatchAdapter", "check_metadata"]

logger = logging.getLogger(__name__)

_STATUS = {
    "validating": BatchStatus.VALIDATING,
    "in_progress": BatchStatus.IN_PROGRESS,
    "finalizing": BatchStatus.FINALIZING,
    "completed": BatchStatus.COMPLETED,
    "failed": BatchStatus.FAILED,
    "expired": BatchStatus.EXPIRED,
    "cancelling": BatchStatus.CANCELLING,
    "canceling": BatchStatus.CANCELLING,
    "cancelled": BatchStatus.CANCELLED,
    "canceled": BatchStatus.CANCELLED,
}
_ENDED_AT = ("completed_at", "failed_at", "expired_at", "cancelled_at")
_METADATA_PAIRS = 16
_METADATA_KEY_CHARS = 64
_METADATA_VALUE_CHARS = 512


def _file_id(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _validation_errors(obj: dict[str, Any]) -> list[LineError]:
    errors = obj.get("errors")
    items = errors.get("data") if isinstance(errors, dict) else errors
    found: list[LineError] = []
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict):
            continue
        message = str(item.get("message") or "")
        param = item.get("param")
        if isinstance(param, str) and param and param not in message:
            message = f"{message} (param: {param})"
        line = item.get("line")
        custom_id = item.get("custom_id")
        found.append(
            LineError(
                line=line if isinstance(line, int) and not isinstance(line, bool) else None,
                custom_id=custom_id if isinstance(custom_id, str) else None,
                code=str(item.get("code") or "invalid"),
                message=message,
            )
        )
    if not found and isinstance(obj.get("error"), str) and obj["error"]:
        found.append(LineError(code="failed", message=obj["error"]))
    return found


def check_metadata(metadata: dict[str, str]) -> None:
    """OpenAI's metadata rules, checked before any upload: 16 pairs, keys 64, values 512 chars."""
    if len(metadata) > _METADATA_PAIRS:
        raise InvalidRequest(
            f"{len(metadata)} pairs, over OpenAI's {_METADATA_PAIRS}", field="metadata"
        )
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidRequest(f"{key!r}: keys and values must be strings", field="metadata")
        if len(key) > _METADATA_KEY_CHARS or len(value) > _METADATA_VALUE_CHARS:
            raise InvalidRequest(
                f"{key!r}: keys are at most {_METADATA_KEY_CHARS} characters and values "
                f"at most {_METADATA_VALUE_CHARS}",
                field="metadata",
            )


class OpenAIBatchAdapter(OpenAIProtocol, BatchAdapter):
    """Files + Batch API; ``account.base_url`` ends in ``/v1``, so paths here omit it."""

    def _batch_path(self, batch_id: str) -> str:
        return f"/batches/{self._quote(batch_id)}"

    def _create(
        self, path: Path, endpoint: Endpoint, model: str, metadata: dict[str, str], window: str
    ) -> tuple[BatchJob, str | None]:
        check_metadata(metadata)
        lines, longest, longest_at = scan_sizes(iter_input_lines(path))
        self._check_size(path, lines, path.stat().st_size, longest, longest_at)
        file_id = self._upload(path)
        fault_point("upload")
        body: dict[str, Any] = {
            "input_file_id": file_id,
            "endpoint": endpoint.value,
            "completion_window": window,
        }
        if metadata:
            body["metadata"] = metadata
        try:
            obj, request_id = self._object_reply(
                "POST", "/batches", json_body=body, idempotent=False
            )
        except ProviderError as exc:
            if exc.status_code is not None:
                self._discard_upload(file_id)
            raise
        job = self._job(obj)
        if job.input_ref is None:
            job = job.model_copy(update={"input_ref": file_id})
        return job, request_id

    def _upload(self, path: Path) -> str:
        """Upload ``path`` for a batch; httpx streams the open file in 64 KiB chunks."""
        name = path.name if path.name.endswith(".jsonl") else f"{path.name}.jsonl"

        def prepare(stack: ExitStack) -> dict[str, Any]:
            handle = stack.enter_context(path.open("rb"))
            return {
                "files": {"file": (name, handle, "application/jsonl")},
                "data": {"purpose": self.capabilities.file_purpose},
            }

        obj = self._json_object("POST", "/files", prepare=prepare)
        file_id = _file_id(obj.get("id"))
        if file_id is None:
            raise ProviderError(
                f"{self.account.name} POST /files: the reply names no file id", retryable=False
            )
        return file_id

    def _discard_upload(self, file_id: str) -> None:
        """Best effort: a refused create leaves its input file behind, which only costs storage."""
        try:
            self._delete_file(file_id)
        except ProviderError as exc:
            logger.warning(
                "%s: could not delete input file %s of a refused batch (%s)",
                self.account.name,
                file_id,
                exc,
                extra={"provider": self.account.name, "file_id": file_id},
            )

    def _delete_file(self, file_id: str) -> None:
        try:
            self._send("DELETE", f"/files/{self._quote(file_id)}", missing_ok=True)
        except ProviderError as exc:
            exc.add_note(f"mixbatch: file {file_id} of account {self.account.name} is left over")
            raise

    def _job(self, obj: dict[str, Any]) -> BatchJob:
        if isinstance(obj.get("job"), dict):
            obj = obj["job"]
        batch_id = obj.get("id")
        if not isinstance(batch_id, str) or not batch_id:
            raise ProviderError(
                f"{self.account.name}: a batch object without an id", retryable=False
            )
        raw = str(obj.get("status") or "")
        status = _STATUS.get(raw.lower())
        if status is None:
            logger.warning(
                "%s batch %s: unknown status %r, taken as in_progress",
                self.account.name,
                batch_id,
                raw,
                extra={"provider": self.account.name, "batch_id": batch_id},
            )
            status = BatchStatus.IN_PROGRESS
        counts = obj.get("request_counts")
        counts = counts if isinstance(counts, dict) else {}
        ended = [parse_timestamp(obj.get(name)) for name in _ENDED_AT]
        metadata = obj.get("metadata")
        return BatchJob(
            provider=self.account.name,
            batch_id=batch_id,
            status=status,
            raw_status=raw,
            total=_int(counts.get("total")),
            completed=_int(counts.get("completed")),
            failed=_int(counts.get("failed")),
            created_at=parse_timestamp(obj.get("created_at")) or 0.0,
            ended_at=next((t for t in ended if t is not None), None),
            expires_at=parse_timestamp(obj.get("expires_at") or obj.get("job_deadline")),
            metadata={str(k): str(v) for k, v in metadata.items()}
            if isinstance(metadata, dict)
            else {},
            validation_errors=_validation_errors(obj),
            input_ref=_file_id(obj.get("input_file_id")),
            output_ref=_file_id(obj.get("output_file_id")),
            error_ref=_file_id(obj.get("error_file_id")),
        )

    def _list_page(
        self, limit: int, cursor: dict[str, str] | None
    ) -> tuple[list[BatchJob], dict[str, str] | None]:
        params = {"limit": str(limit), **(cursor or {})}
        body = self._json("GET", "/batches", params=params)
        if isinstance(body, list):
            return [self._job(item) for item in body if isinstance(item, dict)], None
        if not isinstance(body, dict):
            raise ProviderError(
                f"{self.account.name} GET /batches: the reply is neither a list nor an object",
                retryable=False,
            )
        data = body.get("data")
        jobs = [self._job(item) for item in data if isinstance(item, dict)] if data else []
        paging = body.get("paging")
        if isinstance(paging, dict) and paging.get("next_cursor"):
            return jobs, {"cursor": str(paging["next_cursor"])}
        if body.get("has_more") and jobs:
            last = body.get("last_id") or jobs[-1].batch_id
            return jobs, {"after": str(last)}
        return jobs, None

    def _result_paths(self, job: BatchJob) -> list[str]:
        return [
            f"/files/{self._quote(ref)}/content" for ref in (job.output_ref, job.error_ref) if ref
        ]

    def _line_result(self, obj: dict[str, Any]) -> LineResult | None:
        """An output or error line: ``{id, custom_id, response, error}``.

        A 4xx/5xx line has ``error: null`` and the error inside ``response.body``, so the status
        decides, not ``error``. Only a line that never got a reply has a top-level error.
        """
        custom_id = obj.get("custom_id")
        if not isinstance(custom_id, str):
            return None
        response = obj.get("response")
        top = obj.get("error")
        if isinstance(response, dict):
            status = response.get("status_code")
            status = status if isinstance(status, int) else None
            body = response.get("body")
            body = body if isinstance(body, dict) else None
            if status is not None and status < 400 and not isinstance(top, dict):
                return LineResult(custom_id=custom_id, status_code=status, body=body)
            envelope = body.get("error") if body else None
            envelope = envelope if isinstance(envelope, dict) else {}
            code = envelope.get("code") or envelope.get("type") or f"http_{status}"
            fallback = top.get("message") if isinstance(top, dict) else None
            message = envelope.get("message") or fallback or "no message"
            retryable = status is None or http_retryable(status)
            error = ErrorInfo(
                code=str(code), message=str(message), retryable=retryable, status_code=status
            )
            return LineResult(custom_id=custom_id, status_code=status, body=body, error=error)
        if isinstance(top, dict):
            error = no_response_error(
                str(top.get("code") or "error"), str(top.get("message") or "no message")
            )
            return LineResult(custom_id=custom_id, error=error)
        return LineResult(
            custom_id=custom_id,
            error=ErrorInfo(code="no_response", message="line has no response", retryable=True),
        )

    def _delete(self, job: BatchJob) -> None:
        for ref in (job.input_ref, job.output_ref, job.error_ref):
            if ref:
                self._delete_file(ref)

    def _orphan_candidate(self, job: BatchJob, key: str, value: str, total: int) -> bool:
        return job.metadata.get(key) == value

    def _custom_id_paths(self, job: BatchJob) -> list[str] | None:
        """The input file, readable as long as the provider keeps it."""
        return [f"/files/{self._quote(job.input_ref)}/content"] if job.input_ref else []
