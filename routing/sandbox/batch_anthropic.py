"""The sandbox's Anthropic Message Batches protocol: request checks, results, ``MessageBatch``.

Pure functions over :mod:`routing.sandbox.batch_records`; ``batch_store`` calls them when a
batch is created, ends, or is read.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from routing.sandbox import answers
from routing.sandbox.batch_plan import TERMINAL_PHASES, Phase
from routing.sandbox.batch_records import (
    INJECTED_NOTE,
    RESULT_KINDS,
    BatchLine,
    Result,
    SandboxBatch,
    by_finish,
    new_id,
)

ANTHROPIC_RESULTS_RETENTION_S = 29 * 24 * 3600
_ANTHROPIC_UNRUN: dict[Phase, Result] = {Phase.EXPIRED: "expired", Phase.CANCELLED: "canceled"}


def rfc3339(moment: float | None) -> str | None:
    """Anthropic's timestamps: RFC 3339 in UTC with microseconds, as its API sends them."""
    if moment is None:
        return None
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def anthropic_lines(requests: Sequence[tuple[str, Mapping[str, Any]]]) -> list[BatchLine]:
    """The batch's lines; a bad body is kept, to error alone at the end as Anthropic's do."""
    lines = []
    for custom_id, params in requests:
        try:
            answers.validate_body(answers.MESSAGES, params)
            invalid = None
        except answers.InvalidBody as exc:
            invalid = exc
        lines.append(BatchLine(custom_id, params, invalid=invalid))
    return lines


def anthropic_error(status: int, message: str | None = None) -> dict[str, Any]:
    """An ``errored`` result's ``error``: Anthropic's whole error response, request id included."""
    kind = "invalid_request_error" if status == 400 else "api_error"
    if message is None:
        message = (
            f"Invalid request {INJECTED_NOTE}."
            if status == 400
            else f"Internal server error {INJECTED_NOTE}."
        )
    return {
        "type": "error",
        "error": {"type": kind, "message": message},
        "request_id": new_id("req_"),
    }


def anthropic_results(
    batch: SandboxBatch, phase: Phase, ended_at: float
) -> tuple[list[dict[str, Any]], Counter[str]]:
    """The results file of an ended Message Batch, one line per request, in finishing order."""
    records: list[dict[str, Any]] = []
    counts: Counter[str] = Counter()
    for index in by_finish(batch):
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
