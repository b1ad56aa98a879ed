"""Anthropic's Message Batches: requests inline in one POST, results as one JSONL stream.

The input file holds one request per line: either an item of the create call,
``{"custom_id", "params"}`` (what ``write_input`` writes for a planned batch), sent as it is,
or a line in the OpenAI batch input format, whose ``body`` becomes the ``params`` (so an
existing batch file works unchanged). The whole ``{"requests": [...]}`` document is produced
line by line as the request body, never held in memory. A first pass over the file checks
every line (JSON, ``custom_id`` rules, url, model) and measures the exact body, so a bad line is
reported with its number before anything is sent, the 256 MB cap is checked against what
would really be sent, and the request carries a ``content-length`` instead of chunked encoding.

Message batches carry no metadata, so nothing is recorded there; ``find_orphan`` lists batches of
the right request count and adopts one only when its results, once it ended, hold exactly our
custom_ids (see ``BatchAdapter.find_orphan``).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Generator
from contextlib import ExitStack
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

from routing.errors import MalformedInput, ProviderError
from routing.models import Endpoint, ErrorInfo
from routing.providers.anthropic import AnthropicProtocol
from routing.providers.batch import BatchAdapter
from routing.providers.batch_jobs import (
    BatchJob,
    BatchStatus,
    LineResult,
    http_retryable,
    iter_input_lines,
    no_response_error,
    parse_timestamp,
)

__all__ = ["AnthropicBatchAdapter", "anthropic_status_for"]

logger = logging.getLogger(__name__)

_CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_BATCHES = "/v1/messages/batches"
_PREFIX = b'{"requests":['
_SUFFIX = b"]}"
_CHUNK_BYTES = 64 * 1024

#: Anthropic's error types and the HTTP status each stands for, so an errored line is judged
#: retryable by the same rule as an HTTP reply.
_ERROR_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "conflict_error": 409,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}


def anthropic_status_for(type_: str) -> int | None:
    return _ERROR_STATUS.get(type_)


def _count(counts: dict[str, Any], name: str) -> int:
    value = counts.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


class AnthropicBatchAdapter(AnthropicProtocol, BatchAdapter):
    """Message Batches; ``account.base_url`` has no ``/v1`` (the Anthropic SDK's convention)."""

    page_limit_max: ClassVar[int] = 1000

    def _batch_path(self, batch_id: str) -> str:
        return f"{_BATCHES}/{self._quote(batch_id)}"

    def _request_bytes(self, path: Path, number: int, raw: bytes) -> tuple[str, bytes]:
        """One input line as a ``{"custom_id", "params"}`` item, checked; raises naming the line.

        A line in Anthropic's own shape (what ``write_input`` writes) is sent as it is; a line
        in the OpenAI batch input format has its ``body`` sent as ``params``.
        """
        try:
            obj = json.loads(raw)
        except ValueError as exc:
            raise MalformedInput(f"not JSON ({exc})", line=number, source=path.name) from None
        if not isinstance(obj, dict):
            raise MalformedInput("each line must be a JSON object", line=number, source=path.name)
        custom_id = obj.get("custom_id")
        if not isinstance(custom_id, str) or not _CUSTOM_ID.match(custom_id):
            raise MalformedInput(
                f"custom_id {custom_id!r}: Anthropic takes 1 to 64 characters of "
                "a-z, A-Z, 0-9, '_' or '-'",
                line=number,
                source=path.name,
            )
        native = "params" in obj
        if native and set(obj) != {"custom_id", "params"}:
            raise MalformedInput(
                "a request line in Anthropic's shape has only custom_id and params",
                line=number,
                source=path.name,
            )
        url = obj.get("url", Endpoint.MESSAGES.value)
        if url != Endpoint.MESSAGES.value or str(obj.get("method", "POST")).upper() != "POST":
            raise MalformedInput(
                f"{obj.get('method', 'POST')} {url}: Anthropic batches take only "
                f"POST {Endpoint.MESSAGES.value}",
                line=number,
                source=path.name,
            )
        body = obj["params"] if native else obj.get("body")
        if not isinstance(body, dict):
            field = "params" if native else "body"
            raise MalformedInput(f"{field} must be a JSON object", line=number, source=path.name)
        model = body.get("model")
        if isinstance(model, str):
            self.capabilities.require_model(model)
        if native:
            return custom_id, raw.strip()
        request = {"custom_id": custom_id, "params": body}
        return custom_id, json.dumps(request, separators=(",", ":"), ensure_ascii=False).encode()

    def _measure(self, path: Path) -> tuple[int, int, int, int]:
        """(requests, body bytes, longest request's bytes, its line) of the document to send."""
        seen: dict[str, int] = {}
        count = size = longest = longest_at = 0
        for number, raw in iter_input_lines(path):
            custom_id, chunk = self._request_bytes(path, number, raw)
            if custom_id in seen:
                raise MalformedInput(
                    f"custom_id {custom_id!r} repeats line {seen[custom_id]}",
                    line=number,
                    source=path.name,
                )
            seen[custom_id] = number
            count += 1
            size += len(chunk)
            if len(chunk) > longest:
                longest, longest_at = len(chunk), number
        size += len(_PREFIX) + len(_SUFFIX) + max(count - 1, 0)
        return count, size, longest, longest_at

    def _body(self, path: Path) -> Generator[bytes, None, None]:
        """The request document, byte for byte what ``_measure`` counted, in ~64 KiB chunks."""
        buffer = bytearray(_PREFIX)
        first = True
        for number, raw in iter_input_lines(path):
            if not first:
                buffer += b","
            first = False
            buffer += self._request_bytes(path, number, raw)[1]
            if len(buffer) >= _CHUNK_BYTES:
                yield bytes(buffer)
                buffer.clear()
        buffer += _SUFFIX
        yield bytes(buffer)

    def _create(
        self, path: Path, endpoint: Endpoint, model: str, metadata: dict[str, str], window: str
    ) -> tuple[BatchJob, str | None]:
        if metadata:
            logger.debug(
                "%s: message batches carry no metadata; %d pairs not recorded",
                self.account.name,
                len(metadata),
                extra={"provider": self.account.name},
            )
        count, size, longest, longest_at = self._measure(path)
        self._check_size(path, count, size, longest, longest_at)

        def prepare(stack: ExitStack) -> dict[str, Any]:
            body = self._body(path)
            stack.callback(body.close)
            return {"content": body}

        obj, request_id = self._object_reply(
            "POST",
            _BATCHES,
            prepare=prepare,
            headers={"content-type": "application/json", "content-length": str(size)},
            idempotent=False,
        )
        return self._job(obj), request_id

    def _job(self, obj: dict[str, Any]) -> BatchJob:
        batch_id = obj.get("id")
        if not isinstance(batch_id, str) or not batch_id:
            raise ProviderError(
                f"{self.account.name}: a message batch without an id", retryable=False
            )
        raw = str(obj.get("processing_status") or "")
        counts = obj.get("request_counts")
        counts = counts if isinstance(counts, dict) else {}
        succeeded = _count(counts, "succeeded")
        errored = _count(counts, "errored")
        canceled = _count(counts, "canceled")
        expired = _count(counts, "expired")
        status = self._status(raw, obj, canceled=canceled, expired=expired, batch_id=batch_id)
        results_url = obj.get("results_url")
        return BatchJob(
            provider=self.account.name,
            batch_id=batch_id,
            status=status,
            raw_status=raw,
            total=_count(counts, "processing") + succeeded + errored + canceled + expired,
            completed=succeeded,
            failed=errored + canceled + expired,
            created_at=parse_timestamp(obj.get("created_at")) or 0.0,
            ended_at=parse_timestamp(obj.get("ended_at")),
            expires_at=parse_timestamp(obj.get("expires_at")),
            output_ref=results_url if isinstance(results_url, str) and results_url else None,
        )

    def _status(
        self, raw: str, obj: dict[str, Any], *, canceled: int, expired: int, batch_id: str
    ) -> BatchStatus:
        """Only the counts tell an ended batch's fate: cancelled, expired, or completed."""
        if raw == "in_progress":
            return BatchStatus.IN_PROGRESS
        if raw == "canceling":
            return BatchStatus.CANCELLING
        if raw == "ended":
            if obj.get("cancel_initiated_at") or canceled:
                return BatchStatus.CANCELLED
            return BatchStatus.EXPIRED if expired else BatchStatus.COMPLETED
        logger.warning(
            "%s batch %s: unknown processing_status %r, taken as in_progress",
            self.account.name,
            batch_id,
            raw,
            extra={"provider": self.account.name, "batch_id": batch_id},
        )
        return BatchStatus.IN_PROGRESS

    def _list_page(
        self, limit: int, cursor: dict[str, str] | None
    ) -> tuple[list[BatchJob], dict[str, str] | None]:
        body = self._json_object("GET", _BATCHES, params={"limit": str(limit), **(cursor or {})})
        data = body.get("data")
        jobs = [self._job(item) for item in data if isinstance(item, dict)] if data else []
        if body.get("has_more") and jobs:
            return jobs, {"after_id": str(body.get("last_id") or jobs[-1].batch_id)}
        return jobs, None

    def _result_paths(self, job: BatchJob) -> list[str]:
        """``results_url`` when it is on the account's own host; else the same route there.

        The key goes with the download, so it is never sent to a host other than the one the
        account names (a proxy in ``ANTHROPIC_BASE_URL`` may see the real API's URLs).
        """
        if not job.output_ref:
            return []
        mine = urlsplit(self.account.base_url)
        theirs = urlsplit(job.output_ref)
        if (theirs.scheme, theirs.netloc) == (mine.scheme, mine.netloc):
            return [job.output_ref]
        return [f"{self._batch_path(job.batch_id)}/results"]

    def _line_result(self, obj: dict[str, Any]) -> LineResult | None:
        custom_id = obj.get("custom_id")
        result = obj.get("result")
        if not isinstance(custom_id, str) or not isinstance(result, dict):
            return None
        kind = result.get("type")
        if kind == "succeeded":
            message = result.get("message")
            return LineResult(
                custom_id=custom_id,
                status_code=200,
                body=message if isinstance(message, dict) else None,
            )
        if kind == "errored":
            envelope = result.get("error")
            envelope = envelope if isinstance(envelope, dict) else {}
            inner = envelope.get("error")
            inner = inner if isinstance(inner, dict) else {}
            code = str(inner.get("type") or "api_error")
            status = anthropic_status_for(code)
            error = ErrorInfo(
                code=code,
                message=str(inner.get("message") or "no message"),
                retryable=status is None or http_retryable(status),
                status_code=status,
            )
            return LineResult(
                custom_id=custom_id, status_code=status, body=envelope or None, error=error
            )
        if kind == "canceled":
            message = "cancelled before it was sent to the model"
            return LineResult(
                custom_id=custom_id, error=no_response_error("batch_cancelled", message)
            )
        if kind == "expired":
            message = "the batch's 24 h limit came first"
            return LineResult(
                custom_id=custom_id, error=no_response_error("batch_expired", message)
            )
        return None

    def _delete(self, job: BatchJob) -> None:
        self._send("DELETE", self._batch_path(job.batch_id), missing_ok=True)

    def _orphan_candidate(self, job: BatchJob, key: str, value: str, total: int) -> bool:
        """No metadata: the request count is all the listing tells."""
        return job.total == total

    def _custom_id_paths(self, job: BatchJob) -> list[str] | None:
        """The results, the only place a message batch shows its custom_ids: once it ended."""
        return self._result_paths(job) if job.terminal else None
