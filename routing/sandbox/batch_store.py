"""The sandbox's files and batches: storage, input validation and the objects the APIs return.

Free of starlette, like ``state.py``, so it can be driven and tested without HTTP. Handlers pass
in the sandbox time and the knobs, and get back records or :class:`BatchRequestError`, which the
HTTP layer renders in the provider's error shape. A batch's results are written once, the first
time anyone looks after it ended (any call to the store does), so files and counts appear
exactly as the batch's plan says they should, whatever order clients poll in.
"""

from __future__ import annotations

import itertools
import json
import threading
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from routing.sandbox import answers
from routing.sandbox.batch_plan import (
    ANTHROPIC_CANCELLABLE,
    FINALIZING_SHARE,
    OPENAI_CANCELLABLE,
    TERMINAL_PHASES,
    Phase,
    Plan,
    finish_ranks,
    line_fault,
    plan_batch,
)
from routing.sandbox.knobs import Knobs

Protocol = Literal["openai", "anthropic"]
Result = Literal["succeeded", "errored", "expired", "canceled"]
RESULT_KINDS: tuple[Result, ...] = ("succeeded", "errored", "canceled", "expired")

OPENAI_BATCH_ENDPOINTS = (
    "/v1/responses",
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/completions",
    "/v1/moderations",
    "/v1/images/generations",
    "/v1/images/edits",
    "/v1/videos",
)
"""What OpenAI's batch create accepts; the sandbox answers only those in ``answers.ENDPOINTS``."""

FILE_PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")
MAX_OPENAI_LINES = 50_000
MAX_EMBEDDING_INPUTS = 50_000
MAX_BATCH_FILE_BYTES = 200 * 1024 * 1024
MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512
FILE_RETENTION_S = 30 * 24 * 3600
ANTHROPIC_RESULTS_RETENTION_S = 29 * 24 * 3600
CONTENT_CHUNK_BYTES = 64 * 1024

_OPENAI_UNRUN = {
    Phase.EXPIRED: (
        "batch_expired",
        "This request could not be executed before the completion window expired.",
    ),
    Phase.CANCELLED: (
        "batch_cancelled",
        "This request was not executed because the batch was cancelled.",
    ),
}
_ANTHROPIC_UNRUN: dict[Phase, Result] = {Phase.EXPIRED: "expired", Phase.CANCELLED: "canceled"}


class BatchRequestError(Exception):
    """A call the provider would refuse; rendered by the HTTP layer in the provider's shape."""

    def __init__(self, status: int, message: str, *, param: str | None = None) -> None:
        self.status = status
        self.message = message
        self.param = param
        super().__init__(message)


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex}"


def chunked(content: bytes) -> Iterator[bytes]:
    """Stored bytes in pieces, so a large results file is streamed rather than sent whole."""
    for start in range(0, len(content), CONTENT_CHUNK_BYTES):
        yield content[start : start + CONTENT_CHUNK_BYTES]


def unix_s(moment: float | None) -> int | None:
    """OpenAI's timestamps: whole unix seconds."""
    return None if moment is None else int(moment)


def rfc3339(moment: float | None) -> str | None:
    """Anthropic's timestamps: RFC 3339 in UTC with microseconds, as its API sends them."""
    if moment is None:
        return None
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class StoredFile:
    """An OpenAI file: an uploaded batch input, or a batch's output or error file."""

    id: str
    seq: int
    filename: str
    purpose: str
    created_at: float
    expires_at: float | None
    content: bytes

    def to_object(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.content),
            "created_at": unix_s(self.created_at),
            "expires_at": unix_s(self.expires_at),
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "status_details": None,
        }


@dataclass(frozen=True)
class BatchLine:
    """One request of a batch, with what will happen to it when it runs.

    ``fault`` is the status of an injected failure (see ``batch_plan.line_fault``); ``invalid``
    why the provider refuses the body, which only Anthropic reports per line (OpenAI fails the
    whole batch at validation instead).
    """

    custom_id: str
    body: Mapping[str, Any]
    fault: int | None = None
    invalid: answers.InvalidBody | None = None

    @property
    def fails(self) -> bool:
        return self.fault is not None or self.invalid is not None


@dataclass
class SandboxBatch:
    """One batch of either protocol: its input, its plan, and its results once it ended."""

    id: str
    seq: int
    protocol: Protocol
    endpoint: str
    lines: list[BatchLine]
    plan: Plan
    input_file_id: str | None = None
    metadata: dict[str, str] | None = None
    model: str | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)
    output_expires_after_s: float | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    results: bytes = b""
    result_counts: Counter[str] = field(default_factory=Counter)
    usage: dict[str, int] = field(default_factory=dict)

    def phase(self, now: float) -> Phase:
        return self.plan.phase(now)

    def run_counts(self, now: float) -> tuple[int, int]:
        """Lines that have run by ``now``: (answered, failed)."""
        cutoff = self.plan.cutoff(now)
        ran = [
            line for line, at in zip(self.lines, self.plan.finish_at, strict=True) if at <= cutoff
        ]
        failed = sum(line.fails for line in ran)
        return len(ran) - failed, failed


# --- OpenAI input validation --------------------------------------------------------------


def _line_error(
    code: str, message: str, line: int | None, param: str | None = None
) -> dict[str, Any]:
    return {"code": code, "message": message, "param": param, "line": line}


def parse_openai_input(
    content: bytes, endpoint: str
) -> tuple[list[BatchLine], list[dict[str, Any]]]:
    """The lines of a batch input file, and the errors that fail the batch at validation.

    OpenAI accepts any bytes at upload and checks the lines when the batch validates; one bad
    line fails the whole batch, with every error listed by its 1-based line number. Blank lines
    are skipped but still counted in the numbering.
    """
    lines: list[BatchLine] = []
    errors: list[dict[str, Any]] = []
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError:
        return [], [_line_error("invalid_file_format", "The file is not UTF-8 encoded.", None)]
    first_model: str | None = None
    seen: dict[str, int] = {}
    embedding_inputs = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            item = json.loads(raw)
        except json.JSONDecodeError as exc:
            errors.append(
                _line_error("invalid_json_line", f"This line is not valid JSON: {exc.msg}.", number)
            )
            continue
        if not isinstance(item, dict):
            errors.append(
                _line_error("invalid_json_line", "This line is not a JSON object.", number)
            )
            continue
        missing = [name for name in ("custom_id", "method", "url", "body") if name not in item]
        if missing:
            for name in missing:
                errors.append(
                    _line_error(
                        "missing_required_parameter",
                        f"Missing required parameter: '{name}'.",
                        number,
                        name,
                    )
                )
            continue
        custom_id, method, url, body = item["custom_id"], item["method"], item["url"], item["body"]
        if not isinstance(custom_id, str) or not custom_id:
            errors.append(
                _line_error(
                    "invalid_value",
                    "Invalid 'custom_id': expected a non-empty string.",
                    number,
                    "custom_id",
                )
            )
            continue
        if custom_id in seen:
            errors.append(
                _line_error(
                    "duplicate_custom_id",
                    f"The custom_id '{custom_id}' is already used on line {seen[custom_id]}; "
                    "custom_ids must be unique within a batch.",
                    number,
                    "custom_id",
                )
            )
        else:
            seen[custom_id] = number
        if method != "POST":
            errors.append(
                _line_error(
                    "invalid_method",
                    f"Invalid method {method!r}: only 'POST' is supported.",
                    number,
                    "method",
                )
            )
        if url != endpoint:
            errors.append(
                _line_error(
                    "url_mismatch",
                    f"The url {url!r} does not match the batch's endpoint {endpoint!r}.",
                    number,
                    "url",
                )
            )
            continue
        try:
            answers.validate_body(endpoint, body)
        except answers.InvalidBody as exc:
            errors.append(_line_error("invalid_request", exc.message, number, f"body.{exc.field}"))
            continue
        model = str(body["model"])
        if first_model is None:
            first_model = model
        elif model != first_model:
            errors.append(
                _line_error(
                    "model_mismatch",
                    f"The model {model!r} differs from {first_model!r} on an earlier line; "
                    "a batch file may use only one model.",
                    number,
                    "body.model",
                )
            )
        if endpoint == answers.EMBEDDINGS:
            embedding_inputs += len(answers.embedding_inputs(body.get("input")))
        lines.append(BatchLine(custom_id=custom_id, body=body))
    if not lines and not errors:
        errors.append(_line_error("empty_file", "The batch input file is empty.", None))
    if len(lines) > MAX_OPENAI_LINES:
        errors.append(
            _line_error(
                "too_many_tasks",
                f"The batch input file has {len(lines)} requests; at most "
                f"{MAX_OPENAI_LINES} are allowed.",
                None,
            )
        )
    if embedding_inputs > MAX_EMBEDDING_INPUTS:
        errors.append(
            _line_error(
                "too_many_tasks",
                f"The batch has {embedding_inputs} embedding inputs; at most "
                f"{MAX_EMBEDDING_INPUTS} are allowed across all requests.",
                None,
            )
        )
    return lines, errors


# --- results ------------------------------------------------------------------------------

_SANDBOX_NOTE = "(injected by the mixbatch sandbox: batch_line_fail_rate)"


def openai_error_body(status: int) -> dict[str, Any]:
    """The body of a line's injected failure, in OpenAI's error envelope."""
    if status == 400:
        kind, message = "invalid_request_error", f"Invalid request {_SANDBOX_NOTE}."
    else:
        kind, message = (
            "server_error",
            f"The server had an error processing the request {_SANDBOX_NOTE}.",
        )
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


def anthropic_error(status: int, message: str | None = None) -> dict[str, Any]:
    """An ``errored`` result's ``error``: Anthropic's whole error response, request id included."""
    kind = "invalid_request_error" if status == 400 else "api_error"
    if message is None:
        message = (
            f"Invalid request {_SANDBOX_NOTE}."
            if status == 400
            else f"Internal server error {_SANDBOX_NOTE}."
        )
    return {
        "type": "error",
        "error": {"type": kind, "message": message},
        "request_id": new_id("req_"),
    }


def _usage_of(endpoint: str, body: Mapping[str, Any]) -> tuple[int, int]:
    usage = body.get("usage") or {}
    if endpoint in (answers.CHAT_COMPLETIONS, answers.EMBEDDINGS):
        return int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))
    return int(usage.get("input_tokens", 0)), int(usage.get("output_tokens", 0))


def _jsonl(records: Iterable[Mapping[str, Any]]) -> bytes:
    return b"".join(json.dumps(r, separators=(",", ":")).encode("utf-8") + b"\n" for r in records)


def _by_finish(batch: SandboxBatch) -> list[int]:
    return sorted(range(len(batch.lines)), key=lambda i: batch.plan.finish_at[i])


@dataclass
class OpenAIResults:
    output: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    input_tokens: int = 0
    output_tokens: int = 0


def openai_results(batch: SandboxBatch, phase: Phase, ended_at: float) -> OpenAIResults:
    """The output and error file lines of an ended batch, in the order its lines finished.

    A line that got an HTTP answer carries it in ``response`` with ``error: null``, whatever the
    status; only a line that never ran has ``response: null`` and a top-level ``error``.
    """
    out = OpenAIResults()
    for index in _by_finish(batch):
        line = batch.lines[index]
        record_id = new_id("batch_req_")
        if not batch.plan.has_run(index, ended_at):
            code, message = _OPENAI_UNRUN[phase]
            out.errors.append(
                {
                    "id": record_id,
                    "custom_id": line.custom_id,
                    "response": None,
                    "error": {"code": code, "message": message},
                }
            )
            out.counts["expired" if phase == Phase.EXPIRED else "canceled"] += 1
            continue
        status = line.fault or 200
        body = (
            answers.respond(batch.endpoint, line.body)
            if status == 200
            else openai_error_body(status)
        )
        record = {
            "id": record_id,
            "custom_id": line.custom_id,
            "response": {"status_code": status, "request_id": new_id("req_"), "body": body},
            "error": None,
        }
        if status == 200:
            tokens_in, tokens_out = _usage_of(batch.endpoint, body)
            out.input_tokens += tokens_in
            out.output_tokens += tokens_out
            out.output.append(record)
            out.counts["succeeded"] += 1
        else:
            out.errors.append(record)
            out.counts["errored"] += 1
    return out


def anthropic_results(
    batch: SandboxBatch, phase: Phase, ended_at: float
) -> tuple[list[dict[str, Any]], Counter[str]]:
    """The results file of an ended Message Batch, one line per request, in finishing order."""
    records: list[dict[str, Any]] = []
    counts: Counter[str] = Counter()
    for index in _by_finish(batch):
        line = batch.lines[index]
        result: dict[str, Any]
        if not batch.plan.has_run(index, ended_at):
            result = {"type": _ANTHROPIC_UNRUN[phase]}
        elif line.invalid is not None:
            result = {"type": "errored", "error": anthropic_error(400, line.invalid.message)}
        elif line.fault is not None:
            result = {"type": "errored", "error": anthropic_error(line.fault)}
        else:
            result = {"type": "succeeded", "message": answers.respond(answers.MESSAGES, line.body)}
        counts[result["type"]] += 1
        records.append({"custom_id": line.custom_id, "result": result})
    return records, counts


# --- wire objects -------------------------------------------------------------------------


def openai_batch_object(batch: SandboxBatch, now: float) -> dict[str, Any]:
    """The OpenAI ``Batch`` object of ``batch`` as seen at sandbox time ``now``."""
    plan = batch.plan
    phase = plan.phase(now)
    total = 0 if plan.failed or phase == Phase.VALIDATING else len(batch.lines)
    answered, failed = batch.run_counts(now) if total else (0, 0)
    input_tokens = batch.usage.get("input_tokens", 0)
    output_tokens = batch.usage.get("output_tokens", 0)
    return {
        "id": batch.id,
        "object": "batch",
        "endpoint": batch.endpoint,
        "model": batch.model,
        "errors": {"object": "list", "data": batch.errors} if phase == Phase.FAILED else None,
        "input_file_id": batch.input_file_id,
        "completion_window": "24h",
        "status": phase.value,
        "output_file_id": batch.output_file_id,
        "error_file_id": batch.error_file_id,
        "created_at": unix_s(plan.created_at),
        "in_progress_at": None if plan.failed else unix_s(_if_reached(plan, plan.started_at, now)),
        "expires_at": unix_s(plan.expires_at),
        "finalizing_at": unix_s(_if_reached(plan, plan.finalizing_at, now)),
        "completed_at": unix_s(_if_reached(plan, plan.completed_at, now)),
        "failed_at": unix_s(_if_reached(plan, plan.started_at, now)) if plan.failed else None,
        "expired_at": unix_s(_if_reached(plan, plan.expired_at, now)),
        "cancelling_at": unix_s(plan.cancel_at),
        "cancelled_at": unix_s(plan.cancelled_at if phase == Phase.CANCELLED else None),
        "request_counts": {"total": total, "completed": answered, "failed": failed},
        "metadata": batch.metadata,
        "usage": {
            "input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output_tokens,
        },
    }


def _if_reached(plan: Plan, moment: float | None, now: float) -> float | None:
    return moment if plan.reached(moment, now) else None


def _processing_status(phase: Phase) -> str:
    """Anthropic's three statuses; a stuck (finalizing) batch shows as ``in_progress``."""
    if phase in TERMINAL_PHASES:
        return "ended"
    return "canceling" if phase == Phase.CANCELLING else "in_progress"


def anthropic_batch_object(batch: SandboxBatch, now: float, base_url: str) -> dict[str, Any]:
    """The Anthropic ``MessageBatch`` of ``batch`` at ``now``; ``results_url`` under ``base_url``.

    Per Anthropic, the counts show every request as ``processing`` until the batch has ended,
    then jump to their final values; a cancelled batch ends as ``ended`` like any other.
    """
    plan = batch.plan
    phase = plan.phase(now)
    ended = phase in TERMINAL_PHASES
    counts: dict[str, int] = {name: batch.result_counts[name] for name in RESULT_KINDS}
    counts["processing"] = 0 if ended else len(batch.lines)
    archived_at = plan.created_at + ANTHROPIC_RESULTS_RETENTION_S
    return {
        "id": batch.id,
        "type": "message_batch",
        "processing_status": _processing_status(phase),
        "request_counts": counts,
        "created_at": rfc3339(plan.created_at),
        "expires_at": rfc3339(plan.expires_at),
        "ended_at": rfc3339(plan.ended_at) if ended else None,
        "cancel_initiated_at": rfc3339(plan.cancel_at),
        "archived_at": rfc3339(archived_at) if now >= archived_at else None,
        "results_url": f"{base_url}/v1/messages/batches/{batch.id}/results" if ended else None,
    }


# --- the store ----------------------------------------------------------------------------


def _not_found(kind: str, object_id: str) -> BatchRequestError:
    return BatchRequestError(404, f"No such {kind} object: {object_id}")


@dataclass(frozen=True)
class Page:
    """One page of a listing, in listing order."""

    items: list[dict[str, Any]]
    has_more: bool

    @property
    def first_id(self) -> str | None:
        return self.items[0]["id"] if self.items else None

    @property
    def last_id(self) -> str | None:
        return self.items[-1]["id"] if self.items else None


class BatchStore:
    """Every file and batch of one sandbox, behind one lock: handlers run on the server's event
    loop while ``stats`` is read from the test's or demo's thread.

    Ids are ordered by a sequence number that outlives deletion, so a listing cursor naming a
    deleted object still pages from where it stood.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seq = itertools.count(1)
        self._order: dict[str, int] = {}
        self._files: dict[str, StoredFile] = {}
        self._batches: dict[str, SandboxBatch] = {}
        self._pending: set[str] = set()
        self._attempts: Counter[tuple[Protocol, str]] = Counter()
        self._created: Counter[Protocol] = Counter()
        self._lines_run: Counter[Protocol] = Counter()
        self._results: Counter[str] = Counter()

    def reset(self) -> None:
        """Forget every file, batch and counter, and the attempts behind transient line faults."""
        with self._lock:
            for table in (
                self._order,
                self._files,
                self._batches,
                self._attempts,
                self._created,
                self._lines_run,
                self._results,
            ):
                table.clear()
            self._pending.clear()

    def _issue(self, prefix: str) -> tuple[str, int]:
        object_id, seq = new_id(prefix), next(self._seq)
        self._order[object_id] = seq
        return object_id, seq

    # --- files ----------------------------------------------------------------------------

    def add_file(
        self,
        now: float,
        *,
        filename: str,
        purpose: str,
        content: bytes,
        expires_after_s: float | None,
    ) -> dict[str, Any]:
        with self._lock:
            self._advance(now)
            file_id, seq = self._issue("file-")
            if expires_after_s is None and purpose == "batch":
                expires_after_s = FILE_RETENTION_S
            expires_at = None if expires_after_s is None else now + expires_after_s
            stored = StoredFile(file_id, seq, filename, purpose, now, expires_at, content)
            self._files[file_id] = stored
            return stored.to_object()

    def _file(self, file_id: str) -> StoredFile:
        stored = self._files.get(file_id)
        if stored is None:
            raise _not_found("File", file_id)
        return stored

    def file_object(self, now: float, file_id: str) -> dict[str, Any]:
        with self._lock:
            self._advance(now)
            return self._file(file_id).to_object()

    def file_content(self, now: float, file_id: str) -> StoredFile:
        """The stored file; its bytes never change, so it can be streamed outside the lock."""
        with self._lock:
            self._advance(now)
            return self._file(file_id)

    def delete_file(self, now: float, file_id: str) -> dict[str, Any]:
        with self._lock:
            self._advance(now)
            self._file(file_id)
            del self._files[file_id]
            return {"id": file_id, "object": "file", "deleted": True}

    def list_files(
        self, now: float, *, after: str | None, limit: int, order: str, purpose: str | None
    ) -> Page:
        with self._lock:
            self._advance(now)
            files = [f for f in self._files.values() if purpose is None or f.purpose == purpose]
            descending = order == "desc"
            files.sort(key=lambda f: f.seq, reverse=descending)
            if after is not None:
                cursor = self._cursor(after, "after")
                files = [f for f in files if (f.seq < cursor if descending else f.seq > cursor)]
            return Page([f.to_object() for f in files[:limit]], len(files) > limit)

    def _cursor(self, object_id: str, param: str) -> int:
        seq = self._order.get(object_id)
        if seq is None:
            raise BatchRequestError(
                400, f"Invalid '{param}': no object with id {object_id!r}.", param=param
            )
        return seq

    # --- creating batches -----------------------------------------------------------------

    def _with_faults(
        self, protocol: Protocol, lines: Sequence[BatchLine], knobs: Knobs
    ) -> list[BatchLine]:
        faulted = []
        for line in lines:
            attempt = self._attempts[(protocol, line.custom_id)]
            self._attempts[(protocol, line.custom_id)] += 1
            fault = line_fault(knobs.seed, line.custom_id, attempt, knobs.batch_line_fail_rate)
            faulted.append(BatchLine(line.custom_id, line.body, fault, line.invalid))
        return faulted

    def _register(self, batch: SandboxBatch, now: float) -> None:
        self._batches[batch.id] = batch
        self._pending.add(batch.id)
        self._created[batch.protocol] += 1
        self._advance(now)

    def create_openai(
        self,
        now: float,
        knobs: Knobs,
        *,
        input_file_id: str,
        endpoint: str,
        metadata: dict[str, str] | None,
        output_expires_after_s: float | None,
    ) -> dict[str, Any]:
        """Create an OpenAI batch; its input is checked now, and a bad one fails it after
        ``batch_validating_s``, as OpenAI reports validation errors on the batch, not the call.
        """
        with self._lock:
            self._advance(now)
            source = self._files.get(input_file_id)
            if source is None:
                raise BatchRequestError(
                    400,
                    f"Invalid 'input_file_id': no file with id {input_file_id!r}.",
                    param="input_file_id",
                )
            if source.purpose != "batch":
                raise BatchRequestError(
                    400,
                    f"Invalid 'input_file_id': file {input_file_id!r} has purpose "
                    f"{source.purpose!r}, but a batch needs a file uploaded with purpose 'batch'.",
                    param="input_file_id",
                )
            lines, errors = parse_openai_input(source.content, endpoint)
            batch_id, seq = self._issue("batch_")
            failed = bool(errors)
            lines = [] if failed else self._with_faults("openai", lines, knobs)
            plan = plan_batch(
                created_at=now,
                ranks=finish_ranks(batch_id, [line.custom_id for line in lines]),
                knobs=knobs,
                validating_s=knobs.batch_validating_s,
                finalizing_share=FINALIZING_SHARE,
                failed=failed,
            )
            batch = SandboxBatch(
                id=batch_id,
                seq=seq,
                protocol="openai",
                endpoint=endpoint,
                lines=lines,
                plan=plan,
                input_file_id=input_file_id,
                metadata=metadata,
                model=str(lines[0].body["model"]) if lines else None,
                errors=errors,
                output_expires_after_s=output_expires_after_s,
            )
            self._register(batch, now)
            return openai_batch_object(batch, now)

    def create_anthropic(
        self,
        now: float,
        knobs: Knobs,
        requests: Sequence[tuple[str, Mapping[str, Any]]],
        base_url: str,
    ) -> dict[str, Any]:
        """Create a Message Batch; bad params error per request at the end, as Anthropic's do."""
        with self._lock:
            self._advance(now)
            lines = []
            for custom_id, params in requests:
                try:
                    answers.validate_body(answers.MESSAGES, params)
                    invalid = None
                except answers.InvalidBody as exc:
                    invalid = exc
                lines.append(BatchLine(custom_id, params, invalid=invalid))
            batch_id, seq = self._issue("msgbatch_")
            lines = self._with_faults("anthropic", lines, knobs)
            plan = plan_batch(
                created_at=now,
                ranks=finish_ranks(batch_id, [line.custom_id for line in lines]),
                knobs=knobs,
                validating_s=0.0,
                finalizing_share=0.0,
            )
            batch = SandboxBatch(
                id=batch_id,
                seq=seq,
                protocol="anthropic",
                endpoint=answers.MESSAGES,
                lines=lines,
                plan=plan,
            )
            self._register(batch, now)
            return anthropic_batch_object(batch, now, base_url)

    # --- reading and changing batches -----------------------------------------------------

    def _batch(self, protocol: Protocol, batch_id: str) -> SandboxBatch:
        batch = self._batches.get(batch_id)
        if batch is None or batch.protocol != protocol:
            raise _not_found("Batch" if protocol == "openai" else "Message Batch", batch_id)
        return batch

    def _render(self, batch: SandboxBatch, now: float, base_url: str) -> dict[str, Any]:
        if batch.protocol == "openai":
            return openai_batch_object(batch, now)
        return anthropic_batch_object(batch, now, base_url)

    def batch_object(
        self, protocol: Protocol, now: float, batch_id: str, base_url: str = ""
    ) -> dict[str, Any]:
        with self._lock:
            self._advance(now)
            return self._render(self._batch(protocol, batch_id), now, base_url)

    def cancel(
        self, protocol: Protocol, now: float, batch_id: str, base_url: str = ""
    ) -> dict[str, Any]:
        """Start cancelling: lines that ran by now keep their results, the rest are cancelled.

        Cancelling a batch already cancelling answers it unchanged. Any other phase outside
        ``OPENAI_CANCELLABLE``/``ANTHROPIC_CANCELLABLE`` is refused with a 400, which no SDK
        retries (a 409 would be retried).
        """
        with self._lock:
            self._advance(now)
            batch = self._batch(protocol, batch_id)
            phase = batch.phase(now)
            cancellable = OPENAI_CANCELLABLE if protocol == "openai" else ANTHROPIC_CANCELLABLE
            if phase in cancellable:
                batch.plan = batch.plan.cancelled(now)
                self._advance(now)
            elif phase != Phase.CANCELLING:
                shown = phase.value if protocol == "openai" else "ended"
                raise BatchRequestError(400, f"Cannot cancel a batch with status '{shown}'.")
            return self._render(batch, now, base_url)

    def delete_anthropic(self, now: float, batch_id: str) -> dict[str, Any]:
        with self._lock:
            self._advance(now)
            batch = self._batch("anthropic", batch_id)
            if batch.phase(now) not in TERMINAL_PHASES:
                raise BatchRequestError(
                    400,
                    f"Message Batch {batch_id} is still processing; cancel it and wait for it "
                    "to end before deleting it.",
                )
            del self._batches[batch_id]
            return {"id": batch_id, "type": "message_batch_deleted"}

    def anthropic_results(self, now: float, batch_id: str) -> bytes:
        with self._lock:
            self._advance(now)
            batch = self._batch("anthropic", batch_id)
            if batch.phase(now) not in TERMINAL_PHASES:
                raise BatchRequestError(
                    400,
                    f"Message Batch {batch_id} has not ended yet; its results are not available.",
                )
            if now >= batch.plan.created_at + ANTHROPIC_RESULTS_RETENTION_S:
                raise BatchRequestError(
                    404,
                    f"The results of Message Batch {batch_id} were archived 29 days after "
                    "its creation.",
                )
            return batch.results

    def list_batches(
        self,
        protocol: Protocol,
        now: float,
        *,
        limit: int,
        after: str | None = None,
        before: str | None = None,
        base_url: str = "",
    ) -> Page:
        """A page of batches, newest first: ``after`` pages to older ones, ``before`` to newer."""
        with self._lock:
            self._advance(now)
            batches = sorted(
                (b for b in self._batches.values() if b.protocol == protocol),
                key=lambda b: b.seq,
                reverse=True,
            )
            if after is not None:
                cursor = self._cursor(after, "after_id" if protocol == "anthropic" else "after")
                older = [b for b in batches if b.seq < cursor]
                chosen, has_more = older[:limit], len(older) > limit
            elif before is not None:
                cursor = self._cursor(before, "before_id")
                newer = [b for b in batches if b.seq > cursor]
                chosen, has_more = newer[-limit:], len(newer) > limit
            else:
                chosen, has_more = batches[:limit], len(batches) > limit
            return Page([self._render(b, now, base_url) for b in chosen], has_more)

    # --- ending batches -------------------------------------------------------------------

    def _advance(self, now: float) -> None:
        """Write the results of every batch that has ended by ``now`` and has none yet."""
        for batch_id in sorted(self._pending, key=lambda i: self._order[i]):
            batch = self._batches.get(batch_id)
            if batch is None:
                self._pending.discard(batch_id)
                continue
            phase = batch.phase(now)
            if phase in TERMINAL_PHASES:
                self._finish(batch, phase)
                self._pending.discard(batch_id)

    def _finish(self, batch: SandboxBatch, phase: Phase) -> None:
        ended_at = batch.plan.ended_at
        assert ended_at is not None
        if phase == Phase.FAILED:
            return
        if batch.protocol == "openai":
            results = openai_results(batch, phase, ended_at)
            batch.output_file_id = self._output_file(batch, "output", results.output, ended_at)
            batch.error_file_id = self._output_file(batch, "error", results.errors, ended_at)
            batch.usage = {
                "input_tokens": results.input_tokens,
                "output_tokens": results.output_tokens,
            }
            counts = results.counts
        else:
            records, counts = anthropic_results(batch, phase, ended_at)
            batch.results = _jsonl(records)
        batch.result_counts = counts
        self._lines_run[batch.protocol] += counts["succeeded"] + counts["errored"]
        self._results.update(counts)

    def _output_file(
        self, batch: SandboxBatch, kind: str, records: list[dict[str, Any]], ended_at: float
    ) -> str | None:
        """An output or error file, or None when it would be empty (OpenAI leaves the id null)."""
        if not records:
            return None
        file_id, seq = self._issue("file-")
        retention_s = batch.output_expires_after_s or FILE_RETENTION_S
        self._files[file_id] = StoredFile(
            file_id,
            seq,
            f"{batch.id}_{kind}.jsonl",
            "batch_output",
            ended_at,
            ended_at + retention_s,
            _jsonl(records),
        )
        return file_id

    def stats(self, now: float) -> dict[str, Any]:
        with self._lock:
            self._advance(now)
            running = Counter(
                self._batches[i].protocol for i in self._pending if i in self._batches
            )
            protocols: tuple[Protocol, ...] = ("openai", "anthropic")
            return {
                "created": {p: self._created[p] for p in protocols},
                "running": {p: running[p] for p in protocols},
                "lines_processed": {p: self._lines_run[p] for p in protocols},
                "lines_by_result": {kind: self._results[kind] for kind in RESULT_KINDS},
                "files": len(self._files),
            }
