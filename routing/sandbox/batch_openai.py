"""The sandbox's OpenAI Batch protocol: input validation, result files, the ``Batch`` object.

Pure functions over :mod:`routing.sandbox.batch_records`; ``batch_store`` calls them when a
batch is created, ends, or is read.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from routing.sandbox import answers
from routing.sandbox.batch_plan import Phase, Plan
from routing.sandbox.batch_records import INJECTED_NOTE, BatchLine, SandboxBatch, by_finish, new_id

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

MAX_OPENAI_LINES = 50_000
MAX_EMBEDDING_INPUTS = 50_000
MAX_BATCH_FILE_BYTES = 200 * 1024 * 1024
MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512

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


def unix_s(moment: float | None) -> int | None:
    """OpenAI's timestamps: whole unix seconds."""
    return None if moment is None else int(moment)


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


def openai_error_body(status: int) -> dict[str, Any]:
    """The body of a line's injected failure, in OpenAI's error envelope."""
    if status == 400:
        kind, message = "invalid_request_error", f"Invalid request {INJECTED_NOTE}."
    else:
        kind, message = (
            "server_error",
            f"The server had an error processing the request {INJECTED_NOTE}.",
        )
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


def _usage_of(endpoint: str, body: Mapping[str, Any]) -> tuple[int, int]:
    usage = body.get("usage") or {}
    if endpoint in (answers.CHAT_COMPLETIONS, answers.EMBEDDINGS):
        return int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))
    return int(usage.get("input_tokens", 0)), int(usage.get("output_tokens", 0))


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
    for index in by_finish(batch):
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
