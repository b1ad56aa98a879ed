"""Gemini Batch Mode: requests inline under 20 MB, else a JSONL file through the File API.

Create is ``POST /v1beta/models/{model}:batchGenerateContent`` (embeddings:
``:asyncBatchEmbedContent``), one model per batch, with ``{"batch": {displayName, inputConfig}}``.
``inputConfig`` holds the requests inline (``requests.requests[]`` of ``{request, metadata.key}``)
while the whole document stays under ``inline_max_bytes``; above that the lines go as
``{key, request}`` JSONL through the resumable upload (``/upload/v1beta/files``) and the batch
names the file. Results come back the same way: inline responses in the batch, or a responses
file downloaded with ``:download?alt=media``; each is joined on its ``key`` (our custom_id).

States are read from ``metadata.state`` or ``state``, ``BATCH_STATE_*`` (REST) or ``JOB_STATE_*``
(the SDKs); a batch still pending or running at 48 h is ``EXPIRED`` with no results, so every
request in it is re-routed (the collector requeues members with no line).

Creation is not idempotent: two calls make two batches. So the create is never retried after a
request may have reached Gemini, and the batch carries our metadata in ``displayName``
(``k=v;k=v``); ``find_orphan`` adopts a listed batch with our tag whose inline keys are exactly
ours (a file batch's input cannot be read back; its tag, a digest of the custom_ids, decides).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Generator
from pathlib import Path
from typing import Any, ClassVar

from routing.errors import ProviderError
from routing.models import Endpoint, ErrorInfo
from routing.providers.batch import BatchAdapter
from routing.providers.batch_jobs import (
    BatchJob,
    BatchStatus,
    LineResult,
    http_retryable,
    parse_timestamp,
)
from routing.providers.gemini import API_VERSION, GeminiProtocol, model_path
from routing.providers.native_input import cancel_then_read, framed_requests, without_model

__all__ = ["GeminiBatchAdapter", "gemini_status", "google_error"]

logger = logging.getLogger(__name__)

INLINE = "inline"
_STATES = {
    "PENDING": BatchStatus.IN_PROGRESS,
    "RUNNING": BatchStatus.IN_PROGRESS,
    "SUCCEEDED": BatchStatus.COMPLETED,
    "FAILED": BatchStatus.FAILED,
    "CANCELLED": BatchStatus.CANCELLED,
    "EXPIRED": BatchStatus.EXPIRED,
}
#: google.rpc.Code to the HTTP status it stands for, so a failed line is judged like a reply.
_RPC_STATUS = {3: 400, 4: 504, 5: 404, 7: 403, 8: 429, 9: 400, 10: 409, 13: 500, 14: 503, 16: 401}
_MAX_DISPLAY_NAME = 512


def gemini_status(raw: str) -> BatchStatus | None:
    """``BATCH_STATE_SUCCEEDED`` or ``JOB_STATE_SUCCEEDED`` as a ``BatchStatus``."""
    return _STATES.get(raw.removeprefix("BATCH_STATE_").removeprefix("JOB_STATE_"))


def google_error(error: dict[str, Any]) -> ErrorInfo:
    """A ``google.rpc.Status`` (``{code, message}``) as our error, retryable by the HTTP rule."""
    code = error.get("code")
    status = _RPC_STATUS.get(code) if isinstance(code, int) else None
    if status is None and isinstance(code, int) and 400 <= code < 600:
        status = code
    return ErrorInfo(
        code=str(error.get("status") or f"rpc_{code}"),
        message=str(error.get("message") or "no message"),
        retryable=status is None or http_retryable(status),
        status_code=status,
    )


def _display_name(metadata: dict[str, str]) -> str:
    return ";".join(f"{k}={v}" for k, v in metadata.items())[:_MAX_DISPLAY_NAME]


def _tags(display_name: object) -> dict[str, str]:
    if not isinstance(display_name, str):
        return {}
    pairs = (part.partition("=") for part in display_name.split(";"))
    return {k: v for k, sep, v in pairs if sep and k}


def _int(value: object) -> int:
    """int64 fields come as JSON strings in proto3 JSON."""
    try:
        return int(value) if isinstance(value, int | str) and not isinstance(value, bool) else 0
    except ValueError:
        return 0


def _dict(obj: object, *path: str) -> dict[str, Any]:
    for name in path:
        obj = obj.get(name) if isinstance(obj, dict) else None
    return obj if isinstance(obj, dict) else {}


class GeminiBatchAdapter(GeminiProtocol, BatchAdapter):
    """Gemini Batch Mode on the Gemini API; ``base_url`` has no version (the SDK's convention)."""

    page_limit_max: ClassVar[int] = 100
    inline_max_bytes: ClassVar[int] = 20_000_000

    def _batch_path(self, batch_id: str) -> str:
        return f"/{API_VERSION}/batches/{self._quote(batch_id)}"

    def _create(
        self, path: Path, endpoint: Endpoint, model: str, metadata: dict[str, str], window: str
    ) -> tuple[BatchJob, str | None]:
        items = framed_requests(
            path,
            endpoint,
            model,
            lambda cid, body: {"request": without_model(body), "metadata": {"key": cid}},
            self._check_size,
        )
        size = sum(len(json.dumps(item, separators=(",", ":"))) + 1 for item in items)
        name = _display_name(metadata)
        config: dict[str, Any]
        if size < self.inline_max_bytes:
            config = {"requests": {"requests": items}}
        else:
            config = {"fileName": self._upload(items, name)}
        verb = (
            "batchGenerateContent"
            if endpoint is Endpoint.GENERATE_CONTENT
            else ("asyncBatchEmbedContent")
        )
        target = model_path(endpoint, model).rsplit(":", 1)[0] + ":" + verb
        bare = model.removeprefix("models/")
        body = {"batch": {"displayName": name, "model": f"models/{bare}", "inputConfig": config}}
        obj, request_id = self._object_reply("POST", target, json_body=body, idempotent=False)
        return self._job(obj), request_id

    def _upload(self, items: list[dict[str, Any]], name: str) -> str:
        """The items as ``{key, request}`` JSONL through the resumable File API; its name."""
        fd, tmp = tempfile.mkstemp(prefix="mixbatch-gemini-", suffix=".jsonl")
        try:
            with os.fdopen(fd, "wb") as fh:
                for item in items:
                    line = {"key": item["metadata"]["key"], "request": item["request"]}
                    fh.write(json.dumps(line, separators=(",", ":")).encode() + b"\n")
            size = Path(tmp).stat().st_size
            start = self._send(
                "POST",
                f"/upload/{API_VERSION}/files",
                json_body={"file": {"displayName": name[:128] or "mixbatch"}},
                headers={
                    "x-goog-upload-protocol": "resumable",
                    "x-goog-upload-command": "start",
                    "x-goog-upload-header-content-length": str(size),
                    "x-goog-upload-header-content-type": "application/jsonl",
                },
            )
            url = start.headers.get("x-goog-upload-url")
            if not url:
                raise ProviderError(
                    f"{self.account.name}: the upload start returned no x-goog-upload-url",
                    retryable=False,
                )

            def prepare(stack: Any) -> dict[str, Any]:
                return {"content": stack.enter_context(Path(tmp).open("rb"))}

            done, _ = self._object_reply(
                "POST",
                url,
                prepare=prepare,
                headers={
                    "x-goog-upload-command": "upload, finalize",
                    "x-goog-upload-offset": "0",
                    "content-length": str(size),
                },
            )
        finally:
            Path(tmp).unlink(missing_ok=True)
        file_name = _dict(done, "file").get("name")
        if not isinstance(file_name, str) or not file_name.startswith("files/"):
            raise ProviderError(f"{self.account.name}: the upload named no file", retryable=False)
        return file_name

    def _job(self, obj: dict[str, Any]) -> BatchJob:
        meta = _dict(obj, "metadata")
        name = obj.get("name") or meta.get("name")
        if not isinstance(name, str) or not name:
            raise ProviderError(f"{self.account.name}: a batch without a name", retryable=False)
        batch_id = name.removeprefix("batches/")
        raw = str(meta.get("state") or obj.get("state") or "")
        status = gemini_status(raw)
        if status is None:
            logger.warning(
                "%s batch %s: unknown state %r, taken as in_progress",
                self.account.name,
                batch_id,
                raw,
                extra={"provider": self.account.name, "batch_id": batch_id},
            )
            status = BatchStatus.IN_PROGRESS
        stats = meta.get("batchStats") or obj.get("batchStats")
        stats = stats if isinstance(stats, dict) else {}
        output = meta.get("output") or obj.get("response") or obj.get("dest") or {}
        output = output if isinstance(output, dict) else {}
        responses = output.get("responsesFile") or output.get("fileName")
        inline = "inlinedResponses" in output or "inlinedEmbedContentResponses" in output
        source = meta.get("inputConfig") or obj.get("inputConfig")
        source = source if isinstance(source, dict) else {}
        return BatchJob(
            provider=self.account.name,
            batch_id=batch_id,
            status=status,
            raw_status=raw,
            total=_int(stats.get("requestCount")),
            completed=_int(stats.get("successfulRequestCount")),
            failed=_int(stats.get("failedRequestCount")),
            created_at=parse_timestamp(meta.get("createTime") or obj.get("createTime")) or 0.0,
            ended_at=parse_timestamp(meta.get("endTime") or obj.get("endTime")),
            metadata=_tags(meta.get("displayName") or obj.get("displayName")),
            input_ref=source.get("fileName") if isinstance(source.get("fileName"), str) else None,
            output_ref=responses if isinstance(responses, str) else (INLINE if inline else None),
        )

    def cancel(self, batch_id: str) -> BatchJob:
        """``:cancel`` answers an empty object; the batch is read back. An ended batch is
        refused by Gemini (400): that race is not an error, the batch is returned as it ended."""
        path = self._batch_path(batch_id) + ":cancel"
        return cancel_then_read(
            batch_id, lambda: self._send("POST", path, json_body={}), self.retrieve
        )

    def _stream_lines(self, path: str) -> Generator[tuple[int, str], None, None]:
        """A responses file's lines; for an inline batch, its inline responses as lines."""
        if not path.startswith(INLINE):
            yield from super()._stream_lines(path)
            return
        obj = self._json_object("GET", self._batch_path(path.removeprefix(INLINE + ":")))
        output = _dict(obj, "metadata", "output") or _dict(obj, "response") or _dict(obj, "dest")
        for field in ("inlinedResponses", "inlinedEmbedContentResponses"):
            items = _dict(output, field).get("inlinedResponses")
            for number, item in enumerate(items if isinstance(items, list) else [], start=1):
                yield number, json.dumps(item)

    def _result_paths(self, job: BatchJob) -> list[str]:
        """The responses file, or ``inline:{id}``: the batch itself holds the responses."""
        if job.output_ref == INLINE:
            return [f"{INLINE}:{job.batch_id}"]
        if not job.output_ref:
            return []
        return [f"/download/{API_VERSION}/{job.output_ref}:download?alt=media"]

    def _line_result(self, obj: dict[str, Any]) -> LineResult | None:
        key = obj.get("key") or _dict(obj, "metadata").get("key")
        if not isinstance(key, str) or not key:
            return None
        response = obj.get("response")
        if isinstance(response, dict) and "error" not in obj and "status" not in obj:
            return LineResult(custom_id=key, status_code=200, body=response)
        error = obj.get("error") or obj.get("status")
        info = google_error(error if isinstance(error, dict) else {})
        body = error if isinstance(error, dict) else None
        return LineResult(custom_id=key, status_code=info.status_code, body=body, error=info)

    def _list_page(
        self, limit: int, cursor: dict[str, str] | None
    ) -> tuple[list[BatchJob], dict[str, str] | None]:
        path = f"/{API_VERSION}/batches"
        body = self._json_object("GET", path, params={"pageSize": str(limit), **(cursor or {})})
        data = body.get("operations") or body.get("batches") or []
        jobs = [self._job(item) for item in data if isinstance(item, dict)]
        token = body.get("nextPageToken")
        return jobs, ({"pageToken": token} if isinstance(token, str) and token else None)

    def _delete(self, job: BatchJob) -> None:
        self._send("DELETE", self._batch_path(job.batch_id), missing_ok=True)

    def _orphan_candidate(self, job: BatchJob, key: str, value: str, total: int) -> bool:
        return job.metadata.get(key) == value

    def _custom_id_paths(self, job: BatchJob) -> list[str] | None:
        return []

    def _holds_exactly(self, job: BatchJob, wanted: set[str]) -> bool | None:
        """An inline batch's keys as Gemini echoes them; a file batch's input cannot be read
        back, so its tag (a digest of its custom_ids) decides."""
        obj = self._json_object("GET", self._batch_path(job.batch_id))
        source = _dict(obj, "metadata", "inputConfig") or _dict(obj, "inputConfig")
        items = _dict(source, "requests").get("requests")
        if not isinstance(items, list):
            return True
        keys = [_dict(item, "metadata").get("key") for item in items]
        return len(keys) == len(wanted) and set(keys) == wanted
