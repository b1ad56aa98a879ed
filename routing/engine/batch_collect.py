"""Collecting a finished provider batch: each result line applied to the requests it answers.

Per line: success -> DONE, priced; a line that never ran (expired, cancelled) or failed with a
retryable error -> back to its lane (the route choice then picks realtime if the deadline is
near); a non-retryable error -> FAILED with the provider's message. Lines missing from the
results are requeued. A batch refused at validation fails the lines it names and resubmits the
others. Re-applying a line is harmless: each finish checks the lease token, so a second
collector of the same batch (after the first one's collect lease ran out) changes nothing.
"""

from __future__ import annotations

import logging

from routing.engine.batch_handles import BatchHandles, fail, requeue
from routing.engine.pricing import usage_of
from routing.errors import MixbatchError
from routing.faults import fault_point
from routing.models import ErrorInfo, Prepared, Route, StoredResult
from routing.providers.batch_jobs import BatchJob, BatchStatus, LineResult
from routing.states import State
from routing.store.batches import BatchRecord, Member
from routing.store.ledger import Cost, record_many

__all__ = ["collect"]

log = logging.getLogger(__name__)

#: Lines applied per pipelined round trip while collecting.
FINISH_CHUNK = 1000

_LOST = ErrorInfo(
    code="missing_result", message="the batch returned no line for this request", retryable=True
)
_RESUBMIT = ErrorInfo(
    code="batch_validation_failed",
    message="another line of its batch was invalid; resubmitted",
    retryable=True,
)


def collect(h: BatchHandles, record: BatchRecord, job: BatchJob) -> dict[str, int]:
    """Apply a finished batch's lines to their requests, then close the record."""
    counts = {"done": 0, "failed": 0, "requeued": 0}
    if job.status is BatchStatus.FAILED:
        _collect_validation(h, record, job, counts)
        h.registry.finish(record, "failed", h.clock(), note="validation failed")
        return counts
    adapter = h.adapter(record.provider)
    holders = h.store.holders([m.id for m in record.requests()])
    requests = {rid: found[0] for rid, found in holders.items()}
    pending = _Finishes(h, record)
    seen: set[str] = set()
    for number, line in enumerate(adapter.results(job)):
        if number == 0:
            fault_point("download")
        group = record.members.get(line.custom_id)
        if group is None:
            log.warning(
                "result line not ours", extra={"batch_key": record.key, "custom_id": line.custom_id}
            )
            continue
        seen.add(line.custom_id)
        for m in group:
            pending.apply(m, line, requests.get(m.id), counts)
        if len(pending) >= FINISH_CHUNK:
            pending.flush(counts)
    pending.flush(counts)
    for cid, group in record.members.items():
        if cid not in seen:
            for m in group:
                requeue(h, m.id, m.token, _LOST)
                counts["requeued"] += 1
    if h.settings.delete_files:
        try:
            adapter.delete_inputs_outputs(job)
        except MixbatchError as exc:
            log.warning(
                "could not delete batch files", extra={"batch_key": record.key, "error": str(exc)}
            )
    h.registry.finish(record, "done", h.clock(), note=job.raw_status)
    log.info(
        "batch collected", extra={"batch_key": record.key, "batch_id": record.batch_id, **counts}
    )
    return counts


class _Finishes:
    """Finishes of one collection, sent in pipelined chunks; costs and deliveries follow."""

    def __init__(self, h: BatchHandles, record: BatchRecord) -> None:
        self.h = h
        self.record = record
        self.items: list[tuple[str, str, State, StoredResult]] = []
        self.priced: list[tuple[Prepared, Cost] | None] = []
        self.requests: list[Prepared | None] = []

    def __len__(self) -> int:
        return len(self.items)

    def add(
        self,
        m: Member,
        outcome: State,
        result: StoredResult,
        priced: tuple[Prepared, Cost] | None,
        request: Prepared | None,
    ) -> None:
        self.items.append((m.id, m.token, outcome, result))
        self.priced.append(priced)
        self.requests.append(request)

    def apply(
        self, m: Member, line: LineResult, request: Prepared | None, counts: dict[str, int]
    ) -> None:
        """One requester of a result line: a finish to send, or a requeue done at once."""
        record = self.record
        if line.ok:
            body = line.body or {}
            usage = usage_of(body)
            result = StoredResult(
                status_code=line.status_code or 200,
                body=body,
                usage=usage,
                provider=record.provider,
                batch_id=record.batch_id,
            )
            priced = None
            if request is not None:
                cost = self.h.price(request, record.provider, Route.BATCH, usage)
                result = result.model_copy(update=cost.model_dump())
                priced = (request, cost)
            self.add(m, State.DONE, result, priced, request)
            return
        error = line.error or ErrorInfo(code="unknown", message="no answer")
        if error.retryable or error.code in ("expired", "cancelled"):
            requeue(self.h, m.id, m.token, error.model_copy(update={"retryable": True}))
            counts["requeued"] += 1
            return
        failed = StoredResult(
            status_code=line.status_code, body=line.body, error=error, provider=record.provider
        )
        billed = self._billed(request, line)
        if billed is not None:
            failed = failed.model_copy(update=billed[1].model_dump())
        self.add(m, State.FAILED, failed, billed, request)

    def _billed(self, request: Prepared | None, line: LineResult) -> tuple[Prepared, Cost] | None:
        """What a failed line cost: only where the account bills failed lines (its price entry's
        ``bills_failed_lines``) and the line carries usage; None (nothing billed) otherwise."""
        usage = usage_of(line.body)
        if request is None or usage is None or self.h.failed_price is None:
            return None
        usd = self.h.failed_price(self.record.provider, request.model, usage)
        if usd <= 0.0:
            return None
        return request, Cost(cost_usd=usd, saved_usd=0.0, estimated_usd=usd, priced=True)

    def flush(self, counts: dict[str, int]) -> None:
        if not self.items:
            return
        h = self.h
        # no sink to call (the built-in store): DELIVERED in the finish's own script
        stored_only = [r is not None and r.callback is None for r in self.requests]
        won = h.store.finish_many(self.items, now=h.clock(), delivered=stored_only)
        to_sink: list[str] = []
        ledger: list[tuple[Prepared, Route, Cost]] = []
        rows = zip(self.items, self.priced, stored_only, won, strict=True)
        for (rid, _, outcome, _), priced, delivered, ok in rows:
            if not ok:
                continue
            counts["done" if outcome is State.DONE else "failed"] += 1
            if not delivered:
                to_sink.append(rid)
            if priced is not None:
                ledger.append((priced[0], Route.BATCH, priced[1]))
        record_many(h.store, ledger)
        if to_sink:
            h.dispatch(to_sink)
        self.items, self.priced, self.requests = [], [], []
        fault_point("apply")


def _collect_validation(
    h: BatchHandles, record: BatchRecord, job: BatchJob, counts: dict[str, int]
) -> None:
    """A batch refused at validation: fail the lines it names, resubmit the valid ones."""
    bad: dict[str, str] = {}
    for err in job.validation_errors:
        cid = err.custom_id
        if cid is None and err.line is not None and 0 < err.line <= len(record.order):
            cid = record.order[err.line - 1]
        if cid is not None:
            bad[cid] = f"{err.code}: {err.message}"
    for cid, group in record.members.items():
        for m in group:
            if cid in bad:
                info = ErrorInfo(code="invalid_request", message=bad[cid], status_code=400)
                fail(h, m.id, m.token, info)
                counts["failed"] += 1
            else:
                requeue(h, m.id, m.token, _RESUBMIT)
                counts["requeued"] += 1
